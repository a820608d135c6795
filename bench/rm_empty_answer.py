"""Does a reward model score an empty answer above a real one? It was never shown one labelled.

For each reward model, scores an empty answer and the baseline's (SFT's) greedy answer to each prompt of an
``rlhf eval`` output, normalised as PPO normalises them (the RM's saved mean and std), and counts the prompts where
the empty answer scores higher, without and with PPO's ``empty_response_penalty``::

    python bench/rm_empty_answer.py --eval_json WORK/eval/eval.json --reward_model RM [RM ...] \\
        [--policy_eval_json POLICY_EVAL.json] --record bench/results/rm_empty_answer.json

``--policy_eval_json``: another eval output whose policy answers are checked for empty ones, and whether their
prompts are among those where the first RM prefers the empty answer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_record import Record

from reward.scorer import RewardScorer

PENALTIES = (0.0, -0.5, -1.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval_json", required=True, help="an rlhf eval output: prompts and baseline answers")
    parser.add_argument("--reward_model", nargs="+", required=True)
    parser.add_argument("--policy_eval_json", default=None)
    parser.add_argument("--record", required=True)
    args = parser.parse_args(argv)
    record = Record("rm_empty_answer", argv, path=args.record)
    samples = json.loads(Path(args.eval_json).read_text())["samples"]
    prompts = [s["prompt"] for s in samples]
    figures: dict = {"prompts": len(prompts), "reward_models": {}}
    preferred_empty = None
    for path in args.reward_model:
        scorer = RewardScorer.from_pretrained(path)
        stats = json.loads((Path(path) / "reward_stats.json").read_text())

        def normalised(values):
            return [(v - stats["mean"]) / stats["std"] for v in values]

        empty = normalised(scorer.score(prompts, [""] * len(prompts)))
        baseline = normalised(scorer.score(prompts, [s["baseline"] for s in samples]))
        wins = {str(p): [i for i, (e, b) in enumerate(zip(empty, baseline)) if e + p > b] for p in PENALTIES}
        figures["reward_models"][path] = {
            "empty_beats_baseline": {p: len(rows) for p, rows in wins.items()},
            "largest_margin_of_empty": {str(p): round(max(e + p - b for e, b in zip(empty, baseline)), 3)
                                        for p in PENALTIES},
            "mean_normalised_score": {"empty": round(sum(empty) / len(empty), 3),
                                      "baseline": round(sum(baseline) / len(baseline), 3)},
            "prompts_where_empty_wins": [prompts[i] for i in wins["0.0"]],
        }
        preferred_empty = preferred_empty if preferred_empty is not None else set(wins["0.0"])
        print(f"{path}: the empty answer beats the baseline's on "
              + ", ".join(f"{n} (penalty {p})" for p, n in figures["reward_models"][path]["empty_beats_baseline"].items())
              + f" of {len(prompts)} prompts")
    if args.policy_eval_json:
        policy = json.loads(Path(args.policy_eval_json).read_text())["samples"]
        rows = [i for i, s in enumerate(policy) if not s["policy"].strip()]
        figures["policy_empty_answers"] = {
            "file": args.policy_eval_json, "count": len(rows), "prompts": [policy[i]["prompt"] for i in rows],
            "among_prompts_where_the_first_rm_prefers_empty": sum(i in preferred_empty for i in rows),
        }
        print(f"policy: {len(rows)} empty answers, "
              f"{figures['policy_empty_answers']['among_prompts_where_the_first_rm_prefers_empty']} of them where "
              "the first RM prefers an empty answer to the baseline's")
    record.write(figures, {"eval_json": args.eval_json, "reward_models": args.reward_model,
                           "normalisation": "the RM's reward_stats.json mean and std, as PPO's rm_stats",
                           "penalties": PENALTIES})


if __name__ == "__main__":
    main()
