"""Reward-model benchmark on the embedded model's own samples.

1. Sample K responses per prompt of ``sample:prompts`` from ``smollm2-135m-instruct``
   (``rlhf.generation.generate_responses``; cached under ``$RLHF_HOME/bench``).
2. Label every pair of responses to the same prompt with the transparent rule in
   ``reward/rules.py`` (pairs whose rule scores differ by less than ``--min_gap`` are dropped).
3. Train the reward model with ``reward.train.run_reward`` (held-out split by prompt) and
   report held-out accuracy, train pairs/s, wall time and peak RSS.

    python bench/reward_bench.py                 # full run (about 10 minutes on 2 CPU cores, first time)
    python bench/reward_bench.py --threads 2 --out outputs/bench_reward

Targets: held-out accuracy >= 0.85 and training <= 5 minutes on 2 CPU cores.

Besides ``OUT/bench_result.json`` (next to the trained RM), the record of the run
(command, machine, load before and after, date, figures, settings; no weights or
pairs) goes to bench/results/reward_bench.json (``--record`` to change).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_record import Record  # noqa: E402

MODEL = "smollm2-135m-instruct"


def sample_responses(prompts_name: str, k: int, max_new_tokens: int, temperature: float, seed: int) -> list[dict]:
    """``[{prompt, responses: [K texts]}]`` sampled from the embedded model (cached on disk)."""
    import torch

    from rlhf.data import load_prompts, prompt_text
    from rlhf.generation import generate_responses
    from rlhf.models import load_model, load_tokenizer, rlhf_home

    key = hashlib.sha256(json.dumps([MODEL, prompts_name, k, max_new_tokens, temperature, seed]).encode()).hexdigest()[
        :12
    ]
    cache = rlhf_home() / "bench" / f"reward_samples_{key}.jsonl"
    if cache.is_file():
        print(f"using cached samples {cache}", file=sys.stderr)
        return [json.loads(line) for line in cache.read_text().splitlines()]
    prompts = load_prompts(prompts_name)
    tokenizer = load_tokenizer(MODEL, padding_side="left")
    model = load_model(MODEL, dtype=torch.float32)
    start = time.perf_counter()
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        num_return_sequences=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=8,
        seed=seed,
    )
    print(f"sampled {len(prompts)} x {k} responses in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    rows = [{"prompt": prompt_text(p), "responses": r} for p, r in zip(prompts, responses)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(cache)
    return rows


def label_pairs(rows: list[dict], min_gap: float, seed: int) -> list[dict]:
    """All pairs of distinct responses per prompt, labelled by ``reward.rules.rule_prefers``."""
    from reward.rules import rule_prefers, rule_score

    rng = random.Random(seed)
    pairs = []
    for row in rows:
        unique = list(dict.fromkeys(r for r in row["responses"] if r.strip()))
        for a, b in itertools.combinations(unique, 2):
            winner = rule_prefers(row["prompt"], a, b, min_gap=min_gap)
            if winner is None:
                continue
            chosen, rejected = (a, b) if winner == "a" else (b, a)
            gap = rule_score(row["prompt"], chosen) - rule_score(row["prompt"], rejected)
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "rule_gap": round(gap, 4)})
    rng.shuffle(pairs)
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="sample:prompts")
    parser.add_argument("--k", type=int, default=4, help="responses sampled per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--min_gap", type=float, default=0.3, help="drop pairs whose rule scores differ by less")
    parser.add_argument("--max_pairs", type=int, default=0, help="use at most this many pairs (0 = all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_reward")
    parser.add_argument("--samples_only", action="store_true", help="only sample (and cache) the responses")
    parser.add_argument("--baseline", action="store_true", help="also report the untrained RM's held-out accuracy")
    parser.add_argument("--config", default="configs/reward.yaml", help="reward-stage defaults (YAML); '' for none")
    parser.add_argument("overrides", nargs="*", help="extra reward-stage keys as key=value")
    parser.add_argument("--record", default=None, help="record file (default bench/results/reward_bench.json)")
    args = parser.parse_args(argv)
    record = Record("reward_bench", argv, path=args.record)

    import torch

    torch.set_num_threads(args.threads)
    rows = sample_responses(args.prompts, args.k, args.max_new_tokens, args.temperature, args.seed)
    if args.samples_only:
        return 0
    pairs = label_pairs(rows, args.min_gap, args.seed)
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefs = out / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(pairs)} labelled pairs over {len({p['prompt'] for p in pairs})} prompts -> {prefs}", file=sys.stderr)

    from reward.train import RewardStageConfig, run_reward
    from rlhf.config import build_config, load_yaml

    values = load_yaml(args.config) if args.config else {}
    values.update(
        model_name_or_path=MODEL, dataset_name=str(prefs), output_dir=str(out / "rm"), seed=args.seed, report_to="none"
    )
    for item in args.overrides:
        key, _, value = item.partition("=")
        values[key] = yaml_value(value)
    cfg = build_config(RewardStageConfig, values)
    train_clock = clock_training()
    start = time.perf_counter()
    metrics = run_reward(cfg)
    elapsed = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    baseline = untrained_accuracy(cfg) if args.baseline else None
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": "python bench/reward_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "pairs": len(pairs),
        "train_pairs": metrics["train_pairs"],
        "eval_pairs": metrics["eval_pairs"],
        "eval_prompts": metrics["eval_prompts"],
        "eval_accuracy": metrics.get("eval_accuracy"),
        "eval_accuracy_untrained": baseline,
        "eval_mean_margin": metrics.get("eval_mean_margin"),
        "eval_length_correlation": metrics.get("eval_length_correlation"),
        "train_runtime_s": metrics["train_runtime_s"],
        "train_pairs_per_s": metrics["train_pairs_per_s"],
        "stage_wall_time_s": round(elapsed, 1),
        "train_cpu_s": round(train_clock["cpu_s"], 1),
        "train_wall_s": round(train_clock["wall_s"], 1),
        "peak_rss_mb": round(peak_rss_mb),
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "config": {k: v for k, v in values.items() if k not in ("dataset_name", "output_dir")},
    }
    (out / "bench_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    settings = {"prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "min_gap": args.min_gap, "max_pairs": args.max_pairs,
                "threads": args.threads, "seed": args.seed, "torch": torch.__version__,
                "reward_config_file": args.config, "reward_config": result["config"]}  # fmt: skip
    skip = {"date", "machine", "command", "config", "load_average_1_5_15_at_end"}
    record.write({k: v for k, v in result.items() if k not in skip}, settings)
    return 0


def clock_training() -> dict:
    """Record wall time and process CPU time (user + system) spent inside ``trainer.train()``.

    On a machine shared with other jobs the wall time grows with their load; CPU time / threads is
    what the training would take on otherwise idle cores.
    """
    from reward.trainer import PairwiseRewardTrainer

    clock = {"cpu_s": 0.0, "wall_s": 0.0}
    original = PairwiseRewardTrainer.train

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def timed_train(self, *args, **kwargs):
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            clock["cpu_s"] += cpu_seconds() - cpu0
            clock["wall_s"] += time.perf_counter() - wall0

    PairwiseRewardTrainer.train = timed_train
    return clock


def untrained_accuracy(cfg) -> float:
    """Held-out accuracy of the same RM before training (LoRA at zero, randomly initialised head)."""
    import torch

    from reward.evaluate import evaluate_pairs
    from reward.modeling import build_reward_model
    from reward.scorer import RewardScorer
    from rlhf.pairs import load_splits
    from rlhf.models import load_tokenizer

    _, held = load_splits(cfg)
    model = build_reward_model(cfg.model_name_or_path, cfg.sft_adapter, torch.float32, torch.device("cpu"), cfg.seed)
    scorer = RewardScorer.from_model(model, load_tokenizer(cfg.model_name_or_path), cfg.max_length)
    return evaluate_pairs(scorer, held, cfg.per_device_eval_batch_size)["accuracy"]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} threads {threads}, {platform.system()}"


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


if __name__ == "__main__":
    sys.exit(main())
