"""The record of a two-round pipeline run (``rlhf pipeline --rounds 2``) whose round 1 is a finished demo run.

Reads the work folder the pipeline wrote (``summary.json``, each round's ``candidates.json``, ``label.json``,
``prefs.jsonl``, reward ``metrics.json`` and ``eval/eval.json``) and writes the figures of round 2 with the
statistics of its preference pairs: how many, how long the chosen and rejected answers are, how often the chosen
one is the shorter, and how many end with a full stop. A pair counts as round 2's when neither of its answers is
among round 1's. Timing and load are given as the shell measured them around the pipeline command::

    cp -a DEMO WORK; uptime; time rlhf pipeline --config CONFIG --work_dir WORK --rounds 2; uptime
    python bench/round2_record.py --work WORK --out bench/results/NAME.json --what "..." --command "..." \\
        --config_note "..." --start UTC --end UTC --load_before "UPTIME" --load_after "UPTIME" \\
        --wall_s REAL --user_s USER [--compare_curve]

``--compare_curve`` adds seed 42's step-18 figures of ``demo_ppo_curve_probe.json`` (PPO run on against round 1's RM).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_record import RESULTS, git_commit, machine, read_jsonl


def words(text: str) -> int:
    return len(text.split())


def pair_stats(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "pairs": n,
        "chosen_shorter": sum(words(r["chosen"]) < words(r["rejected"]) for r in rows),
        "chosen_mean_words": round(sum(words(r["chosen"]) for r in rows) / n, 2),
        "rejected_mean_words": round(sum(words(r["rejected"]) for r in rows) / n, 2),
        "rejected_not_ending_with_full_stop": sum(not r["rejected"].rstrip().endswith(".") for r in rows),
        "chosen_ending_with_full_stop": sum(r["chosen"].rstrip().endswith(".") for r in rows),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("work", "out", "what", "command", "config_note", "start", "end", "load_before", "load_after"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--wall_s", type=float, required=True)
    parser.add_argument("--user_s", type=float, required=True)
    parser.add_argument("--compare_curve", action="store_true")
    args = parser.parse_args(argv)
    work, r2 = Path(args.work), Path(args.work) / "round-2"
    load = lambda path: json.loads(path.read_text())  # noqa: E731
    summary, ev = load(work / "summary.json"), load(r2 / "eval" / "eval.json")
    rm1, rm2 = load(work / "reward" / "metrics.json"), load(r2 / "reward" / "metrics.json")
    round1_train = read_jsonl(work / "prefs.jsonl")
    round1_answers = {(r["prompt"], text) for r in round1_train + read_jsonl(work / "prefs.test.jsonl")
                      for text in (r["chosen"], r["rejected"])}
    all_train = read_jsonl(r2 / "prefs.jsonl")
    new = [r for r in all_train
           if (r["prompt"], r["chosen"]) not in round1_answers and (r["prompt"], r["rejected"]) not in round1_answers]
    answers = [s["policy"] for s in ev["samples"]]
    compare = None
    if args.compare_curve:
        curve = load(RESULTS / "demo_ppo_curve_probe.json")["figures"]["curve27"]["curve"]
        step18 = next(c for c in curve if c["step"] == 18)
        compare = {"source": "bench/results/demo_ppo_curve_probe.json, seed 42, step 18",
                   "rule_win_rate": step18["rule"]["win_rate"], "kl": step18["kl_policy_to_baseline"],
                   "words": step18["response_words"]["policy"]}
    record = {
        "benchmark": "demo_round2_probe", "what": args.what, "command": args.command, "config": args.config_note,
        "code": f"commit {git_commit()}", "machine": machine(), "date": f"{args.start} - {args.end}",
        "load": {"uptime_before": args.load_before, "uptime_after": args.load_after},
        "wall_s": args.wall_s, "user_s": args.user_s,
        "round1": {"rm_heldout_accuracy": rm1["eval_accuracy"],
                   "rm_length_correlation": rm1.get("eval_length_correlation"),
                   "pairs_train": pair_stats(round1_train)},
        "round2_stage_seconds": {r["stage"]: r["seconds"] for r in summary["stages"]},
        "round2_total_seconds": summary["total_seconds"],
        "round2_candidates": load(r2 / "candidates.json"), "round2_votes": load(r2 / "label.json")["votes"],
        "round2_train_pairs_between_round2_answers": pair_stats(new), "round2_all_train_pairs": pair_stats(all_train),
        "round2_reward": {k: rm2[k] for k in ("train_pairs", "eval_pairs", "eval_prompts", "steps", "eval_accuracy",
                                              "eval_length_correlation", "pooling", "wall_time_s")},
        "round2_eval": {
            "rule": {k: v for k, v in ev["rule"].items() if not isinstance(v, list)},
            "reward_model": {k: v for k, v in ev["reward_model"].items() if not isinstance(v, list)},
            "kl_to_sft": ev["kl_policy_to_baseline"], "response_words": ev["response_words"],
            "unchanged": ev["unchanged"], "length_controlled": ev.get("length_controlled"),
            "policy_answers_ending_with_full_stop": sum(a.rstrip().endswith(".") for a in answers),
            "empty_policy_answers": sum(not a.strip() for a in answers), "policy_answers": answers,
        },
        "compare_same_seed_18_steps_one_rm": compare,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    rule = record["round2_eval"]["rule"]
    print(f"round 2: rule win rate {rule['win_rate']:.3f} ({rule['wins']}/{rule['ties']}/{rule['losses']}) "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
