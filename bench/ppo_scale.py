"""PPO on 1 process and on 2 (data-parallel, gloo): rollouts/s, peak RSS per process, communication share.

Runs `rlhf ppo` (configs/ppo.yaml plus the keys below, rewarded by the transparent rule so no reward model is
needed) once in one process with every core, then under
`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml` (one thread per process), with the same
global batch, and writes bench/results/ppo_scale.json:

    python bench/ppo_scale.py [--steps 3 --rollouts 16 --max_new_tokens 32]

On a 2-core machine two processes cannot be faster than one process with two threads: the figure is what
data parallelism costs here (duplicated base model, all-reduce), the price of a launch that scales on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import ROOT, Record  # noqa: E402


def run(processes: int, args, work: Path) -> dict:
    out = work / f"np{processes}"
    keys = ["--config", "configs/ppo.yaml", "--reward_model", "rule", "--output_dir", str(out),
            "--max_steps", str(args.steps), "--rollout_batch_size", str(args.rollouts),
            "--per_device_eval_batch_size", str(args.rollouts), "--max_new_tokens", str(args.max_new_tokens),
            "--report_to", "none", "--progress", "false", "--sample_every", "0", "--save_steps", "0",
            "--overwrite_output_dir", "true"]
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if processes == 1:
        cmd = [sys.executable, "-m", "rlhf.cli", "ppo", *keys]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               "configs/accelerate/cpu_2proc.yaml", "--num_processes", str(processes), "--main_process_port",
               str(port), "-m", "rlhf.cli", "ppo", *keys]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows  # step 1 includes warm-up
    mean = lambda key: sum(r.get(key, 0.0) for r in later) / len(later)  # noqa: E731
    return {
        "processes": processes, "world_size": metrics["world_size"], "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 1), "ppo_wall_s": metrics["wall_time_s"],
        "rollouts_per_s_after_step_1": round(args.rollouts / mean("time/step_s"), 3),
        "step_s_after_step_1": round(mean("time/step_s"), 2),
        "allreduce_s_per_step": round(mean("time/allreduce_s"), 3),
        "communication_share": round(mean("time/communication_share"), 4) if processes > 1 else 0.0,
        "peak_rss_mb_per_process": metrics["peak_rss_mb"],
        "time_split_s": {k: round(mean(f"time/{k}"), 2) for k in ("generation_s", "forward_s", "scoring_s",
                                                                   "training_s")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/ppo_scale")
    ap.add_argument("--name", default="ppo_scale")
    args = ap.parse_args()
    record = Record(args.name)
    runs = [run(n, args, Path(args.work)) for n in (1, 2)]
    for r in runs:
        assert r["world_size"] == r["processes"], r
    figures = {"runs": runs, "rollouts_per_s_ratio_2_over_1":
               round(runs[1]["rollouts_per_s_after_step_1"] / runs[0]["rollouts_per_s_after_step_1"], 3)}
    record.write(figures, vars(args))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
