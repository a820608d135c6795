"""Atomic PPO checkpoints and resume.

A checkpoint ``checkpoints/step-000012/`` holds::

    trainable.safetensors   every trainable tensor (policy + value adapters, value head), exact
    policy/                 the policy adapter in PEFT format (usable on its own)
    optimizer.pt scheduler.pt rng.pt  (rng-rank1.pt ... for the other processes of a multi-process run)
    trainer_state.json      step, KL controller, prompt-stream position, per-step history
    COMPLETE                written last

It is written into ``checkpoints/.tmp-step-000012/`` and renamed into place
only when complete, so a killed run leaves at most a ``.tmp-*`` folder, which
:func:`latest_checkpoint` ignores (and :func:`clean_stale` removes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from rlhf.errors import UserError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# helper functions


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step (temp and incomplete folders are ignored)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_stale(root: str | os.PathLike) -> None:
    """Remove ``.tmp-*`` folders a killed run left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(value: str, root: str | os.PathLike) -> Path:
    """``latest`` -> newest complete checkpoint in ``root``; else a checkpoint folder that must be complete."""
    if value == "latest":
        found = latest_checkpoint(root)
        if found is None:
            raise UserError(f"resume_from_checkpoint: latest, but {root} holds no complete checkpoint")
        return found
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: folder not found: {value}")
    if not is_complete(path):
        raise UserError(f"resume_from_checkpoint: {value} is not a complete checkpoint (no {COMPLETE} file)")
    return path


# save / load


def rng_file(rank: int) -> str:
    """The RNG state file of process ``rank`` (``rng.pt`` for rank 0 and a single process)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(root: str | os.PathLike, step: int, *, actor, optimizer, scheduler, state: dict,
                    base_name_or_path: str | None = None, keep: int | None = None,
                    rng_states: list | None = None) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; prune to the ``keep`` newest. Returns its path.

    ``rng_states``: the RNG state of each process of a multi-process run (rank order); None: this one's.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in actor.named_trainable}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    actor.save_policy(tmp / "policy", base_name_or_path)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for rank, rng in enumerate(rng_states or [rng_state()]):
        torch.save(rng, tmp / rng_file(rank))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=float))
    (tmp / COMPLETE).write_text(str(step))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap in the new one
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        final.rename(old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, *, actor, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore tensors, optimizer, scheduler and RNG (process ``rank``'s) from ``path``; returns the trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = [n for n, _ in actor.named_trainable if n not in tensors]
    if missing:
        raise UserError(f"checkpoint {path} does not match this model/config (missing {missing[0]})")
    with torch.no_grad():
        for name, p in actor.named_trainable:
            if tensors[name].shape != p.shape:
                raise UserError(f"checkpoint {path} does not match this model/config ({name} has another shape)")
            p.copy_(tensors[name].to(p.device, p.dtype))
    device = actor.lm_head.weight.device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if not (path / rng_file(rank)).is_file():
        raise UserError(f"checkpoint {path} has no RNG state for process {rank}: it was written by fewer processes")
    set_rng_state(torch.load(path / rng_file(rank), weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
