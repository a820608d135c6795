"""PPO on 2 processes (gloo, the shipped configs/accelerate/cpu_2proc.yaml) against 1 process.

One launch of tests/ppo_parallel_driver.py runs every 2-process scenario (see its docstring); the
1-process references run here. Tolerance of the equivalence: trained LoRA tensors within 1e-5
absolute (float32 sums taken in another order; greedy rollouts make the responses identical).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed_stages import CPU_2PROC, free_port

from rlhf.errors import ConfigError, UserError
from rlhf.ppo.sharding import check_parallel

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "ppo_parallel_driver.py"
TOLERANCE = 1e-5


def _driver():
    spec = importlib.util.spec_from_file_location("ppo_parallel_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """(work folder, completed process) of one 2-process launch of the driver."""
    work = tmp_path_factory.mktemp("ppo_parallel")
    env = {**os.environ, "RLHF_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(free_port()), str(DRIVER), tiny_model_dir, str(work)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return work, proc


def _adapter(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _logged(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "logs" / "metrics.jsonl").read_text().splitlines()]


def _completed(work, name) -> int:
    """The world size the scenario ran on (its marker holds it); fails if it did not finish."""
    marker = work / f"{name}.done"
    assert marker.is_file(), f"scenario {name} did not finish"
    return int(marker.read_text())


@pytest.mark.parametrize("name", ["greedy_rpp", "greedy_gae", "greedy_rpp_2mb", "greedy_rpp_4mb"])
def test_two_processes_train_the_same_weights_as_one(launched, tiny_model_dir, tmp_path, name):
    work, proc = launched
    assert _completed(work, name) == 2, proc.stderr[-3000:]
    two = json.loads((work / name / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["rollouts"] == 16
    one = _driver().run(tiny_model_dir, tmp_path, name)
    assert one["world_size"] == 1
    a, b = _adapter(tmp_path / name), _adapter(work / name)
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the runs trained (LoRA B starts at 0)
    assert _max_diff(a, b) < TOLERANCE
    assert one["score_first_steps"] == pytest.approx(two["score_first_steps"], abs=1e-6)
    # the KL controller counts the whole step's rollouts, whatever their split over processes
    assert one["kl_coef_final"] == pytest.approx(two["kl_coef_final"], rel=1e-6)
    if name == "greedy_rpp":
        assert two["kl_coef_final"] != pytest.approx(0.05, rel=1e-3)  # the adaptive controller moved it
    # the logged spreads and token means are those of the whole step's rollouts, not means of each process's
    spread = ["reward/std", "score/raw_std", "advantage/mean", "advantage/std", "policy/entropy"]
    spread += ["value/explained_variance", "value/mean"] if name == "greedy_gae" else []
    for got, want in zip(_logged(work / name), _logged(tmp_path / name), strict=True):
        want = pytest.approx({k: want[k] for k in spread}, rel=1e-4, abs=1e-5, nan_ok=True)  # step 1: var(R) = 0
        assert {k: got[k] for k in spread} == want


def test_the_four_mini_batch_scenario_gives_a_process_an_empty_share():
    """greedy_rpp_4mb is there to run a mini-batch in which one process has no rows (it must still join the
    gradient sum): its seed and steps draw such a mini-batch (the draw of trainer.update)."""
    from rlhf.ppo.sharding import mini_batch_rows

    cfg = _driver().config("model", Path("out"), **_driver().SCENARIOS["greedy_rpp_4mb"])
    shares = [len(rows) for step in range(cfg.max_steps) for rank in (0, 1)
              for rows in mini_batch_rows(cfg.rollout_batch_size // 2, 1, cfg.mini_batch_size,
                                          torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), 2, rank)]
    assert 0 in shares and cfg.ppo_epochs >= 1


def test_only_rank_0_writes_one_output_folder(launched):
    work, proc = launched
    assert _completed(work, "sampled") == 2
    out = work / "sampled"
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    assert "time/allreduce_s" in rows[0] and 0 <= rows[0]["time/communication_share"] < 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    step = out / "checkpoints" / "step-000002"
    assert (step / "rng.pt").is_file() and (step / "rng-rank1.pt").is_file()
    assert json.loads((step / "trainer_state.json").read_text())["world_size"] == 2
    assert not list(out.rglob(".tmp-*"))


def test_resume_on_two_processes_equals_the_uninterrupted_run(launched):
    work, proc = launched
    assert _completed(work, "resumed") == 2, proc.stderr[-3000:]
    full, resumed = _adapter(work / "sampled"), _adapter(work / "resumed")
    assert _max_diff(full, resumed) < TOLERANCE
    rows = [json.loads(line) for line in (work / "resumed" / "logs" / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (work / "sampled" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["score/raw_mean"] == first[1]["score/raw_mean"]  # the same samples: RNG restored per process


def test_a_crash_on_rank_1_stops_the_run_without_half_written_output(launched):
    work, proc = launched
    assert proc.returncode != 0
    assert "scorer failed on rank 1" in proc.stderr
    assert not (work / "crash.done").exists()
    out = work / "crash"
    assert not (out / "adapter_model.safetensors").exists() and not (out / "metrics.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # the last complete step only
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()


def test_the_global_batch_must_split_over_the_processes(tiny_model_dir, tmp_path, monkeypatch):
    driver = _driver()
    cfg = driver.config(tiny_model_dir, tmp_path, rollout_batch_size=6, gradient_accumulation_steps=3,
                        samples_per_prompt=2, advantage_estimator="rloo")
    check_parallel(cfg, 1)
    with pytest.raises(ConfigError, match="3 prompts do not split evenly over 2 processes"):
        check_parallel(cfg, 2)
    cfg = driver.config(tiny_model_dir, tmp_path, rollout_batch_size=12, num_mini_batches=4,
                        gradient_accumulation_steps=1, per_device_train_batch_size=3)
    with pytest.raises(ConfigError, match="mini-batch of 3 rollouts"):
        check_parallel(cfg, 2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="data-parallel"):
        check_parallel(driver.config(tiny_model_dir, tmp_path), 2)


def test_the_shipped_ppo_config_splits_over_up_to_four_processes():
    """configs/ppo.yaml's 32 rollouts are 4 prompts of 8 samples: 1, 2 or 4 processes; 8 need 64 rollouts (README)."""
    from rlhf.config import parse_config
    from rlhf.ppo.config import PPOStageConfig

    shipped = ["--config", str(ROOT / "configs" / "ppo.yaml")]
    cfg = parse_config(PPOStageConfig, shipped)
    for world in (1, 2, 4):
        check_parallel(cfg, world)
    with pytest.raises(ConfigError, match="4 prompts do not split evenly over 8 processes"):
        check_parallel(cfg, 8)
    check_parallel(parse_config(PPOStageConfig, shipped + ["--rollout_batch_size", "64"]), 8)


def test_pipeline_launches_a_stage_on_two_processes(tiny_model_dir, tmp_path, monkeypatch):
    """`rlhf pipeline --num_processes 2` runs `rlhf ppo` itself under accelerate launch (no driver)."""
    from rlhf.pipeline import PipelineConfig
    from rlhf.pipeline_steps import launched

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = PipelineConfig(work_dir=str(tmp_path / "work"), num_processes=2)
    stage = _driver().config(tiny_model_dir, tmp_path / "work" / "ppo", reward_model="rule", max_steps=1,
                             advantage_estimator="rloo", samples_per_prompt=2)
    launched(cfg, "ppo", stage, lambda: pytest.fail("ran in this process"))()
    metrics = json.loads((tmp_path / "work" / "ppo" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["rollouts"] == 8
    assert (tmp_path / "work" / "launch" / "ppo.yaml").is_file()
