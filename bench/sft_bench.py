"""SFT throughput and memory on the embedded model.

    python bench/sft_bench.py [--steps 10] [--batch 8] [--max_length 256] [--method lora]

Trains `steps` optimizer steps of `rlhf sft` on the shipped sample data and
prints tokens/s (non-padding tokens seen / train runtime), the process CPU time
and the peak RSS. The record (command, machine, load before and after, date,
figures) goes to bench/results/sft_bench.json (``--record`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_record import Record  # noqa: E402

from rlhf.config import build_config, config_to_dict  # noqa: E402
from rlhf.sft import SFTStageConfig, run_sft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--record", default=None, help="record file (default bench/results/sft_bench.json)")
    args = parser.parse_args()
    record = Record("sft_bench", path=args.record)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(
            SFTStageConfig,
            {
                "output_dir": f"{tmp}/sft",
                "method": args.method,
                "max_steps": args.steps,
                "per_device_train_batch_size": args.batch,
                "max_length": args.max_length,
                "eval_fraction": 0.0,
                "report_to": "none",
            },
        )
        start, cpu0 = time.perf_counter(), cpu_seconds()
        metrics = run_sft(cfg)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures = {
        "steps": metrics["steps"],
        "train_examples": metrics["train_examples"],
        "tokens_seen": metrics["tokens_seen"],
        "tokens_per_s": metrics["tokens_per_s"],
        "train_runtime_s": round(metrics["tokens_seen"] / metrics["tokens_per_s"], 1),
        "s_per_step": round(metrics["tokens_seen"] / metrics["tokens_per_s"] / max(metrics["steps"], 1), 2),
        "train_loss": metrics["train_loss"],
        "wall_s_incl_load": round(wall, 1),
        "cpu_s_incl_load": round(cpu, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "trainable_parameters": metrics["trainable_parameters"],
        "total_parameters": metrics["total_parameters"],
    }
    settings = {
        "method": args.method,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        "dataset_name": cfg.dataset_name,
        "model_name_or_path": cfg.model_name_or_path,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "stage_config": {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"},
    }
    record.write(figures, settings)
    print(json.dumps({**settings, **figures}, indent=2))


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


if __name__ == "__main__":
    main()
