"""The demo's PPO stage with other settings, or with the labelers' rule itself as the reward.

Takes a finished demo run (``rlhf pipeline --config configs/demo.yaml``: its SFT adapter and reward model) and,
per variant, trains PPO with the demo config's ``ppo`` section plus the variant's keys, then answers the held-out
prompts greedily with the config's ``eval`` section against SFT, judged by the labelers' rule::

    python bench/demo_ppo_probe.py --demo WORK --out OUT --record bench/results/NAME.json \\
        --variant shipped: --variant oracle:reward_model=rule,reward_normalization=batch

A variant is ``NAME:key=value,key=value`` (values parsed as YAML); ``reward_model=rule`` trains on the rule the
simulated labelers vote by instead of the reward model (``reward_normalization=batch`` whitens its [0, 1] scores
per rollout, as ``rm_stats`` scales the reward model's), which tells whether the optimiser or the reward model
limits the demo. Each variant runs ``rlhf ppo`` and ``rlhf eval`` as separate processes, one after the other.

``--eval_checkpoints`` also answers the held-out prompts with the policy of every checkpoint the run kept (a learning
curve: e.g. ``--variant curve:max_steps=27,save_steps=3,save_total_limit=null --eval_checkpoints``; with the demo's
constant learning rate the first steps are those of a shorter run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from bench_record import Record

from reward.rules import ends_with_full_stop

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (NAME, {key: YAML value})."""
    name, _, rest = text.partition(":")
    keys = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: variant {text!r}: {item!r} is not key=value")
        keys[key.strip()] = yaml.safe_load(value)
    return name, keys


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--variant`` (repeatable, see :func:`parse_variant`) and ``--record``, as every variant benchmark
    takes them."""
    parser.add_argument("--out", required=True, help="folder for the variants' runs")
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,... (repeatable)")
    parser.add_argument("--record", required=True)


def run_stage(rlhf: str, name: str, stage: str, values: dict, path: Path) -> None:
    """Write ``values`` to ``path`` and run ``rlhf STAGE --config path``."""
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    print(f"[{name}] rlhf {stage} --config {path}", file=sys.stderr)
    subprocess.run([rlhf, stage, "--config", str(path)], check=True)


def eval_figures(result: dict) -> dict:
    """What a record keeps of an ``rlhf eval`` result (its eval.json)."""
    samples = result["samples"]
    return {
        "rule": {k: result["rule"][k] for k in ("win_rate", "ci_low", "ci_high", "wins", "ties", "losses", "n",
                                                 "policy_mean", "baseline_mean")},
        "reward_model_win_rate": result["reward_model"]["win_rate"],
        "kl_policy_to_baseline": result["kl_policy_to_baseline"],
        "response_words": result["response_words"],
        "policy_answers_ending_with_full_stop": sum(ends_with_full_stop(s["policy"]) for s in samples),
        "empty_policy_answers": sum(not s["policy"].strip() for s in samples),
        "policy_answers": [s["policy"] for s in samples],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished demo work_dir (sft/ and reward/ in it)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--eval_checkpoints", action="store_true",
                        help="also evaluate the policy of every checkpoint kept (figures under 'curve')")
    add_variant_arguments(parser)
    args = parser.parse_args(argv)
    record = Record("demo_ppo_probe", argv, path=args.record)
    demo, out = Path(args.demo), Path(args.out)
    cfg = yaml.safe_load(Path(args.config).read_text())
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    common = {"model_name_or_path": cfg["model_name_or_path"], "seed": cfg.get("seed", 42)}
    figures = {}
    for name, keys in map(parse_variant, args.variant):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        ppo = {**cfg["ppo"], **common, "report_to": "none", "sft_adapter": str(demo / "sft"),
               "reward_model": str(demo / "reward"), "output_dir": str(folder / "ppo"), "overwrite_output_dir": True,
               **keys}
        evaluation = {**cfg["eval"], **common, "policy": str(folder / "ppo"), "baseline": str(demo / "sft"),
                      "reward_model": str(demo / "reward"), "rule": cfg.get("rule", "rule_score"),
                      "out_dir": str(folder / "eval")}
        for stage, values in (("ppo", ppo), ("eval", evaluation)):
            run_stage(rlhf, name, stage, values, folder / f"{stage}.yaml")
        metrics = json.loads((folder / "ppo" / "metrics.json").read_text())
        result = json.loads((folder / "eval" / "eval.json").read_text())
        figures[name] = {
            "keys": keys,
            **eval_figures(result),
            "ppo_wall_s": metrics["wall_time_s"],
            "ppo_steps": metrics["steps"],
            "ppo_score_first_last_steps": [metrics["score_first_steps"], metrics["score_last_steps"]],
            "ppo_kl_last": metrics["kl_last"],
        }
        if args.eval_checkpoints:
            figures[name]["curve"] = []
            for policy in sorted((folder / "ppo" / "checkpoints").glob("step-*/policy")):
                step = int(policy.parent.name.split("-")[1])
                at = {**evaluation, "policy": str(policy), "out_dir": str(folder / f"eval-{policy.parent.name}")}
                run_stage(rlhf, name, "eval", at, folder / f"eval-{policy.parent.name}.yaml")
                point = eval_figures(json.loads((Path(at["out_dir"]) / "eval.json").read_text()))
                figures[name]["curve"].append({"step": step, **point})
                r = point["rule"]
                print(f"[{name}] step {step}: rule win rate {r['win_rate']:.3f} ({r['wins']}/{r['ties']}/{r['losses']})",
                      file=sys.stderr)
        r = figures[name]["rule"]
        print(f"[{name}] rule win rate {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
              f"({r['wins']}/{r['ties']}/{r['losses']}), mean {r['policy_mean']:.3f} vs {r['baseline_mean']:.3f}, "
              f"KL {figures[name]['kl_policy_to_baseline']:.2f}, PPO {metrics['wall_time_s']:.0f} s", file=sys.stderr)
    record.write(figures, {"demo": str(demo), "config": args.config, "ppo": cfg["ppo"], "eval": cfg["eval"]})


if __name__ == "__main__":
    main()
