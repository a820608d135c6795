"""What scoring each distinct response once per batch saves: `rlhf reward` with `batch_by_prompt` false / true.

The same preference file (e.g. a pipeline work folder's prefs.jsonl: several comparisons per prompt among
its K candidates), the same config and number of optimizer steps; runs alternate between the two settings
so both see the same machine load. Reported per run: training seconds (TRL's train_runtime) and seconds
per step; for the data: sequences per epoch without and with de-duplication (batches of
per_device_train_batch_size pairs, prompt-grouped order).

    python bench/reward_batching.py --prefs WORK/prefs.jsonl --steps 12 --repeats 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import Record  # noqa: E402


def sequences_per_epoch(rows: list[dict], batch: int, grouped: bool, seed: int = 0) -> int:
    """Distinct (prompt, response) sequences summed over the batches of one epoch."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append(i)
    rng = random.Random(seed)
    if grouped:
        keys = list(groups)
        rng.shuffle(keys)
        order = [i for k in keys for i in groups[k]]
    else:
        order = list(range(len(rows)))
        rng.shuffle(order)
    total = 0
    for start in range(0, len(order), batch):
        seqs = set()
        for i in order[start : start + batch]:
            p = json.dumps(rows[i]["prompt"], sort_keys=True)
            seqs.update({(p, json.dumps(rows[i]["chosen"])), (p, json.dumps(rows[i]["rejected"]))})
        total += len(seqs)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefs", required=True)
    parser.add_argument("--config", default="configs/reward.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="record path (default bench/results/reward_batching.json)")
    parser.add_argument("overrides", nargs="*", help="key=value passed to rlhf reward as --key value")
    args = parser.parse_args()
    record = Record("reward_batching", path=args.out)
    rows = [json.loads(line) for line in Path(args.prefs).read_text().splitlines() if line.strip()]
    extra = [x for kv in args.overrides for x in ("--" + kv.split("=", 1)[0], kv.split("=", 1)[1])]
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    runs = []
    for repeat in range(args.repeats):
        for grouped in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [rlhf, "reward", "--config", args.config, "--dataset_name", args.prefs, "--eval_fraction", "0",
                       "--output_dir", f"{tmp}/rm", "--max_steps", str(args.steps), "--report_to", "none",
                       "--stats_max_pairs", "8", "--batch_by_prompt", str(grouped).lower(), *extra]
                subprocess.run(cmd, check=True)
                metrics = json.loads(Path(f"{tmp}/rm/metrics.json").read_text())
            runs.append({"repeat": repeat, "batch_by_prompt": grouped, "train_runtime_s": metrics["train_runtime_s"],
                         "s_per_step": round(metrics["train_runtime_s"] / metrics["steps"], 3)})
            print(json.dumps(runs[-1]), file=sys.stderr)
    import yaml

    batch = int({**yaml.safe_load(Path(args.config).read_text()), **dict(kv.split("=", 1) for kv in args.overrides)}
                .get("per_device_train_batch_size", 8))
    mean = lambda g: sum(r["train_runtime_s"] for r in runs if r["batch_by_prompt"] == g) / args.repeats  # noqa: E731
    figures = {
        "runs": runs,
        "train_runtime_ratio_grouped_vs_pairs": round(mean(True) / mean(False), 3),
        "pairs": len(rows),
        "prompts": len({json.dumps(r["prompt"], sort_keys=True) for r in rows}),
        "sequences_per_epoch": {"no_dedup": 2 * len(rows),
                                "dedup_random_order": sequences_per_epoch(rows, batch, grouped=False),
                                "dedup_prompt_order": sequences_per_epoch(rows, batch, grouped=True)},
    }
    record.write(figures, {"prefs": args.prefs, "config": args.config, "steps": args.steps, "repeats": args.repeats,
                           "overrides": args.overrides})
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
