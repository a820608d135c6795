"""Shared wiring between our stage configs and ``transformers``/TRL trainers."""

from __future__ import annotations

import time

from rlhf.config import TrainingConfig


def trainer_kwargs(cfg: TrainingConfig, output_dir: str, has_eval: bool, eval_steps: int | None = None) -> dict:
    """Keyword arguments common to TRL's ``SFTConfig`` and ``RewardConfig`` built from our config."""
    from rlhf.models import pick_device, pick_dtype

    dtype = pick_dtype(cfg.precision, pick_device())
    eval_kwargs = {}
    if has_eval:
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": eval_steps or cfg.logging_steps}
    return {
        "output_dir": output_dir,
        "seed": cfg.seed,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_eval_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "bf16": dtype == __import__("torch").bfloat16,
        "fp16": cfg.precision == "fp16",
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        **eval_kwargs,
    }


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)
