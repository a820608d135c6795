"""Single, length-debiased and ensemble reward models on one set of pairs, each trained with the shipped config.

Each variant runs ``rlhf reward --config configs/reward.yaml`` on a finished demo run's pairs, overriding only
paths, the seed and the variant's own keys, and reports what the stage measured on the held-out pairs (accuracy,
reward–length correlation, seconds)::

    python bench/reward_variants.py --work DEMO_WORK --out OUT --record bench/results/NAME.json \\
        --variant single: --variant length_head:length_debias=length_head --variant ensemble3:ensemble=3

A variant is ``NAME:key=value,...`` as in ``bench/demo_ppo_probe.py``. What PPO reaches with each RM: that
script's ``--variant NAME:reward_model=OUT/NAME/rm``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_record import Record
from demo_ppo_probe import add_variant_arguments, parse_variant

ROOT = Path(__file__).resolve().parents[1]
REPORTED = ("eval_accuracy", "eval_length_correlation", "eval_length_head_correlation", "eval_member_accuracy",
            "eval_member_length_correlation", "eval_accuracy_min", "eval_accuracy_mean_minus_std", "eval_pairs",
            "train_pairs", "train_runtime_s", "ensemble", "pooling")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a finished demo work_dir (prefs.jsonl, prefs.test.jsonl)")
    parser.add_argument("--seed", type=int, default=42)
    add_variant_arguments(parser)
    args = parser.parse_args(argv)
    record = Record("reward_variants", argv, path=args.record)
    work, out = Path(args.work), Path(args.out)
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    figures = {}
    for name, keys in map(parse_variant, args.variant):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {**yaml.safe_load((ROOT / "configs" / "reward.yaml").read_text()),
                  "dataset_name": str(work / "prefs.jsonl"), "eval_dataset_name": str(work / "prefs.test.jsonl"),
                  "output_dir": str(folder / "rm"), "seed": args.seed, "report_to": "none", **keys}
        path = folder / "reward.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"[{name}] rlhf reward --config {path}", file=sys.stderr)
        start = time.perf_counter()
        subprocess.run([rlhf, "reward", "--config", str(path)], check=True)
        wall = time.perf_counter() - start
        metrics = json.loads((folder / "rm" / "metrics.json").read_text())
        figures[name] = {"keys": keys, "stage_wall_s": round(wall, 1),
                         **{k: metrics[k] for k in REPORTED if k in metrics}}
        print(f"[{name}] held-out accuracy {metrics.get('eval_accuracy')}, reward-length correlation "
              f"{metrics.get('eval_length_correlation')}, {wall:.0f} s", file=sys.stderr)
    record.write(figures, {"work": str(work), "config": "configs/reward.yaml", "seed": args.seed})


if __name__ == "__main__":
    main()
