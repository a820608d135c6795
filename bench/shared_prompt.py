"""What `share_prompt_pass` saves: the demo's PPO stage with each prompt run once per group, and without.

Runs `rlhf ppo` with the PPO keys of configs/demo.yaml (RLOO, 4 samples of 8 prompts per step) on a demo work
folder's SFT adapter and reward model, for a few steps, once with `--share_prompt_pass true` and once with
`false`, for the policy trained on its top 10 blocks (the demo's) and on every block; the pairs run one after
the other (A B A B order over the two policy layouts) so that drift in the machine's speed falls on both.
Step 1 samples the same rollouts in both runs of a pair (same seed, same weights; its reward and KL are
recorded to show it), and its time split is the like-for-like comparison. Records the trainer's per-step time split
(generation, no-grad passes, scoring, training) with the machine and its load:

    python bench/shared_prompt.py --work WORK --out bench/results/shared_prompt.json
    # WORK: a `rlhf pipeline --config configs/demo.yaml` work folder (its sft/ and reward/)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

KEYS = ("time/generation_s", "time/forward_s", "time/scoring_s", "time/training_s", "time/step_s")


def run(work: Path, out: Path, top_layers: int, share: bool, steps: int) -> dict:
    demo = yaml.safe_load(Path("configs/demo.yaml").read_text())
    cfg = dict(demo["ppo"], model_name_or_path=demo["model_name_or_path"], seed=demo["seed"],
               sft_adapter=str(work / "sft"), reward_model=str(work / "reward"), output_dir=str(out),
               max_steps=steps, lora_top_layers=top_layers, share_prompt_pass=share, save_steps=0,
               sample_every=0, report_to="none", progress=False, overwrite_output_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    command = ["rlhf", "ppo", "--config", str(out.parent / f"{out.name}.yaml")]
    load0, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"lora_top_layers": top_layers, "share_prompt_pass": share, "command": " ".join(command),
            "config": {k: cfg[k] for k in ("rollout_batch_size", "samples_per_prompt", "num_mini_batches",
                                            "ppo_epochs", "max_new_tokens", "lora_top_layers", "share_prompt_pass")},
            "wall_s": round(time.perf_counter() - t0, 1), "load_avg_before": load0, "load_avg_after": os.getloadavg(),
            "steps": [{"step": r["step"], "reward/mean": r["reward/mean"], "kl/k1": r["kl/k1"],
                       "response/length_mean": r["response/length_mean"], **{k: r[k] for k in KEYS}} for r in rows]}


def summary(a: dict, b: dict) -> dict:
    """share (a) against whole rows (b): mean seconds over the steps, and step 1 alone."""
    mean = lambda run, k: sum(s[k] for s in run["steps"]) / len(run["steps"])  # noqa: E731
    out = {}
    for k in KEYS:
        out[k] = {"shared": round(mean(a, k), 2), "whole": round(mean(b, k), 2),
                  "ratio": round(mean(a, k) / max(mean(b, k), 1e-9), 3),
                  "step1_ratio": round(a["steps"][0][k] / max(b["steps"][0][k], 1e-9), 3)}
    out["step1_same_rollouts"] = {k: (a["steps"][0][k], b["steps"][0][k])
                                  for k in ("reward/mean", "kl/k1", "response/length_mean")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a demo pipeline work folder (sft/, reward/)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scratch", default="/tmp/shared_prompt_bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work, scratch = Path(args.work), Path(args.scratch)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs = []
    for top, order in ((10, (True, False)), (0, (False, True))):
        for share in order:
            name = f"top{top}_{'shared' if share else 'whole'}"
            print(f"{name} ...", file=sys.stderr, flush=True)
            runs.append(run(work, scratch / name, top, share, args.steps))
    pick = lambda top, share: next(r for r in runs if r["lora_top_layers"] == top and r["share_prompt_pass"] == share)  # noqa: E731
    record = {
        "what": "rlhf ppo step time with share_prompt_pass true vs false, the demo's PPO keys",
        "command": f"python bench/shared_prompt.py --work WORK --steps {args.steps} --out {args.out}",
        "work": str(work), "code": f"commit {commit}",
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "start": start, "end": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "summary": {f"lora_top_layers {top}": summary(pick(top, True), pick(top, False)) for top in (10, 0)},
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
