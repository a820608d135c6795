"""Re-score the samples a PPO run logged (``logs/samples.jsonl``) with the reward model's own text path.

PPO logs each sample's raw score as its loop computed it; ``RewardScorer.score`` encodes the prompt and
response as in reward training (``prompt + response + EOS``). Where the two differ, PPO optimised something
other than what the RM says (e.g. a cut-off response scored at its last generated token).

    python bench/rescore_samples.py --samples PPO_OUT/logs/samples.jsonl --reward_model RM --record NAME
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_record import Record  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", required=True)
    ap.add_argument("--reward_model", required=True)
    ap.add_argument("--record", default="rescored_samples")
    args = ap.parse_args(argv)
    record = Record(args.record, argv)
    from reward import RewardScorer

    rows = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()]
    text = RewardScorer.from_pretrained(args.reward_model).score([r["prompt"] for r in rows],
                                                                [r["response"] for r in rows])
    samples = [{"step": r["step"], "logged_score": round(r["score"], 3), "rm_text_score": round(t, 3),
                "ends_with": r["response"][-40:]} for r, t in zip(rows, text)]
    for s in samples:
        print(s)
    record.write({"samples": samples}, {"samples": args.samples, "reward_model": args.reward_model})
    return {"samples": samples}


if __name__ == "__main__":
    main()
