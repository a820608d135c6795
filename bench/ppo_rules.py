"""The shipped PPO config on preferences labelled by rules it was not tuned on, with other settings per variant.

Takes a pipeline work folder with an SFT adapter and the reward models ``bench/reward_defaults.py`` trained there
(``WORK/rm_defaults_RULE/rm``). Per rule and variant: ``rlhf ppo --config configs/ppo.yaml`` plus the variant's
keys (a checkpoint every ``--save_steps``), then ``rlhf eval`` of each checkpoint and the final policy against SFT
on the held-out prompts, greedy; the rule (``bench/reward_defaults.py``'s ``RULES``) judges each policy answer
against SFT's, ties (and equal answers) counting half::

    python bench/reward_defaults.py --work WORK --rules overlap,no_digits --max_train_pairs 300 --out RM.json
    python bench/ppo_rules.py --work WORK --rules overlap,no_digits --out OUT --record bench/results/NAME.json \\
        --variant shipped: --variant k8:samples_per_prompt=8

A variant is ``NAME:key=value,...`` as in ``bench/demo_ppo_probe.py``. Runs one process at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from bench_record import Record
from demo_ppo_probe import add_variant_arguments, parse_variant
from reward_defaults import RULES

from rlhf.evaluate import win_rate

ROOT = Path(__file__).resolve().parents[1]


def judge(rule, samples: list[dict]) -> dict:
    """The rule's verdict on each (policy, baseline) answer pair as 1 / 0.5 / 0, as a win rate against 0.5."""
    verdicts = []
    for s in samples:
        preferred = None if s["policy"] == s["baseline"] else rule(s["prompt"], s["policy"], s["baseline"])
        verdicts.append({"a": 1.0, "b": 0.0, None: 0.5}[preferred])
    return win_rate(verdicts, [0.5] * len(verdicts))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="work folder: sft/ and rm_defaults_RULE/rm in it")
    parser.add_argument("--rules", default="overlap,no_digits")
    parser.add_argument("--config", default=str(ROOT / "configs" / "ppo.yaml"))
    parser.add_argument("--max_steps", type=int, default=16)
    parser.add_argument("--save_steps", type=int, default=8)
    add_variant_arguments(parser)
    args = parser.parse_args(argv)
    record = Record("ppo_rules", argv, path=args.record)
    work, out = Path(args.work), Path(args.out)
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    unknown = [r for r in args.rules.split(",") if r not in RULES]
    if unknown:
        raise SystemExit(f"error: unknown rule: {', '.join(unknown)} (known: {', '.join(RULES)})")
    shipped = yaml.safe_load(Path(args.config).read_text())
    figures = {}
    for rule in args.rules.split(","):
        rm = work / f"rm_defaults_{rule}" / "rm"
        for name, keys in map(parse_variant, args.variant):
            folder = out / rule / name
            folder.mkdir(parents=True, exist_ok=True)
            overrides = {"sft_adapter": str(work / "sft"), "reward_model": str(rm), "output_dir": str(folder / "ppo"),
                         "report_to": "none", "max_steps": args.max_steps, "save_steps": args.save_steps,
                         "save_total_limit": 100, "overwrite_output_dir": True, **keys}
            config = folder / "ppo.yaml"  # the shipped config with the paths, steps and the variant's keys
            config.write_text(yaml.safe_dump({**shipped, **overrides}, sort_keys=False))
            print(f"[{rule}/{name}] rlhf ppo --config {config}", file=sys.stderr)
            subprocess.run([rlhf, "ppo", "--config", str(config)], check=True)
            metrics = json.loads((folder / "ppo" / "metrics.json").read_text())
            policies = {f"step{s}": folder / "ppo" / "checkpoints" / f"step-{s:06d}" / "policy"
                        for s in range(args.save_steps, args.max_steps, args.save_steps)}
            policies[f"step{args.max_steps}"] = folder / "ppo"
            run = {"keys": keys, "ppo_wall_s": metrics["wall_time_s"], "ppo_steps": metrics["steps"]}
            for label, policy in policies.items():
                evaluation = folder / f"eval_{label}"
                subprocess.run([rlhf, "eval", "--policy", str(policy), "--baseline", str(work / "sft"),
                                "--reward_model", str(rm), "--rule", "rule_score", "--dataset_name",
                                "sample:prompts_test", "--max_new_tokens", "48", "--batch_size", "22", "--seed", "42",
                                "--out_dir", str(evaluation)], check=True)
                result = json.loads((evaluation / "eval.json").read_text())
                samples = result["samples"]
                run[label] = {"rule": judge(RULES[rule], samples), "kl": result["kl_policy_to_baseline"],
                              "words": result["response_words"], "rm_win_rate": result["reward_model"]["win_rate"],
                              "unchanged": result["unchanged"],
                              "policy_answers": [s["policy"] for s in samples]}
                w = run[label]["rule"]
                print(f"[{rule}/{name}] {label}: {rule} win rate {w['win_rate']:.3f} "
                      f"({w['wins']}/{w['ties']}/{w['losses']}), KL {run[label]['kl']:.2f}", file=sys.stderr)
            figures[f"{rule}/{name}"] = run
    record.write(figures, {"work": str(work), "config": args.config, "rules": args.rules,
                           "ppo": shipped,
                           "eval": "rlhf eval --policy P --baseline WORK/sft --reward_model RM --rule rule_score "
                                   "--dataset_name sample:prompts_test --max_new_tokens 48 --batch_size 22 --seed 42"})


if __name__ == "__main__":
    main()
