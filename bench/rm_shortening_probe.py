"""Does the reward model agree with the labelling rule about shortening an answer?

PPO against the demo's RM keeps shortening its greedy answers, while the rule wants about 20 words. This probe
takes the baseline (SFT) answers of an `rlhf eval` run, cuts each to its first sentence or line (where that
is shorter), and asks the RM and the rule which of the two versions is better::

    python bench/rm_shortening_probe.py --eval_json WORK/eval/eval.json --reward_model WORK/reward --rule rule_score \
        --out bench/results/rm_shortening_probe.json

Reported: for how many answers each judge prefers the cut version, and how often the two judges disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

from rlhf.data import prompt_text
from rlhf.evaluate import load_rule


def first_part(text: str) -> str:
    """The answer up to its first sentence end (". ", "! ", "? ") or line break, whichever comes first."""
    match = re.search(r"[.!?](?=\s)|\n", text.strip())
    return text.strip() if match is None else text.strip()[: match.end()].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval_json", required=True)
    parser.add_argument("--reward_model", required=True)
    parser.add_argument("--rule", default="rule_score")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from reward.scorer import RewardScorer

    samples = json.loads(Path(args.eval_json).read_text())["samples"]
    rows = [(s["prompt"], s["baseline"], first_part(s["baseline"])) for s in samples]
    rows = [r for r in rows if r[2] and r[2] != r[1].strip()]
    prompts = [r[0] for r in rows]
    rule = load_rule(args.rule)
    load_before = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None
    start = time.time()
    scorer = RewardScorer.from_pretrained(args.reward_model)
    full_rm, cut_rm = scorer.score(prompts, [r[1] for r in rows]), scorer.score(prompts, [r[2] for r in rows])
    full_rule = [rule(prompt_text(p), r[1]) for p, r in zip(prompts, rows)]
    cut_rule = [rule(prompt_text(p), r[2]) for p, r in zip(prompts, rows)]
    rm_cut = [c > f for c, f in zip(cut_rm, full_rm)]
    rule_cut = [c > f for c, f in zip(cut_rule, full_rule)]
    rule_full = [c < f for c, f in zip(cut_rule, full_rule)]
    result = {
        "command": "python bench/rm_shortening_probe.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
        "code": "commit " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
        "load_average_before": load_before,
        "seconds": round(time.time() - start, 1),
        "answers": len(samples), "answers_with_a_shorter_first_part": len(rows),
        "rm_prefers_the_cut": sum(rm_cut), "rule_prefers_the_cut": sum(rule_cut),
        "rule_prefers_the_whole": sum(rule_full),
        "rm_prefers_the_cut_where_the_rule_prefers_the_whole": sum(a and b for a, b in zip(rm_cut, rule_full)),
        "rm_agrees_where_the_rule_prefers_one": sum((a and b) or (not a and c)
                                                    for a, b, c in zip(rm_cut, rule_cut, rule_full)),
        "rows": [{"prompt": prompt_text(p), "whole": r[1], "cut": r[2], "rm_whole": f, "rm_cut": c,
                  "rule_whole": fr, "rule_cut": cr}
                 for p, r, f, c, fr, cr in zip(prompts, rows, full_rm, cut_rm, full_rule, cut_rule)],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
