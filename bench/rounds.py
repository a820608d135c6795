"""Iterative RLHF at an equal label count: one round of the demo against two rounds of half its prompts.

``rlhf pipeline --config configs/demo.yaml`` with ``rounds: 2`` and ``candidates.max_prompts`` halved: round 1
labels the candidates of half the prompts, round 2 samples every prompt from round 1's aligned policy and
labels as many comparisons as round 1 did (``round_label_budget: null``), so both arms spend the same number
of comparisons. The one-round arm is the demo itself (``rounds: 1``, every prompt's candidates). Each round's
eval judges its aligned policy against SFT on the 44 held-out prompts, greedy, under the rule and the RM.

    python bench/rounds.py --work WORK [--sft_from DEMO_WORK]

Arms run one after the other in WORK/one and WORK/two, on one SFT adapter (trained in the first arm, copied
to the second; ``--sft_from`` copies that of a finished demo run instead: the same config and seed give the
same adapter). Record: bench/results/rounds_equal_labels.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_record import Record  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--sft_from", default=None, help="a finished demo work_dir whose sft/ is copied")
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    record = Record("rounds_equal_labels", argv, path=args.record)
    base = yaml.safe_load(Path(args.config).read_text())
    prompts = base["candidates"]["max_prompts"]
    sft_from = Path(args.sft_from) / "sft" if args.sft_from else None
    figures = {}
    for arm, rounds, max_prompts in (("one", 1, prompts), ("two", 2, prompts // 2)):
        work = Path(args.work) / arm
        work.mkdir(parents=True, exist_ok=True)
        cfg = {**base, "work_dir": str(work), "rounds": rounds, "round_label_budget": None,
               "candidates": {**base["candidates"], "max_prompts": max_prompts}}
        config = work / "rounds_config.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if sft_from and not (work / "sft").exists():
            shutil.copytree(sft_from, work / "sft")
        subprocess.run([str(Path(sys.executable).with_name("rlhf")), "pipeline", "--config", str(config)], check=True)
        sft_from = sft_from or work / "sft"
        summary = json.loads((work / "summary.json").read_text())
        folders = [work] + [work / f"round-{r}" for r in range(2, rounds + 1)]
        figures[arm] = {
            "rounds": summary.get("rounds") or [{"round": 1, **{k: v for k, v in summary.items() if k != "plots"}}],
            "comparisons_created": [json.loads((f / "candidates.json").read_text())["new_comparisons"] for f in folders],
            "votes": [sum(json.loads((f / "label.json").read_text())["votes"].values()) for f in folders],
            "total_seconds": summary.get("all_rounds_seconds", summary["total_seconds"]),
        }
    settings = {"config": args.config, "arms": {"one": {"rounds": 1, "max_prompts": prompts},
                                                "two": {"rounds": 2, "max_prompts_per_round": prompts // 2,
                                                        "round_label_budget": "null (= round 1's comparisons)"}},
                "sft_copied_from": args.sft_from}
    record.write(figures, settings)
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
