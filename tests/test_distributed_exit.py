"""A launched process destroys its process group before the interpreter shuts down (rlhf.distributed)."""

import atexit
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch.distributed as dist
from test_distributed_stages import CPU_2PROC, free_port

from rlhf import distributed

ROOT = Path(__file__).resolve().parents[1]


def test_destroy_at_exit_destroys_the_group_and_is_a_no_op_without_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        distributed.destroy_at_exit()
        assert not dist.is_initialized()
        distributed.destroy_at_exit()  # nothing left to destroy: no error
    finally:
        if dist.is_initialized():  # the other tests of this worker start without a group
            dist.destroy_process_group()


def test_an_nccl_group_is_left_to_the_interpreter(monkeypatch):
    destroyed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: destroyed.append(group))
    distributed.destroy_at_exit()
    assert destroyed == []
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo")
    distributed.destroy_at_exit()
    assert destroyed == [None]


def test_the_first_distributed_call_of_a_launched_process_registers_the_hook(monkeypatch):
    """A launched script that never calls prepare_environment itself (its group built by accelerate, say)."""
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(distributed, "_exit_hook", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed._dist() is dist
    assert registered == [distributed.destroy_at_exit]


def test_only_a_launched_process_registers_the_hook_and_only_once(monkeypatch):
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(distributed, "_exit_hook", False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.prepare_environment()
    assert registered == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # restored after the test: prepare_environment sets it
    distributed.prepare_environment()
    distributed.prepare_environment()
    assert registered == [distributed.destroy_at_exit]


def test_two_launched_processes_have_no_group_left_when_their_exit_handlers_run(tmp_path):
    """Each process registers a check before the group exists; exit handlers run last-registered first, so the
    check runs after destroy_at_exit and sees what the interpreter's shutdown would find."""
    script = tmp_path / "exit_check.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, os
        import torch.distributed as dist

        def check():
            out = {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.txt"
            with open(out, "w") as f:
                f.write(str(dist.is_initialized()))

        atexit.register(check)
        from rlhf import distributed
        assert distributed.world_size() == 2
        distributed.barrier()
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
