"""The record behind a benchmark figure: command, machine, load before and after, date.

Each benchmark script writes one small JSON file under ``bench/results/`` (figures and
settings only, no model weights or sample dumps)::

    record = Record("sft_bench")            # at start: command, date, machine, `uptime`
    ...                                     # the benchmark
    record.write(figures, settings)         # at the end: `uptime` again, then bench/results/sft_bench.json

The load average matters because the benchmarks run on small shared machines: a run that
shared its cores with other jobs reports lower throughput and higher latency than an idle one.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    """CPU model and core count (from ``lscpu``), memory, OS and Python of this machine."""
    lscpu = {}
    for line in _run(["lscpu"]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            lscpu[key.strip()] = value.strip()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": lscpu.get("Model name") or platform.processor() or platform.machine(),
        "cpus": int(lscpu.get("CPU(s)", os.cpu_count() or 0)),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "architecture": platform.machine(),
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def load() -> dict:
    """``uptime`` as printed, and the 1/5/15-minute load averages."""
    return {"uptime": _run(["uptime"]), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str:
    return _run(["git", "rev-parse", "--short", "HEAD"])


def uncommitted_files() -> list[str]:
    """Tracked files that differ from the commit (the run used the working tree as it was)."""
    return [line for line in _run(["git", "diff", "--name-only", "HEAD"]).splitlines() if line]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Record:
    """Collects what a benchmark run's figures need beside them and writes ``bench/results/<name>.json``."""

    def __init__(self, name: str, argv: list[str] | None = None, path: str | os.PathLike | None = None):
        script = Path(sys.argv[0]).resolve()
        shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        args = sys.argv[1:] if argv is None else argv
        self.path = Path(path) if path else RESULTS / f"{name}.json"
        self.head = {
            "benchmark": name,
            "command": shlex.join(["python", str(shown), *args]),
            "commit": git_commit(),
            "uncommitted_files": uncommitted_files(),
            "started_utc": utc_now(),
            "machine": machine(),
            "load_before": load(),
        }
        self._t0 = time.perf_counter()

    def write(self, figures: dict, settings: dict, **extra) -> Path:
        """Adds the end time and ``uptime`` after the run; writes the record atomically and returns its path."""
        record = {
            **self.head,
            "finished_utc": utc_now(),
            "wall_s": round(time.perf_counter() - self._t0, 1),
            "load_after": load(),
            "settings": settings,
            "figures": figures,
            **extra,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)
        print(f"record: {self.path}", file=sys.stderr)
        return self.path
