"""Start-up time of the ``rlhf`` command: help screens and the labeling admin commands.

    python bench/cli_startup.py [--repeats 7] [--record FILE] [--commit REV]

Each command runs ``--repeats`` times, each time in a fresh process (the ``rlhf`` console script
next to this Python, else ``python -m rlhf.cli``), timed from spawn to exit. Reported per command:
the median, minimum and maximum wall time, and the median CPU time (user + system) of the child
process, which on a shared machine estimates what an idle one would take. The commands:
``rlhf --help``, ``rlhf STAGE --help`` for every stage and subcommand, and ``rlhf label init | user
add | user list | stats | export`` on a fresh SQLite database (a new database for every ``init``, a
new user name for every ``user add``). Target: a median of at most 1 s each on an idle machine. The
record (command, machine, load before and after, date, figures) goes to bench/results/cli_startup.json.
``--commit REV`` times the code of another commit instead (``git archive`` of its packages into a
temporary folder, run as ``python -m rlhf.cli`` with that folder first on PYTHONPATH), for before/after
figures under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


STAGE_NAMES = """
import json
from rlhf.cli import STAGES, SUBSTAGES
names = [[name] for name in STAGES]
names.insert(list(STAGES).index("generate") + 1, ["label"])
print(json.dumps(names + [list(key) for key in SUBSTAGES]))
"""


def stage_names(env: dict, cwd: str) -> list[list[str]]:
    """``[name]`` per stage plus ``[stage, sub]`` per nested subcommand, and ``label`` (read from the CLI timed)."""
    out = subprocess.run([sys.executable, "-c", STAGE_NAMES], env=env, cwd=cwd, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout)


def export_commit(rev: str, folder: str) -> str:
    """Write the packages of commit ``rev`` into ``folder``; returns the full commit id."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", rev], cwd=root, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(["git", "archive", commit.strip(), "rlhf", "reward", "feedback_ui"], cwd=root,
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return commit.strip()


def timed(argv: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds = user + system) of one run of ``argv`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (median reported)")
    parser.add_argument("--record", default=None, help="record file (default bench/results/cli_startup.json)")
    parser.add_argument("--commit", default=None, help="time the packages of this commit instead of the checkout")
    args = parser.parse_args()
    record = Record("cli_startup", path=args.record)
    env = {**os.environ, "RLHF_PASSWORD": "bench-password-123"}
    rlhf = rlhf_command()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as source:
        commit = None
        if args.commit:
            commit = export_commit(args.commit, source)
            rlhf = [sys.executable, "-m", "rlhf.cli"]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        db = str(Path(tmp) / "label.db")
        subprocess.run([*rlhf, "label", "init", "--db", db], env=env, check=True, capture_output=True)
        commands: list[tuple[str, Callable[[int], list[str]]]] = [("rlhf --help", lambda i: ["--help"])]
        commands += [(f"rlhf {' '.join(n)} --help", lambda i, n=n: [*n, "--help"]) for n in stage_names(env, tmp)]
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
            wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
            figures[name] = {
                "median_s": round(statistics.median(wall), 3),
                "min_s": round(min(wall), 3),
                "max_s": round(max(wall), 3),
                "median_cpu_s": round(statistics.median(cpu), 3),
                "runs_s": [round(r, 3) for r in wall],
                "runs_cpu_s": [round(r, 3) for r in cpu],
            }
            f = figures[name]
            print(f"{name:<30} wall median {f['median_s']:.3f} s (min {f['min_s']:.3f}, max {f['max_s']:.3f}); "
                  f"CPU median {f['median_cpu_s']:.3f} s", file=sys.stderr)  # fmt: skip
    slowest = max(figures, key=lambda k: figures[k]["median_s"])
    summary = {
        "slowest": slowest,
        "slowest_median_s": figures[slowest]["median_s"],
        "slowest_median_cpu_s": max(f["median_cpu_s"] for f in figures.values()),
        "target_s": TARGET_S,
        "all_within_target": all(f["median_s"] <= TARGET_S for f in figures.values()),
    }
    print(f"slowest: {slowest} (wall {summary['slowest_median_s']:.3f} s); largest CPU median "
          f"{summary['slowest_median_cpu_s']:.3f} s; all wall medians within {TARGET_S} s: "
          f"{summary['all_within_target']}", file=sys.stderr)
    settings = {"repeats": args.repeats, "launcher": " ".join(rlhf), "code_commit": commit or "checkout"}
    record.write({"commands": figures, **summary}, settings)


if __name__ == "__main__":
    main()
