"""PPO checkpoints: exact resume, atomic writes, `latest` ignores incomplete folders."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.errors import UserError
from rlhf.ppo import checkpoint as ckpt
from rlhf.ppo.scorers import TokenCountScorer
from rlhf.ppo.stage import run_ppo
from test_ppo_stage import REWARDED, ppo_config


class Crash(Exception):
    pass


class CrashingScorer(TokenCountScorer):
    """Counts rewarded tokens; raises on call number ``crash_at`` (a killed run)."""

    def __init__(self, crash_at=None):
        super().__init__(REWARDED)
        self.calls, self.crash_at = 0, crash_at

    def score_batch(self, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash("killed")
        return super().score_batch(batch)


def _tensors(folder):
    return load_file(str(Path(folder) / "trainable.safetensors"))


def test_resume_reproduces_uninterrupted_run_exactly(tiny_model_dir, tmp_path):
    # adaptive KL, warm-up + linear schedule, 2 mini-batches x 2 epochs: every piece of state matters
    common = dict(max_steps=6, save_steps=3, kl_controller="adaptive", kl_coef=0.05, target_kl=0.5,
                  kl_horizon=100, warmup_steps=2, rollout_batch_size=4, num_mini_batches=2,
                  gradient_accumulation_steps=2, max_prompts=6)   # 6 prompts: the data position wraps an epoch
    full = run_ppo(ppo_config(tiny_model_dir, tmp_path / "full", **common), scorer=CrashingScorer())

    split = tmp_path / "split"
    with pytest.raises(Crash):   # dies while scoring step 5, after the step-3 checkpoint
        run_ppo(ppo_config(tiny_model_dir, split, **common), scorer=CrashingScorer(crash_at=5))
    assert ckpt.latest_checkpoint(split / "checkpoints").name == "step-000003"
    # leftovers of a run killed while writing a checkpoint must be ignored
    (split / "checkpoints" / ".tmp-step-000004-999").mkdir()
    (split / "checkpoints" / ".tmp-step-000004-999" / "trainable.safetensors").write_bytes(b"partial")
    (split / "checkpoints" / "step-000009").mkdir()   # no COMPLETE marker
    resumed = run_ppo(ppo_config(tiny_model_dir, split, resume_from_checkpoint="latest", **common),
                      scorer=CrashingScorer())

    a, b = _tensors(tmp_path / "full" / "checkpoints" / "step-000006"), _tensors(split / "checkpoints" / "step-000006")
    assert a.keys() == b.keys() and any(".value." in k for k in a) and "value_head.weight" in a
    for key in a:   # tolerance: exact (CPU, fixed seed, same thread count)
        assert torch.equal(a[key], b[key]), key
    ea = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    eb = load_file(str(split / "adapter_model.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    sa = json.loads((tmp_path / "full" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    sb = json.loads((split / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert sa["kl_controller"] == sb["kl_controller"] and sa["stream"] == sb["stream"]
    assert sa["history"] == sb["history"] and full["reward_last_steps"] == resumed["reward_last_steps"]
    assert not list((split / "checkpoints").glob(".tmp-*"))       # stale temp folders cleaned up
    steps = [json.loads(line)["step"] for line in (split / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]                              # step 4 of the killed run dropped


def test_latest_ignores_temp_and_incomplete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-000002", True), ("step-000010", True), ("step-000012", False),
                           (".tmp-step-000014-1", True), ("step-00001x", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / ckpt.COMPLETE).write_text("x")
    assert ckpt.latest_checkpoint(root).name == "step-000010"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000010"]
    assert ckpt.resolve_resume("latest", root).name == "step-000010"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step-000012"), root)
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.resolve_resume("latest", tmp_path / "empty")
    ckpt.clean_stale(root)
    assert not (root / ".tmp-step-000014-1").exists()


def test_save_killed_midway_leaves_no_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt") and "step-000002" in str(f):
            raise Crash("killed while writing")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(Crash):
        run_ppo(ppo_config(tiny_model_dir, tmp_path / "run", max_steps=3, save_steps=1), scorer=CrashingScorer())
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000001"]
    assert not (root / "step-000002").exists() and list(root.glob(".tmp-step-000002-*"))
    assert ckpt.latest_checkpoint(root).name == "step-000001"


def test_save_total_limit_prunes_oldest(tiny_model_dir, tmp_path):
    run_ppo(ppo_config(tiny_model_dir, tmp_path / "run", max_steps=4, save_steps=1, save_total_limit=2),
            scorer=CrashingScorer())
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-000003", "step-000004"]
    policy = tmp_path / "run" / "checkpoints" / "step-000004" / "policy"
    assert (policy / "adapter_config.json").is_file() and (policy / "adapter_model.safetensors").is_file()


def test_a_resume_that_does_not_fit_the_checkpoint_leaves_the_run_as_it_was(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_ppo(ppo_config(tiny_model_dir, out, max_steps=1, save_steps=1, lora_r=8), scorer=TokenCountScorer(REWARDED))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="lora_r is 4 but the run being resumed used 8"):
        run_ppo(ppo_config(tiny_model_dir, out, max_steps=2, lora_r=4, resume_from_checkpoint="latest"),
                scorer=TokenCountScorer(REWARDED))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_resumed_run_leaves_one_tensorboard_point_per_step(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = dict(max_steps=3, save_steps=1, report_to="tensorboard")
    run_ppo(ppo_config(tiny_model_dir, out, **common), scorer=TokenCountScorer(REWARDED))
    for step in ("step-000002", "step-000003"):  # as if the run had died after step 3 was logged, past checkpoint 1
        shutil.rmtree(out / "checkpoints" / step)
    run_ppo(ppo_config(tiny_model_dir, out, resume_from_checkpoint="latest", **common), scorer=TokenCountScorer(REWARDED))
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 2  # the first run's and the resumed run's
    run = EventAccumulator(str(out / "logs"))  # the folder's event files read in order, as TensorBoard shows them
    run.Reload()
    assert [e.step for e in run.Scalars("reward/mean")] == [1, 2, 3]


def test_a_resume_without_the_runs_sft_adapter_is_refused(tiny_model_dir, tmp_path):
    """Resuming with a config that leaves out the SFT adapter the run started from would train another policy."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.models import lora_config

    out, sft = tmp_path / "run", tmp_path / "sft"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   lora_config(4, 8, 0.0, ["q_proj", "v_proj"])).save_pretrained(sft)  # fmt: skip
    run_ppo(ppo_config(tiny_model_dir, out, max_steps=1, save_steps=1, sft_adapter=str(sft)),
            scorer=TokenCountScorer(REWARDED))  # fmt: skip
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="sft_adapter is None but the run being resumed used"):
        run_ppo(ppo_config(tiny_model_dir, out, max_steps=2, resume_from_checkpoint="latest"),
                scorer=TokenCountScorer(REWARDED))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

