"""Best-of-n from the SFT policy: how far does picking among SFT's own samples get against its greedy answers?

A best-of-n sampler stays within log n - (n - 1) / n nats of the sampler it picks from (Stiennon et al., 2020), so
its win rate at a given n tells what a policy that close to SFT can reach. The picker is either the labelers' rule
itself (``rule``: an upper bound for any reward model) or a reward model (``rm``: the demo's, or ``--reward_model``;
``--reuse_samples`` scores an earlier run's samples again). Each pick is judged
by the rule against SFT's greedy answer to the same held-out prompt, as ``rlhf eval`` judges the demo::

    python bench/bon_ceiling.py --demo WORK --out OUT --samples 32 --temperature 0.7 \\
        --record bench/results/bon_ceiling.json

``WORK``: a finished ``make demo`` folder (``sft/``, ``reward/`` and ``eval/eval.json``, whose baseline answers are
SFT's greedy ones). The N samples per prompt come from ``rlhf generate``; the win rate of best-of-n is its
expectation over every n of the N samples (:func:`expected_best_of`), not one draw.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

from bench_record import Record, read_jsonl

from reward.rules import rule_score
from reward.scorer import RewardScorer

ROOT = Path(__file__).resolve().parents[1]


def expected_best_of(picker: list[float], outcome: list[float], n: int, seed: int = 0) -> float:
    """E[outcome of the sample with the highest ``picker`` score] over a uniformly drawn n of the N samples.

    With the samples sorted by ``picker`` ascending (equal scores in a seeded random order, as a pick among equals
    would be), the i-th (1-based) is the best of a random n-subset with probability C(i - 1, n - 1) / C(N, n).
    """
    total = len(picker)
    if not 1 <= n <= total or len(outcome) != total:
        raise ValueError("need 1 <= n <= N and one outcome per sample")
    rng = random.Random(seed)
    order = sorted(range(total), key=lambda i: (picker[i], rng.random()))
    denominator = math.comb(total, n)
    return sum(math.comb(rank - 1, n - 1) / denominator * outcome[i] for rank, i in enumerate(order, start=1))


def outcome(policy: float, baseline: float) -> float:
    """1 for a win, 0.5 for a tie, 0 for a loss (as ``rlhf eval``'s win rate counts them)."""
    return 1.0 if policy > baseline else 0.5 if policy == baseline else 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished demo work_dir (sft/, reward/, eval/eval.json)")
    parser.add_argument("--out", required=True, help="folder for the samples")
    parser.add_argument("--samples", type=int, default=32, help="N samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--reward_model", help="the RM that picks (default: the demo's, WORK/reward)")
    parser.add_argument("--reuse_samples", action="store_true",
                        help="score OUT/samples.jsonl of an earlier run instead of sampling again (give that run's "
                        "--samples, --temperature and --max_new_tokens: they are recorded, not checked)")
    parser.add_argument("--record", required=True)
    args = parser.parse_args(argv)
    record = Record("bon_ceiling", argv, path=args.record)
    demo, out = Path(args.demo), Path(args.out)
    greedy = json.loads((demo / "eval" / "eval.json").read_text())["samples"]
    baseline = {s["prompt"]: s["baseline"] for s in greedy}
    samples_file = out / "samples.jsonl"
    command = [sys.executable, "-m", "rlhf.cli", "generate", "--adapter", str(demo / "sft"),
               "--dataset_name", "sample:prompts_test", "--do_sample", "true", "--temperature", str(args.temperature),
               "--num_return_sequences", str(args.samples), "--max_new_tokens", str(args.max_new_tokens),
               "--batch_size", "16", "--seed", "42", "--out", str(samples_file)]
    if not args.reuse_samples:
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(command, check=True, cwd=ROOT)
    elif not samples_file.is_file():
        raise SystemExit(f"error: --reuse_samples: no {samples_file} to score")
    rows = read_jsonl(samples_file)
    by_prompt: dict[str, list[str]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row["response"])
    if set(by_prompt) != set(baseline):
        raise SystemExit("error: the samples do not match the eval's prompts")
    if any(len(v) != args.samples for v in by_prompt.values()):
        raise SystemExit(f"error: {samples_file} does not hold --samples {args.samples} answers to every prompt")
    prompts = list(by_prompt)
    reward_model = Path(args.reward_model) if args.reward_model else demo / "reward"
    scorer = RewardScorer.from_pretrained(reward_model)
    flat_prompts = [p for p in prompts for _ in by_prompt[p]]
    flat_answers = [a for p in prompts for a in by_prompt[p]]
    rm_flat = scorer.score(flat_prompts, flat_answers)
    rm_scores = {p: rm_flat[i * args.samples:(i + 1) * args.samples] for i, p in enumerate(prompts)}

    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.samples]
    table = {}
    for picker_name in ("rule", "rm"):
        for n in ns:
            per_prompt = []
            for p in prompts:
                rule = [rule_score(p, a) for a in by_prompt[p]]
                base = rule_score(p, baseline[p])
                picker = rule if picker_name == "rule" else rm_scores[p]
                per_prompt.append({
                    "win_rate": expected_best_of(picker, [outcome(r, base) for r in rule], n),
                    "rule_score": expected_best_of(picker, rule, n),
                    "words": expected_best_of(picker, [len(a.split()) for a in by_prompt[p]], n),
                })
            table[f"{picker_name}_n{n}"] = {
                "picker": picker_name, "n": n,
                "kl_bound_nats": round(math.log(n) - (n - 1) / n, 3),
                "win_rate_vs_sft_greedy": round(sum(x["win_rate"] for x in per_prompt) / len(prompts), 3),
                "mean_rule_score": round(sum(x["rule_score"] for x in per_prompt) / len(prompts), 3),
                "mean_words": round(sum(x["words"] for x in per_prompt) / len(prompts), 1),
            }
            row = table[f"{picker_name}_n{n}"]
            print(f"{picker_name} best-of-{n}: win rate {row['win_rate_vs_sft_greedy']:.3f}, rule score "
                  f"{row['mean_rule_score']:.3f}, {row['mean_words']:.1f} words, KL <= {row['kl_bound_nats']}")
    sft_greedy_rule = sum(rule_score(p, baseline[p]) for p in prompts) / len(prompts)
    record.write(
        {"prompts": len(prompts), "sft_greedy_mean_rule_score": round(sft_greedy_rule, 3), "best_of": table,
         "samples_file": str(samples_file)},
        {"demo": str(demo), "reward_model": str(reward_model), "samples_reused": args.reuse_samples,
         "samples": args.samples, "temperature": args.temperature,
         "max_new_tokens": args.max_new_tokens, "generate_command": None if args.reuse_samples else command[2:],
         "samples_kept": {p: {"answers": by_prompt[p], "rm": [round(s, 4) for s in rm_scores[p]]} for p in prompts}},
    )


if __name__ == "__main__":
    main()
