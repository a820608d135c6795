"""What the demo's target (0.85 of the greedy comparisons under the rule) asks of a policy.

The demo's rule (``reward.rules.rule_score``) scores an answer by how close its word count is to
``TARGET_WORDS`` and whether it ends with a full stop; SFT's greedy answers to the 44 held-out prompts are
the baseline. This reads SFT's answers from a demo eval (``eval.json``) or from an earlier record of this
benchmark (each record keeps them, as ``sft_answers``) and reports

* the win rate an idealised policy would reach whose every answer ends with "." and has ``TARGET_WORDS +- s``
  words (each count in that range equally likely; ties count half), for several spreads ``s``;
* SFT's answers by length (short, near the target, cut off long) and, for each ``demo_ppo_probe`` record
  given, what its policies won and lost in each group, and how many of all its wins and losses were by less
  than the labelers' tie gap (``rule_min_gap`` of the demo config: pairs that close are never labelled, so the
  reward model is never told which of the two is better)::

    python bench/demo_target_ceiling.py --eval WORK/eval/eval.json \\
        --probe bench/results/demo_ppo_oracle_probe.json --out bench/results/demo_target_ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from bench_record import Record

from reward.rules import TARGET_WORDS, ends_with_full_stop, rule_score, word_count
from rlhf.evaluate import win_rate


def ideal_win_rate(baseline_scores: list[float], spread: int) -> float:
    """Expected win rate of answers that end with "." and have TARGET_WORDS +- spread words (uniform)."""
    words = range(max(1, TARGET_WORDS - spread), TARGET_WORDS + spread + 1)
    ideal = [rule_score(None, " ".join(["w"] * (w - 1) + ["w."])) for w in words]
    return sum(win_rate([s] * len(baseline_scores), baseline_scores)["win_rate"] for s in ideal) / len(ideal)


def sft_answers(path: str) -> list[str]:
    """SFT's answers from a demo eval.json (its baselines) or from an earlier record of this benchmark."""
    data = json.loads(Path(path).read_text())
    if "samples" in data:
        return [s["baseline"] for s in data["samples"]]
    return data["figures"]["sft_answers"]


def group(words: int) -> str:
    if words < 0.6 * TARGET_WORDS:
        return "short"
    return "near" if words <= 1.4 * TARGET_WORDS else "long"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True,
                        help="a demo eval.json (its baseline answers are SFT's) or an earlier record of this benchmark")
    parser.add_argument("--probe", action="append", default=[], help="a demo_ppo_probe record (repeatable)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                        help="the demo config whose rule_min_gap is the labelers' tie gap")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    min_gap = float(yaml.safe_load(Path(args.config).read_text())["rule_min_gap"])
    record = Record("demo_target_ceiling", argv, path=args.out)
    baselines = sft_answers(args.eval)
    baseline_scores = [rule_score(None, b) for b in baselines]
    groups = [group(word_count(b)) for b in baselines]
    sft = {}
    for g in ("short", "near", "long"):
        members = [b for b, gg in zip(baselines, groups) if gg == g]
        sft[g] = {"answers": len(members),
                  "mean_words": round(sum(map(word_count, members)) / max(1, len(members)), 1),
                  "ending_with_full_stop": sum(map(ends_with_full_stop, members))}
    figures = {
        "target_words": TARGET_WORDS,
        "labelers_tie_gap": min_gap,
        "ideal_policy_win_rate_by_spread": {s: round(ideal_win_rate(baseline_scores, s), 3)
                                            for s in (0, 2, 3, 5, 6, 8, 10)},
        "sft_groups": sft,
        "probes": {},
        "sft_answers": baselines,
    }
    for path in args.probe:
        for name, run in json.loads(Path(path).read_text())["figures"].items():
            policy = run["policy_answers"]
            if len(policy) != len(baselines):
                raise SystemExit(f"error: {path} {name}: {len(policy)} answers, the eval has {len(baselines)}")
            scores = [rule_score(None, p) for p in policy]
            gaps = [p - b for p, b in zip(scores, baseline_scores)]
            by_group = {}
            for g in ("short", "near", "long"):
                rows = [i for i, gg in enumerate(groups) if gg == g]
                counts = win_rate([scores[i] for i in rows], [baseline_scores[i] for i in rows]) if rows else {}
                by_group[g] = {
                    "wins": counts.get("wins", 0),
                    "losses": counts.get("losses", 0),
                    "decided_within_tie_gap": sum(0 < abs(gaps[i]) < min_gap for i in rows),
                    "policy_mean_words": round(sum(word_count(policy[i]) for i in rows) / max(1, len(rows)), 1),
                    "policy_ending_with_full_stop": sum(ends_with_full_stop(policy[i]) for i in rows),
                }
            by_group["all"] = {"wins": sum(g > 0 for g in gaps), "losses": sum(g < 0 for g in gaps),
                               "wins_within_tie_gap": sum(0 < g < min_gap for g in gaps),
                               "losses_within_tie_gap": sum(-min_gap < g < 0 for g in gaps)}
            figures["probes"][f"{Path(path).stem}:{name}"] = by_group
    print(json.dumps({k: v for k, v in figures.items() if k != "sft_answers"}, indent=1))
    record.write(figures, {"eval": args.eval, "probes": args.probe})


if __name__ == "__main__":
    main()
