"""Output folders that appear only when complete, and small file helpers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output(output_dir: str | os.PathLike):
    """Yield a staging folder beside ``output_dir``; on success it replaces ``output_dir``.

    If the body raises, the staging folder is removed and an existing
    ``output_dir`` is left as it was, so a failed run never leaves a
    half-written result behind.
    """
    final = Path(output_dir).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(final.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write one JSON object per line atomically (temp file + rename); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
