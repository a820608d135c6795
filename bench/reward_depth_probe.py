"""Which depth of the frozen embedded model carries what a rule reads? An L2 Bradley-Terry probe per depth.

The candidates of a pipeline work folder are paired and labelled as in ``bench/reward_defaults.py`` (same
rules, same prompt split and pair cap), plus the demo's ``rule_score`` (ties under 0.1). Every distinct
response is run once through the frozen base model; at each depth (0 = the input embeddings, N = block N's
output) the last token's state and the mean over the response's tokens are concatenated, and
``reward.probe.probe_weights`` fits a head to the training pairs (penalty by cross-validation over prompts).
The held-out accuracy of every depth is recorded: no fine-tuning, so it shows what each depth offers a head.
``--combos 0+20,...`` also fits one probe on several depths' features side by side.

    python bench/reward_depth_probe.py --work WORK --out bench/results/reward_depth_probe.json [--combos 0+20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import git_commit, machine  # noqa: E402
from reward_defaults import RULES, candidates, labelled_pairs, split_pairs  # noqa: E402


def probe_pairs(features: torch.Tensor, index: dict, train: list[dict], test: list[dict]) -> dict:
    """``reward.probe.probe_weights`` fitted to the training pairs on ``features`` (N, D), the row of a response
    being ``index[(prompt, response)]``; its held-out accuracy on ``test`` and the probe's summary."""
    from reward.probe import probe_weights

    def side(rows, which):
        return features[[index[(r["prompt"], r[which])] for r in rows]]
    weights, summary = probe_weights(side(train, "chosen"), side(train, "rejected"), [r["prompt"] for r in train])
    held = (side(test, "chosen").double() - side(test, "rejected").double()) @ weights > 0
    return {"held_out_accuracy": round(float(held.double().mean()), 4), **summary}


def main() -> None:
    from reward.modeling import encode_for_reward, pad_right
    from reward.pooling import last_token_index, position_ids_from_mask
    from reward.rules import rule_prefers
    from rlhf.models import load_base_model, load_tokenizer, resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="pipeline work folder with labels.db (candidates)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--depths", default="0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30")
    ap.add_argument("--combos", default="", help="comma-separated groups of depths joined by +, e.g. 0+20,12+20")
    ap.add_argument("--max_train_pairs", type=int, default=300)
    ap.add_argument("--test_fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--out", default="bench/results/reward_depth_probe.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    depths = [int(d) for d in args.depths.split(",")]
    combos = [[int(d) for d in c.split("+")] for c in args.combos.split(",") if c]
    missing = sorted({d for c in combos for d in c} - set(depths))
    if missing:
        raise SystemExit(f"error: --combos uses depths not in --depths: {missing}")
    rules = dict(RULES, demo_rule_score=lambda p, a, b: rule_prefers(p, a, b, min_gap=0.1))
    cands = candidates(Path(args.work) / "labels.db")
    path = resolve_model_path(args.model)
    tokenizer, model = load_tokenizer(path), load_base_model(path).eval()
    texts = sorted({(p, r) for p, rs in cands.items() for r in rs})
    index = {t: i for i, t in enumerate(texts)}
    seqs, response_lens = encode_for_reward(tokenizer, [t[0] for t in texts], [t[1] for t in texts], args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start, rows = time.perf_counter(), []
    with torch.no_grad():
        for i in range(0, len(seqs), 16):
            chunk = seqs[i : i + 16]
            ids, mask = pad_right(chunk, pad)
            hidden = torch.stack(model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                       output_hidden_states=True).hidden_states, 1)[:, depths]  # (B, D, T, H)
            response = torch.zeros(mask.shape)
            for j, s in enumerate(chunk):  # the response's tokens and its EOS (right padding)
                response[j, len(s) - min(response_lens[i + j] + 1, len(s)) : len(s)] = 1
            last = hidden[torch.arange(len(chunk)), :, last_token_index(mask)]  # (B, D, H)
            mean = (hidden * response[:, None, :, None]).sum(2) / response.sum(1)[:, None, None]
            rows.append(torch.cat([last, mean], -1))  # (B, D, 2H)
    features = torch.cat(rows)  # (N, D, 2H)
    record = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), "load_avg_before": round(os.getloadavg()[0], 2),
              "commit": git_commit(),
              "command": " ".join(sys.argv), "responses": len(texts),
              "feature_seconds": round(time.perf_counter() - start, 1), "rules": {}}
    for name, rule in rules.items():
        train, test = split_pairs(labelled_pairs(cands, rule), args.seed, args.test_fraction, args.max_train_pairs)
        per_depth = {}
        for key, group in [(str(d), [d]) for d in depths] + [("+".join(map(str, c)), c) for c in combos]:
            columns = [depths.index(d) for d in group]
            per_depth[key] = probe_pairs(features[:, columns].flatten(1), index, train, test)
            print(name, key, per_depth[key], flush=True)
        record["rules"][name] = {"train_pairs": len(train), "test_pairs": len(test), "depths": per_depth}
    record["load_avg_after"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
