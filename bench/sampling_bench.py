"""Token-by-token sampling speed on the embedded model, with and without ``rlhf.packed_weights.sampling_weights``.

    python bench/sampling_bench.py [--batch 8] [--new_tokens 48] [--repeats 3] [--out FILE]

On the bare base model (no adapter; PPO's folding of the policy LoRA into the copies is measured by
``bench/ppo_bench.py compare``). Each side is run ``repeats`` times, interleaved:

* ``linears``: one pass over every linear layer of the model with ``batch`` rows (what a decoding
  step's matmuls cost), ``F.linear`` vs the oneDNN-prepacked copies ``sampling_weights`` uses.
* ``generate``: HF ``generate`` of ``new_tokens`` tokens (``min_new_tokens`` = ``new_tokens``, so
  both sides decode the same number of steps) for ``batch`` prompts at temperature 0.7, plain vs
  inside ``sampling_weights`` (packing included in the time), plus whether greedy decoding gives the
  same tokens. The time is per decoding step (wall time / new_tokens).
* ``profile``: the share of self CPU time of the top operators in one prepacked ``generate``.

Prints one JSON object; results go to bench/RESULTS.md by hand, with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.profiler import profile

from rlhf.generation import encode_prompts
from rlhf.models import load_base_model, load_tokenizer, resolve_model_path
from rlhf.packed_weights import _packed_linear_ops, sampling_weights

PROMPTS = ["Explain why the sky is blue.", "Name three fruits.", "What is 2+2?", "Write a haiku about rain.",
           "How do magnets work?", "Give a tip for studying.", "What is a verb?", "Describe a cat."]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("smollm2-135m-instruct")
    model = load_base_model(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    enc = encode_prompts(tokenizer, prompts, torch.device("cpu"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if _packed_linear_ops() is None:
        raise SystemExit("this torch build has no oneDNN prepacked linear: sampling_weights changes nothing here")
    pack = _packed_linear_ops()[0]
    rows = {m.in_features: torch.randn(args.batch, 1, m.in_features) for m in linears}

    def all_linears():
        for m in linears:
            m(rows[m.in_features])

    def generate(**kw):
        return model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw)

    def sample_plain():
        generate(do_sample=True, temperature=0.7)

    def sample_packed():
        with sampling_weights(model):
            generate(do_sample=True, temperature=0.7)

    res: dict[str, list[float]] = {k: [] for k in ("linears_plain_ms", "linears_packed_ms", "pack_ms",
                                                    "generate_plain_ms_per_step", "generate_packed_ms_per_step")}
    with torch.no_grad():
        plain_greedy = generate(do_sample=False)
        with sampling_weights(model):
            packed_greedy = generate(do_sample=False)
            all_linears()
        for _ in range(args.repeats):
            res["linears_plain_ms"].append(timed(all_linears) * 1e3)
            with sampling_weights(model):
                res["linears_packed_ms"].append(timed(all_linears) * 1e3)
            res["pack_ms"].append(timed(lambda: [pack(m.weight) for m in linears]) * 1e3)
            for name, fn in (("plain", sample_plain), ("packed", sample_packed)):
                res[f"generate_{name}_ms_per_step"].append(timed(fn) * 1e3 / args.new_tokens)
        with sampling_weights(model), profile() as prof:
            sample_plain()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    best = {k: round(min(v), 1) for k, v in res.items()}
    result = {
        "what": "sampling", "batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads,
        "runs": {k: [round(x, 1) for x in v] for k, v in res.items()}, "best": best,
        "linears_speedup": round(best["linears_plain_ms"] / best["linears_packed_ms"], 2),
        "generate_speedup": round(best["generate_plain_ms_per_step"] / best["generate_packed_ms_per_step"], 2),
        "greedy_tokens_equal": bool(torch.equal(plain_greedy, packed_greedy)),
        "profile_packed_generate_self_cpu_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in top},
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
