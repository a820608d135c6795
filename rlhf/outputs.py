"""Output folders that appear only when complete, and small file helpers.

Checks of output paths raise :class:`~rlhf.errors.UserError` before any work starts, so a
bad path never costs a run and never moves, empties or replaces a file that is not ours.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rlhf.errors import UserError

# helper functions


def _first_existing(path: Path) -> Path:
    """``path`` itself or its nearest existing parent."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _check_parents(path: Path, key: str) -> None:
    """The nearest existing parent of ``path`` must be a writable folder."""
    existing = _first_existing(path.parent)
    if not existing.is_dir():
        raise UserError(f"{key} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path}: cannot write in {existing} (permission denied)")


def check_output_dir(output_dir: str | os.PathLike, key: str = "output_dir") -> Path:
    """Resolve an output folder; an existing file there (or above it) is a UserError naming ``key``."""
    if not str(output_dir).strip():
        raise UserError(f"config key '{key}' must not be empty")
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} {path} is an existing file, not a folder (choose another {key})")
    _check_parents(path, key)
    return path


def check_output_file(out: str | os.PathLike, key: str = "out") -> Path:
    """Resolve an output file; an existing folder there, or a file among its parents, is a UserError."""
    if not str(out).strip():
        raise UserError(f"config key '{key}' must not be empty")
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise UserError(f"{key} {path} is a folder; give a file name")
    _check_parents(path, key)
    return path


def check_not_input(out: str | os.PathLike, inputs: dict[str, str | None], key: str = "output_dir",
                    replaced: bool = True) -> None:  # fmt: skip
    """Refuse an output path that is one of the ``inputs`` (key -> path; None skipped) or, when the output
    is ``replaced`` as a whole (``staged_output``), holds one: writing it would destroy that input."""
    target = Path(out).expanduser().resolve()
    for name, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        if target == source or (replaced and target in source.parents):
            raise UserError(f"{key} {target} would replace {name} {value}; choose another {key}")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (else set and set back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask_mode(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file below a folder) the mode a plainly created file gets under the
    process's umask: ``safetensors`` and temporary files are written owner-only (0600), which would keep a
    model or a metrics file from the rest of a team."""
    path, mode = Path(path), 0o666 & ~current_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)


STAGE_FILES = ("run_config.yaml", "export.json")  # one of these marks a folder a stage (or export) wrote
STAGING_MARK = ".rlhf-staging"  # inside a staging folder while it is being filled


def check_replaceable(folder: Path, key: str = "output_dir") -> None:
    """An existing ``folder`` that a run would replace must be empty or hold a stage's output (:data:`STAGE_FILES`):
    a folder of anything else is a UserError, so that no file of the user's is lost."""
    if not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir())
    if entries and not any((folder / name).is_file() for name in STAGE_FILES):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{key} {folder} holds files no rlhf stage wrote ({shown}); it would be replaced: "
                        f"choose another {key} or empty it")


def check_staging(staging: Path, key: str = "output_dir") -> None:
    """A folder where the staging folder goes must be one an earlier run left (it holds :data:`STAGING_MARK`)."""
    if staging.exists() and not (staging / STAGING_MARK).is_file():
        raise UserError(f"{staging} is in the way of {key} (a run writes there before it moves the result into "
                        "place) and was not left by one; move it away")


@contextmanager
def created_parents(path: Path):
    """Create the missing parents of ``path``; remove the ones created here if the body raises."""
    missing = [p for p in path.parents if not p.exists()][::-1]  # top-down
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in reversed(missing):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        raise


@contextmanager
def staged_output(output_dir: str | os.PathLike, key: str = "output_dir"):
    """Yield a staging folder beside ``output_dir``; on success it replaces ``output_dir``.

    If the body raises, the staging folder (and any parent folder made for it) is removed and an
    existing ``output_dir`` is left as it was, so a failed run never leaves a half-written result
    behind. An ``output_dir`` that is an existing file is refused before anything is written.
    """
    final = check_output_dir(output_dir, key).resolve()
    check_replaceable(final, key)
    staging = staging_path(final)
    check_staging(staging, key)
    with created_parents(final):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / STAGING_MARK).touch()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists() and not final.is_dir():  # appeared while the run was going
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"{key} {final} became a file during the run; the result was discarded")
        (staging / STAGING_MARK).unlink()
        with_umask_mode(staging)
        if final.exists():  # moved aside under a name no other folder has, then removed
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old)  # replaces the empty folder
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)


def staging_path(final: Path) -> Path:
    """The folder :func:`staged_output` fills before it replaces ``final``."""
    return final.with_name(final.name + ".incomplete")


@contextmanager
def shared_staged_output(output_dir: str | os.PathLike, key: str = "output_dir"):
    """:func:`staged_output` for a stage that N launched processes run together; ``staged_output`` in one.

    Rank 0 prepares the staging folder and, once every process has left the body, publishes it; every
    process gets the same path (so a trainer's own files, such as checkpoints, have one place), and the
    others return only after the folder is published. Only rank 0 writes our files (the caller checks
    :func:`rlhf.distributed.is_main`). If a process fails, the launcher stops the others.
    """
    from rlhf import distributed

    if distributed.world_size() == 1:
        with staged_output(output_dir, key) as work:
            yield work
        return
    if distributed.is_main():
        with staged_output(output_dir, key) as work:
            distributed.barrier()  # 1: the staging folder exists
            yield work
            distributed.barrier()  # 2: every process is done with it
        distributed.barrier()  # 3: published
        return
    final = check_output_dir(output_dir, key).resolve()
    check_replaceable(final, key)  # refused here as on rank 0, instead of waiting for it (its staging may exist now)
    staging = staging_path(final)
    distributed.barrier()  # 1
    yield staging
    distributed.barrier()  # 2
    distributed.barrier()  # 3


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON file that must hold an object; unreadable, malformed or another type is a UserError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=float)
            f.write("\n")
        with_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write one JSON object per line atomically (temp file + rename); creates the parent folder."""
    path = check_output_file(path)
    with created_parents(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            with_umask_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def replace_files(out_dir: str | os.PathLike, write) -> None:
    """``write(staging)`` saves into a staging folder inside ``out_dir`` and returns the folder holding the
    files it wrote; each is then moved to the top level of ``out_dir`` (replacing its namesake atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for f in write(tmp).iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
