"""The training-time budget (max_train_seconds / train_clock) on its own and in the stages that use it."""
import pytest

from rlhf import budget
from rlhf.budget import TimeBudget


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_budget_runs_out_on_its_own_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(budget.CLOCKS, "cpu", clock)
    b = TimeBudget(5.0, "cpu")
    clock.now = 104.9
    assert b.spent() == pytest.approx(4.9) and not b.exhausted()
    clock.now = 105.0
    assert b.exhausted()


def test_no_budget_never_runs_out(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(budget.CLOCKS, "wall", clock)
    b = TimeBudget(None, "wall")
    clock.now = 1e9
    assert not b.exhausted()


def test_unknown_clock_is_refused():
    with pytest.raises(ValueError, match="unknown clock"):
        TimeBudget(1.0, "gpu")


def test_config_refuses_a_non_positive_budget():
    from rlhf.errors import ConfigError
    from rlhf.ppo.config import PPOStageConfig

    with pytest.raises(ConfigError, match="max_train_seconds"):
        PPOStageConfig(max_train_seconds=0)


def test_ppo_stops_when_the_budget_is_used_and_saves_the_policy(tiny_model_dir, tmp_path):
    from rlhf.ppo.config import PPOStageConfig
    from rlhf.ppo.scorers import TokenCountScorer
    from rlhf.ppo.stage import run_ppo

    cfg = PPOStageConfig(
        model_name_or_path=tiny_model_dir, output_dir=str(tmp_path / "run"), max_steps=50, rollout_batch_size=2,
        max_new_tokens=4, lora_r=2, lora_alpha=4, lora_target_modules=["q_proj"], report_to="none",
        progress=False, sample_every=0, save_steps=0, max_train_seconds=1e-6, train_clock="cpu",
    )
    metrics = run_ppo(cfg, scorer=TokenCountScorer([10, 11]))
    assert metrics["steps"] == 1 and metrics["stopped_by_time_budget"] is True
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "COMPLETE").is_file()

