"""What a step costs with and without a critic: `rlhf ppo` on the embedded model, one estimator per run.

Runs `rlhf ppo` (configs/ppo.yaml plus the keys below) for a few steps with the given advantage estimator,
rewarded by the transparent rule (`--reward_model rule`, so no RM is needed and both runs see the same reward),
and records the per-step time split the trainer logs (generation, no-grad passes, scoring, training) with the
machine and its load. Run two estimators at the same time to compare them under the same load:

    python bench/estimator_cost.py --estimator gae --out bench/results/estimator_cost_gae.json &
    python bench/estimator_cost.py --estimator rloo --out bench/results/estimator_cost_rloo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimator", default="rloo", choices=["gae", "rloo", "grpo", "reinforce_pp"])
    ap.add_argument("--samples_per_prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/estimator_cost")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from rlhf.config import load_yaml
    from rlhf.ppo.config import PPOStageConfig
    from rlhf.ppo.stage import run_ppo

    k = 1 if args.estimator == "gae" else args.samples_per_prompt
    values = load_yaml("configs/ppo.yaml")
    values.update(reward_model="rule", output_dir=f"{args.work}/{args.estimator}-{os.getpid()}", max_steps=args.steps,
                  rollout_batch_size=args.rollouts, samples_per_prompt=k, advantage_estimator=args.estimator,
                  per_device_eval_batch_size=args.rollouts, max_new_tokens=args.max_new_tokens, report_to="none",
                  progress=False, sample_every=0, save_steps=0, overwrite_output_dir=True)
    cfg = PPOStageConfig(**values)
    load0, start = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    metrics = run_ppo(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    keys = ("time/generation_s", "time/forward_s", "time/scoring_s", "time/training_s", "time/step_s")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    record = {
        "what": f"rlhf ppo step cost with advantage_estimator {args.estimator} (reward: the rule)",
        "command": f"python bench/estimator_cost.py --estimator {args.estimator} --steps {args.steps} "
                   f"--rollouts {args.rollouts} --samples_per_prompt {args.samples_per_prompt} "
                   f"--max_new_tokens {args.max_new_tokens} --out {args.out}",
        "machine": {"cpu": cpu, "cores": os.cpu_count()}, "start": start,
        "end": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_avg_before": load0, "load_avg_after": os.getloadavg(),
        "trainable_parameters": metrics["trainable_parameters"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "per_step": [{k: r[k] for k in keys + ("response/length_mean", "reward/mean")} for r in rows],
        "mean_s": {k: sum(r[k] for r in rows) / len(rows) for k in keys},
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["mean_s"]))


if __name__ == "__main__":
    main()
