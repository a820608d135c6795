"""SFT throughput and memory on the embedded model, for one method or a comparison of several.

    python bench/sft_bench.py [--steps 10] [--batch 8] [--max_length 256] [--method lora]
    python bench/sft_bench.py --methods lora,loreft,bottleneck_adapter [--steps 10] [--eval_fraction 0.1]
    python bench/sft_bench.py --methods lora,loreft,bottleneck_adapter --smoke     # a tiny random model, seconds

One method (``--method``): trains `steps` optimizer steps of `rlhf sft` on the shipped sample data and
prints tokens/s (non-padding tokens seen / train runtime), the process CPU time and the peak RSS. The
record (command, machine, load before and after, date, figures) goes to bench/results/sft_bench.json.

Several (``--methods a,b,c``): each method runs as its own child process of this script (so each peak
RSS is that method's alone) on the same data, held-out split, seed, steps, batch and learning rate, with
every other key at the stage default (lora: r 16 on all linear layers; loreft: rank 4 on every block;
bottleneck_adapter: reduction 16 after every MLP, relu). One record, bench/results/sft_methods.json, holds
per method: trainable parameters, eval loss, tokens/s and peak RSS (and train loss, s per step, wall time).
``--record`` changes where a record goes; ``--smoke`` writes it to a temporary folder unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_record import ROOT, Record  # noqa: E402

from rlhf.config import build_config, config_to_dict  # noqa: E402
from rlhf.sft import SFTStageConfig, run_sft  # noqa: E402

COMPARED = ("trainable_parameters", "eval_loss", "tokens_per_s", "peak_rss_gib", "train_loss", "s_per_step",
            "wall_s_incl_load")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--method", default="lora", help="one method, run in this process")
    parser.add_argument("--methods", default=None, help="comma-separated methods, each in a child process")
    parser.add_argument("--eval_fraction", type=float, default=None,
                        help="held-out share for eval loss (default: 0 with --method, 0.1 with --methods)")
    parser.add_argument("--learning_rate", type=float, default=None, help="default: the stage default")
    parser.add_argument("--model_name_or_path", default="smollm2-135m-instruct")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model (built in a temporary folder)")
    parser.add_argument("--record", default=None, help="record file (default bench/results/<benchmark>.json)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke and args.model_name_or_path == "smollm2-135m-instruct":
            from rlhf.testing import build_tiny_model

            args.model_name_or_path = str(build_tiny_model(Path(tmp) / "tiny"))
        if args.smoke and args.record is None:
            args.record = str(Path(tmp) / "record.json")
        if args.methods:
            compare_methods(args, Path(tmp))
        else:
            one_method(args)
        if args.smoke:
            print(f"smoke run: record not kept ({args.record})", file=sys.stderr)


def one_method(args: argparse.Namespace) -> None:
    record = Record("sft_bench", path=args.record)
    values = {
        "model_name_or_path": args.model_name_or_path,
        "method": args.method,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        "eval_fraction": args.eval_fraction or 0.0,
        "report_to": "none",
    }
    if args.learning_rate is not None:
        values["learning_rate"] = args.learning_rate
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(SFTStageConfig, {**values, "output_dir": f"{tmp}/sft"})
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
        "eval_loss": metrics.get("eval_loss"),
        "eval_examples": metrics.get("eval_examples", 0),
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


def compare_methods(args: argparse.Namespace, tmp: Path) -> None:
    """Run every method of ``--methods`` in a child process (``--method M``) and write one record."""
    from rlhf.models import resolve_model_path

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # a bad name stops here, not after the first methods have run
        build_config(SFTStageConfig, {"method": method})
    record = Record("sft_methods", path=args.record)
    model = resolve_model_path(args.model_name_or_path)  # the embedded model is converted once, before any child
    eval_fraction = 0.1 if args.eval_fraction is None else args.eval_fraction
    per_method = {}
    for method in methods:
        child_record = tmp / f"{method}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--steps", str(args.steps),
               "--batch", str(args.batch), "--max_length", str(args.max_length), "--eval_fraction", str(eval_fraction),
               "--model_name_or_path", model, "--record", str(child_record)]  # fmt: skip
        if args.learning_rate is not None:
            cmd += ["--learning_rate", str(args.learning_rate)]
        print(f"== {method}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        child = json.loads(child_record.read_text())
        per_method[method] = {
            "figures": child["figures"],
            "stage_config": child["settings"]["stage_config"],
            "load_before": child["load_before"]["load_average_1_5_15"],
            "load_after": child["load_after"]["load_average_1_5_15"],
        }
    settings = {
        "methods": methods,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        "eval_fraction": eval_fraction,
        "learning_rate": per_method[methods[0]]["stage_config"]["learning_rate"],
        "model_name_or_path": args.model_name_or_path,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    figures = {m: {k: per_method[m]["figures"].get(k) for k in COMPARED} for m in methods}
    record.write(figures, settings, per_method=per_method)
    print(table(figures))


def table(figures: dict[str, dict]) -> str:
    """A Markdown table: one row per method, the COMPARED columns."""
    lines = ["| method | " + " | ".join(COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    for method, row in figures.items():
        cells = [f"{row[k]:,}" if isinstance(row[k], int) else f"{row[k]:.4g}" if isinstance(row[k], float)
                 else str(row[k]) for k in COMPARED]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


if __name__ == "__main__":
    main()
