"""Run several ``rlhf`` commands one after the other in one process, for tests that launch it N times.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/stages_driver.py PLAN.json

``PLAN.json``: ``{"commands": [[argv of one rlhf command], ...], "watch": DIR, "report": FILE}``. Each
command goes through :func:`rlhf.cli.main`, as ``-m rlhf.cli`` would run it, but the process pair starts
(imports, process group) once for all of them. Every process except rank 0 records what it creates,
writes, renames or deletes under ``watch`` (Python's audit events) and writes that list to
``FILE.rank<N>.json`` at the end, so a test can check that only rank 0 wrote the output folders.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
CHANGES = {"os.mkdir": 0, "os.rename": 1, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0, "shutil.copyfile": 1,
           "os.truncate": 0, "os.symlink": 1, "os.link": 1}  # fmt: skip  (event: index of the path it changes)


def record_changes(watch: Path, into: list) -> None:
    """Append ``[event, path]`` to ``into`` for every change this process makes under ``watch``."""
    root = str(watch.resolve())

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        full = os.path.abspath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and inside(path):
                into.append([event, os.fsdecode(path)])
        elif event in CHANGES and inside(args[CHANGES[event]]):
            into.append([event, os.fsdecode(args[CHANGES[event]])])

    sys.addaudithook(hook)


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    changes: list = []
    if rank != 0:
        record_changes(Path(plan["watch"]), changes)
    from rlhf.cli import main as rlhf

    for argv in plan["commands"]:
        status = rlhf(argv)
        if status:
            return status
    seen = list(changes)  # the report file itself is outside `watch`
    Path(f"{plan['report']}.rank{rank}.json").write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
