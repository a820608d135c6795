"""Start-up time of the ``rlhf`` command: help screens and the labeling admin commands.

    python bench/cli_startup.py [--repeats 7] [--record FILE]

Each command runs ``--repeats`` times, each time in a fresh process (the ``rlhf`` console script
next to this Python, else ``python -m rlhf.cli``), timed from spawn to exit with wall-clock time;
the median, minimum and maximum are reported. The commands: ``rlhf --help``, ``rlhf STAGE --help``
for every stage and subcommand, and ``rlhf label init | user add | user list | stats | export`` on a
fresh SQLite database (a new database for every ``init``, a new user name for every ``user add``).
Target: a median of at most 1 s each on an idle machine. The record (command, machine, load before
and after, date, figures) goes to bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_record import Record  # noqa: E402

TARGET_S = 1.0


def rlhf_command() -> list[str]:
    script = Path(sys.executable).with_name("rlhf")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlhf.cli"]


def stage_names() -> list[list[str]]:
    """``[name]`` per stage plus ``[stage, sub]`` per nested subcommand, and ``label`` (read from the CLI)."""
    from rlhf.cli import STAGES, SUBSTAGES

    names = [[name] for name in STAGES]
    names.insert(list(STAGES).index("generate") + 1, ["label"])
    return names + [list(key) for key in SUBSTAGES]


def timed(argv: list[str], env: dict, cwd: str) -> float:
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (median reported)")
    parser.add_argument("--record", default=None, help="record file (default bench/results/cli_startup.json)")
    args = parser.parse_args()
    record = Record("cli_startup", path=args.record)
    rlhf = rlhf_command()
    env = {**os.environ, "RLHF_PASSWORD": "bench-password-123"}
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "label.db")
        subprocess.run([*rlhf, "label", "init", "--db", db], env=env, check=True, capture_output=True)
        commands: list[tuple[str, Callable[[int], list[str]]]] = [("rlhf --help", lambda i: ["--help"])]
        commands += [(f"rlhf {' '.join(n)} --help", lambda i, n=n: [*n, "--help"]) for n in stage_names()]
        commands += [
            ("rlhf label init", lambda i: ["label", "init", "--db", str(Path(tmp) / f"init{i}.db")]),
            ("rlhf label user add", lambda i: ["label", "user", "add", f"user{i}", "--db", db]),
            ("rlhf label user list", lambda i: ["label", "user", "list", "--db", db]),
            ("rlhf label stats", lambda i: ["label", "stats", "--db", db]),
            ("rlhf label export", lambda i: ["label", "export", "--db", db, "--out", str(Path(tmp) / "p.jsonl")]),
        ]
        timed([*rlhf, "--help"], env, tmp)  # warm the OS file cache once, untimed
        for name, argv in commands:
            runs = [timed([*rlhf, *argv(i)], env, tmp) for i in range(args.repeats)]
            figures[name] = {
                "median_s": round(statistics.median(runs), 3),
                "min_s": round(min(runs), 3),
                "max_s": round(max(runs), 3),
                "runs_s": [round(r, 3) for r in runs],
            }
            print(f"{name:<34} median {figures[name]['median_s']:.3f} s  (min {figures[name]['min_s']:.3f}, "
                  f"max {figures[name]['max_s']:.3f})", file=sys.stderr)  # fmt: skip
    slowest = max(figures, key=lambda k: figures[k]["median_s"])
    summary = {"slowest": slowest, "slowest_median_s": figures[slowest]["median_s"], "target_s": TARGET_S,
               "all_within_target": all(f["median_s"] <= TARGET_S for f in figures.values())}  # fmt: skip
    print(f"slowest: {slowest} ({summary['slowest_median_s']:.3f} s); all within {TARGET_S} s: "
          f"{summary['all_within_target']}", file=sys.stderr)
    record.write({"commands": figures, **summary}, {"repeats": args.repeats, "launcher": " ".join(rlhf)})


if __name__ == "__main__":
    main()
