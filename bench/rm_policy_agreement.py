"""Does the reward model still rank answers as the labelling rule does once the policy has moved?

An RM is checked on held-out pairs of the candidates it was trained on. PPO then moves the policy off that
distribution, and the RM's verdict on the new answers is what PPO optimises. This probe takes `rlhf eval` runs
(greedy policy and baseline answers to the same prompts) and counts, among the pairs the rule decides (different
rule scores), how often the RM prefers the same answer::

    python bench/rm_policy_agreement.py --reward_model WORK/reward --rule rule_score \
        --eval_json WORK/eval/eval.json [more eval.json ...] --out bench/results/rm_policy_agreement.json

Reported per eval: decided pairs, agreement, the disagreements by which answer the RM favours, and the same split by
whether the policy's answer has fewer words.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_record import Record

from rlhf.data import prompt_text
from rlhf.evaluate import load_rule


def agreement(pairs: list[tuple[float, float, float, float]]) -> dict:
    """``pairs`` of (rm policy, rm baseline, rule policy, rule baseline): on those the rule decides, how often the
    RM's preference is the rule's."""
    decided = [(a - b, c - d) for a, b, c, d in pairs if c != d]
    agree = sum((rm > 0) == (rule > 0) for rm, rule in decided)
    return {"decided": len(decided), "rm_agrees": agree,
            "agreement": round(agree / len(decided), 3) if decided else None,
            "rm_for_policy_rule_for_baseline": sum(rm > 0 > rule for rm, rule in decided),
            "rm_for_baseline_rule_for_policy": sum(rm <= 0 < rule for rm, rule in decided)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward_model", required=True)
    parser.add_argument("--rule", default="rule_score")
    parser.add_argument("--eval_json", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    record = Record("rm_policy_agreement", path=args.out)

    from reward.scorer import RewardScorer

    rule = load_rule(args.rule)
    scorer = RewardScorer.from_pretrained(args.reward_model)
    figures = {}
    for path in args.eval_json:
        samples = json.loads(Path(path).read_text())["samples"]
        prompts = [s["prompt"] for s in samples]
        rm_policy = scorer.score(prompts, [s["policy"] for s in samples])
        rm_base = scorer.score(prompts, [s["baseline"] for s in samples])
        rows = [(rp, rb, rule(prompt_text(p), s["policy"]), rule(prompt_text(p), s["baseline"]),
                 len(s["policy"].split()) < len(s["baseline"].split()))
                for p, s, rp, rb in zip(prompts, samples, rm_policy, rm_base)]
        figures[path] = {
            "all": agreement([r[:4] for r in rows]),
            "policy_answer_shorter": agreement([r[:4] for r in rows if r[4]]),
            "policy_answer_not_shorter": agreement([r[:4] for r in rows if not r[4]]),
        }
        print(path, json.dumps(figures[path]), flush=True)
    record.write(figures, {"reward_model": args.reward_model, "rule": args.rule})


if __name__ == "__main__":
    main()
