"""The demo with finer labels: its simulated labelers' tie gap (``rule_min_gap``) changed, every later stage re-run.

Copies a finished demo run's SFT adapter into a new work folder and runs ``rlhf pipeline --config configs/demo.yaml``
there with ``--rule_min_gap GAP``: the candidates (the same ones: sampling is seeded), the labels, the reward model,
PPO and the eval are all redone, so the only change is which pairs the labelers call ties. Records the pipeline's
summary (held-out RM accuracy, pairs, the eval's win rates, stage seconds)::

    python bench/demo_label_gap.py --demo outputs/demo --work OUT --gap 0 --record bench/results/demo_label_gap0.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench_record import Record

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished demo work_dir (its sft/ is reused)")
    parser.add_argument("--work", required=True, help="a new work folder (must not exist)")
    parser.add_argument("--gap", type=float, required=True, help="rule_min_gap of the simulated labelers")
    parser.add_argument("--record", required=True)
    args = parser.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"error: {work} exists; give a new folder")
    record = Record("demo_label_gap", argv, path=args.record)
    work.mkdir(parents=True)
    shutil.copytree(Path(args.demo) / "sft", work / "sft")
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    subprocess.run([rlhf, "pipeline", "--config", str(ROOT / "configs" / "demo.yaml"), "--work_dir", str(work),
                    "--rule_min_gap", str(args.gap)], check=True)
    summary = json.loads((work / "summary.json").read_text())
    evaluation = json.loads((work / "eval" / "eval.json").read_text())
    pairs = {name: sum(1 for line in (work / name).read_text().splitlines() if line.strip())
             for name in ("prefs.jsonl", "prefs.test.jsonl")}
    figures = {"summary": summary, "pairs": pairs, "rule": evaluation["rule"], "reward_model": evaluation["reward_model"],
               "kl_policy_to_baseline": evaluation["kl_policy_to_baseline"],
               "response_words": evaluation["response_words"],
               "policy_answers": [s["policy"] for s in evaluation["samples"]]}
    print(json.dumps({k: v for k, v in figures.items() if k != "policy_answers"}, indent=1))
    record.write(figures, {"demo": args.demo, "work": args.work, "rule_min_gap": args.gap})


if __name__ == "__main__":
    main()
