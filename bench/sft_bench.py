"""SFT throughput and memory on the embedded model.

    python bench/sft_bench.py [--steps 10] [--batch 8] [--max_length 256] [--method lora]

Trains `steps` optimizer steps of `rlhf sft` on the shipped sample data and
prints tokens/s (non-padding tokens seen / train runtime) and the peak RSS of
the process. Results go to bench/RESULTS.md by hand, with the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time

import torch

from rlhf.config import build_config
from rlhf.sft import SFTStageConfig, run_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()
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
        start = time.perf_counter()
        metrics = run_sft(cfg)
        wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "method": args.method,
        "steps": metrics["steps"],
        "batch": args.batch,
        "tokens_seen": metrics["tokens_seen"],
        "tokens_per_s": metrics["tokens_per_s"],
        "wall_s_incl_load": round(wall, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "trainable_parameters": metrics["trainable_parameters"],
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
