"""PPO runs for tests/test_ppo_parallel.py, started on 2 processes by
``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/ppo_parallel_driver.py MODEL WORK``.

Scenarios, each in ``WORK/<name>`` (a ``WORK/<name>.done`` marker is written by rank 0 when it ends):

* ``greedy_rpp`` (adaptive KL controller), ``greedy_gae``, ``greedy_rpp_2mb`` and ``greedy_rpp_4mb`` (two or four
  mini-batches per epoch, each drawn from both processes' rollouts; with four, some hold none of one process's rows): greedy rollouts (the same responses on 1 and 2 processes), compared
  by the test with a 1-process run of the same config (:func:`run` in the test's own process).
* ``sampled``: 2 sampled steps with a checkpoint after each; ``resumed``: a copy of it resumed from
  step 1 (RNG restored per process), compared with ``sampled``.
* ``crash``: the scorer fails on rank 1 at its second call; the launch must stop with its message.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from rlhf import distributed
from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.scorers import TokenCountScorer
from rlhf.ppo.stage import run_ppo
from rlhf.ppo.trainer import PPOTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
REWARDED = list(range(10, 42))
SCENARIOS = {
    "greedy_rpp": dict(advantage_estimator="reinforce_pp", samples_per_prompt=1, kl_controller="adaptive",
                       target_kl=0.01, kl_horizon=16),
    "greedy_gae": dict(advantage_estimator="gae", samples_per_prompt=1),
    "greedy_rpp_2mb": dict(advantage_estimator="reinforce_pp", samples_per_prompt=1, num_mini_batches=2,
                           gradient_accumulation_steps=2),
    # mini-batches of 2 of the 8 rows: some hold none of one process's rows (the test checks that it happens)
    "greedy_rpp_4mb": dict(advantage_estimator="reinforce_pp", samples_per_prompt=1, num_mini_batches=4,
                           per_device_train_batch_size=1, gradient_accumulation_steps=2),
    "sampled": dict(advantage_estimator="rloo", samples_per_prompt=2, save_steps=1),
}


def config(model_dir, out, **overrides) -> PPOStageConfig:
    """8 rollouts per step in one mini-batch (micro-batches of 2), 2 PPO epochs, 2 steps."""
    values = dict(
        model_name_or_path=str(model_dir), dataset_name="sample:prompts", output_dir=str(out), max_steps=2,
        rollout_batch_size=8, num_mini_batches=1, per_device_train_batch_size=2, gradient_accumulation_steps=4,
        per_device_eval_batch_size=1, ppo_epochs=2, max_new_tokens=6, temperature=1.0, learning_rate=3e-3,
        lr_scheduler_type="constant", lora_r=4, lora_alpha=8, lora_target_modules=TARGETS, missing_eos_penalty=None,
        kl_coef=0.05, report_to="none", progress=False, sample_every=0, save_steps=0, seed=7,
    )
    values.update(overrides)
    return PPOStageConfig(**values)


class greedy_rollouts:
    """Within the block, PPO samples greedily (deterministic rollouts, whatever the batch split)."""

    def __enter__(self):
        self.init = PPOTrainer.__init__

        def init(trainer, *args, **kwargs):
            self.init(trainer, *args, **kwargs)
            trainer.generate_kwargs["do_sample"] = False

        PPOTrainer.__init__ = init
        return self

    def __exit__(self, *exc):
        PPOTrainer.__init__ = self.init


def run(model_dir, work, name: str) -> dict:
    cfg = config(model_dir, Path(work) / name, **SCENARIOS[name])
    if name.startswith("greedy"):
        with greedy_rollouts():
            return run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    return run_ppo(cfg, scorer=TokenCountScorer(REWARDED))


class FailingScorer(TokenCountScorer):
    """Fails on rank 1 at its second call (the second PPO step)."""

    calls = 0

    def score_batch(self, batch):
        FailingScorer.calls += 1
        if distributed.rank() == 1 and FailingScorer.calls == 2:
            raise RuntimeError("scorer failed on rank 1")
        return super().score_batch(batch)


def done(work: Path, name: str) -> None:
    if distributed.is_main():
        (work / f"{name}.done").write_text(str(distributed.world_size()))
    distributed.barrier()


def main(model_dir: str, work: str) -> None:
    torch.set_num_threads(1)
    work = Path(work)
    for name in ("greedy_rpp", "greedy_gae", "greedy_rpp_2mb", "greedy_rpp_4mb", "sampled"):
        run(model_dir, work, name)
        done(work, name)
    if distributed.is_main():  # resume a copy of "sampled" from its step-1 checkpoint
        shutil.copytree(work / "sampled", work / "resumed")
        shutil.rmtree(work / "resumed" / "checkpoints" / "step-000002")
        (work / "resumed" / "adapter_model.safetensors").unlink()
    distributed.barrier()
    cfg = config(model_dir, work / "resumed", **SCENARIOS["sampled"],
                 resume_from_checkpoint=str(work / "resumed" / "checkpoints" / "step-000001"))
    run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    done(work, "resumed")
    run_ppo(config(model_dir, work / "crash", advantage_estimator="rloo", samples_per_prompt=2, save_steps=1,
                   max_steps=3), scorer=FailingScorer(REWARDED))
    done(work, "crash")  # not reached: rank 1 fails in step 2


if __name__ == "__main__":
    main(*sys.argv[1:3])
