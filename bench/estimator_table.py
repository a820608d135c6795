"""GAE-PPO, RLOO, GRPO, REINFORCE++ and DPO at equal CPU time, from one SFT adapter, one RM and one set of pairs.

Each row trains with its shipped config (``configs/ppo.yaml`` with ``--advantage_estimator``, or
``configs/dpo.yaml``), overriding only paths, ``max_steps`` (set high) and the time limit: every row stops after
the step at which its process has used ``--cpu_seconds`` of CPU time (``--max_train_seconds S --train_clock
cpu``), so a loaded machine changes the wall time of a row but hardly its amount of training. Then ``rlhf
eval`` answers the 44 held-out prompts greedily with the trained policy and with SFT, and judges them by the
labelling rule and the RM.

    python bench/estimator_table.py --work DEMO_WORK --out OUT [--cpu_seconds 600] [--rows gae,rloo,...]

DEMO_WORK is a finished demo pipeline folder (``rlhf pipeline --config configs/demo.yaml``, or ``python
bench/ppo_bench.py alignment --work DEMO_WORK``): its ``sft/``, ``reward/``, ``prefs.jsonl`` and
``prefs.test.jsonl`` are the shared inputs. A row whose training (or eval) output is already in OUT is not run
again (its figures are read back, without its seconds), so an interrupted table continues where it stopped.
Record: bench/results/estimator_table.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_record import Record  # noqa: E402

ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")
ROWS = ESTIMATORS + ("dpo",)


def rlhf() -> str:
    return str(Path(sys.executable).with_name("rlhf"))


def train_command(row: str, work: Path, out: Path, cpu_seconds: float) -> list[str]:
    budget = ["--max_steps", "100000", "--max_train_seconds", str(cpu_seconds), "--train_clock", "cpu",
              "--report_to", "none", "--output_dir", str(out)]
    if row == "dpo":
        return [rlhf(), "dpo", "--config", str(ROOT / "configs" / "dpo.yaml"), "--sft_adapter", str(work / "sft"),
                "--dataset_name", str(work / "prefs.jsonl"), "--eval_dataset_name", str(work / "prefs.test.jsonl"),
                *budget]
    return [rlhf(), "ppo", "--config", str(ROOT / "configs" / "ppo.yaml"), "--sft_adapter", str(work / "sft"),
            "--reward_model", str(work / "reward"), "--advantage_estimator", row, "--save_steps", "0", *budget]


def eval_command(work: Path, policy: Path, out: Path) -> list[str]:
    return [rlhf(), "eval", "--policy", str(policy), "--baseline", str(work / "sft"), "--reward_model",
            str(work / "reward"), "--rule", "rule_score", "--dataset_name", "sample:prompts_test",
            "--max_new_tokens", "48", "--batch_size", "22", "--seed", "42", "--out_dir", str(out)]


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (output to ``log``); its wall and CPU seconds (the child's user + system time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1)}


def shown(cmd: list[str], work: Path, out: Path) -> str:
    shown = shlex.join(cmd).replace(str(work), "WORK").replace(str(out), "OUT").replace(rlhf(), "rlhf")
    return shown.replace(f"{ROOT}/", "")


def run_row(row: str, work: Path, out: Path, cpu_seconds: float) -> dict:
    train_dir, eval_dir = out / row, out / f"{row}_eval"
    train = train_command(row, work, train_dir, cpu_seconds)
    evaluate = eval_command(work, train_dir, eval_dir)
    figures: dict = {"train_command": shown(train, work, out), "eval_command": shown(evaluate, work, out)}
    if not (train_dir / "metrics.json").is_file():
        figures["train"] = timed(train, out / f"{row}.log")
    metrics = json.loads((train_dir / "metrics.json").read_text())
    if not (eval_dir / "eval.json").is_file():
        figures["eval"] = timed(evaluate, out / f"{row}_eval.log")
    result = json.loads((eval_dir / "eval.json").read_text())
    figures.update({
        "steps": metrics.get("steps"),
        "stopped_by_time_budget": metrics.get("stopped_by_time_budget"),
        "rule": {k: result["rule"][k] for k in ("win_rate", "ci_low", "ci_high", "wins", "ties", "losses")},
        "reward_model": {k: result["reward_model"][k] for k in ("win_rate", "ci_low", "ci_high")},
        "kl_policy_to_sft": result["kl_policy_to_baseline"],
        "words": result["response_words"],
        "length_controlled_rule_win_rate": result["length_controlled"]["rule"]["win_rate"],
        "length_matched_pairs": result["length_controlled"]["n_matched"],
    })
    return figures


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a finished demo pipeline folder (sft/, reward/, prefs.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu_seconds", type=float, default=600.0)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    for need in ("sft", "reward", "prefs.jsonl", "prefs.test.jsonl"):
        if not (work / need).exists():
            ap.error(f"{work / need} is missing: run the demo pipeline into --work first")
    out.mkdir(parents=True, exist_ok=True)
    record = Record("estimator_table", argv, path=args.record)
    figures = {}
    for row in rows:
        figures[row] = run_row(row, work, out, args.cpu_seconds)
        print(json.dumps({row: figures[row]}), flush=True)
    settings = {"cpu_seconds_per_row": args.cpu_seconds, "train_clock": "cpu", "inputs": str(work),
                "eval": "44 held-out prompts (sample:prompts_test), greedy, 48 new tokens, vs the SFT adapter"}
    record.write(figures, settings)
    return figures


if __name__ == "__main__":
    main()
