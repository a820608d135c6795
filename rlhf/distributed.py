"""The process group, for stages that run on N processes (``accelerate launch``, ``torchrun``).

One code path serves 1 process and N: every helper is a no-op (or the identity) when the world
has one process. The group is the one accelerate sets up (``PartialState``: gloo on CPU, nccl on
GPUs), so a run started by ``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml``
and one started by ``torchrun --nproc_per_node 2`` behave alike.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch

__all__ = ["all_gather_object", "all_reduce_sum", "all_reduce_stats", "barrier", "broadcast_parameters",
           "destroy_at_exit", "is_main", "launched", "prepare_environment", "rank", "sum_gradients", "world_size"]

_exit_hook = False  # destroy_at_exit registered with atexit


def launched() -> bool:
    """True in a process that a launcher started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def prepare_environment() -> None:
    """Before anything builds accelerate's state: without a GPU, N launched processes form one gloo group;
    and the group is destroyed when the process exits (:func:`destroy_at_exit`).

    (``accelerate launch --multi_gpu`` on a machine without GPUs otherwise starts N processes that each
    believe they are alone, and ``distributed_type: MULTI_CPU`` starts one process unless run by mpirun.)
    """
    if not launched():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    _register_exit_hook()


def destroy_at_exit() -> None:
    """Destroy this process's process group, if it has one and it is not NCCL's (registered with ``atexit`` in a
    launched process).

    Left to the interpreter's shutdown, a gloo group's teardown can abort a process whose work is done
    ("terminate called without an active exception", exit status -6), which the launcher reports as a failed
    run. Destroying the group while Python is whole avoids that. An NCCL group is left as before: its destroy
    waits for pending collectives, which on a rank leaving on an error could last until NCCL's watchdog timeout.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and "nccl" not in dist.get_backend_config():
        dist.destroy_process_group()


def _register_exit_hook() -> None:
    global _exit_hook
    if not _exit_hook:
        atexit.register(destroy_at_exit)
        _exit_hook = True


def _dist():
    """torch.distributed, initialised through accelerate when this process was launched as one of N; else None."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if launched():
        _register_exit_hook()  # also when something else built the group
    if not dist.is_initialized():
        if not launched():
            return None
        from accelerate import PartialState

        prepare_environment()
        PartialState()  # initialises the default process group from the launcher's environment
    return dist if dist.is_initialized() and dist.get_world_size() > 1 else None


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all processes (a new tensor; ``t`` itself when there is one)."""
    d = _dist()
    if not d:
        return t
    out = t.detach().clone()
    d.all_reduce(out, op=d.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    d = _dist()
    if not d:
        return [obj]
    out: list = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def all_reduce_stats(stats: dict[str, float], reduce: dict | None = None) -> dict[str, float]:
    """Log statistics over all processes: the mean of each value, or ``reduce[key]`` (sum, max, min)."""
    if world_size() == 1:
        return stats
    reduce = reduce or {}
    keys = sorted(stats)
    gathered = all_gather_object([stats[k] for k in keys])
    out = {}
    for i, k in enumerate(keys):
        values = [g[i] for g in gathered]
        out[k] = reduce.get(k, lambda v: sum(v) / len(v))(values)
    return out


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of ``params`` in one flat buffer; a missing gradient counts as 0.

    The losses are normalised by global token counts, so the sum is the gradient of the global loss.
    """
    d = _dist()
    if not d or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    d.all_reduce(flat, op=d.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


@torch.no_grad()
def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of ``params`` to every process (all ranks start from the same weights)."""
    d = _dist()
    if not d or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    d.broadcast(flat, src=0)
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
