"""How a PPO step's rollouts split over N data-parallel processes: the launch check, and the mini-batches each
process trains (drawn as one process would draw them)."""

from __future__ import annotations

import os

import torch

from rlhf.errors import ConfigError, UserError
from rlhf.ppo.config import PPOStageConfig


def check_parallel(cfg: PPOStageConfig, world: int) -> None:
    """The global batch splits evenly over ``world`` processes, and the launch is data-parallel."""
    if world == 1:
        return
    for engine in ("DEEPSPEED", "FSDP"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true"):
            raise UserError(f"rlhf ppo runs data-parallel (each process holds the one base model), not under "
                            f"{engine.title() if engine == 'DEEPSPEED' else engine}: launch it with "
                            "configs/accelerate/multi_gpu.yaml (GPUs) or cpu_2proc.yaml; the DeepSpeed and FSDP "
                            "configs are for sft, reward and dpo")
    if cfg.prompts_per_step % world:
        raise ConfigError(f"rollout_batch_size {cfg.rollout_batch_size} is {cfg.prompts_per_step} prompts x "
                          f"{cfg.samples_per_prompt} samples: {cfg.prompts_per_step} prompts do not split evenly "
                          f"over {world} processes")
    if cfg.mini_batch_size % world:
        raise ConfigError(f"the mini-batch of {cfg.mini_batch_size} rollouts (rollout_batch_size / num_mini_batches) "
                          f"does not split evenly over {world} processes")


def mini_batch_rows(n: int, group: int, groups_per_batch: int, gen: torch.Generator, world: int = 1,
                    rank: int = 0) -> list[torch.Tensor]:
    """This process's rows of each mini-batch of one epoch, drawn as one process would draw them.

    The step's rollouts are ``world`` x ``n`` rows in groups of ``group`` consecutive rows; process r holds
    groups r*G .. r*G+G-1 of them (G = n // group) as its rows 0..n-1. One random order of all the groups
    (the same on every process: same generator) is cut into mini-batches of ``groups_per_batch`` groups, and
    each process takes the rows of its own groups in each, in that order. So N processes train on the
    mini-batches of 1 process: a process's share of one mini-batch varies, which the global token mean of the
    losses and the summed gradients allow for."""
    local = n // group
    order = torch.randperm(local * world, generator=gen)
    batches = []
    for chunk in order.split(groups_per_batch):
        mine = chunk[chunk // local == rank] - rank * local
        batches.append((mine[:, None] * group + torch.arange(group)).reshape(-1))
    return batches
