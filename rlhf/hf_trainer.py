"""Shared wiring between our stage configs and ``transformers``/TRL trainers."""

from __future__ import annotations

import os
import time

from rlhf.config import TrainingConfig


def trainer_kwargs(cfg: TrainingConfig, output_dir: str, has_eval: bool, eval_steps: int | None = None) -> dict:
    """Keyword arguments common to TRL's ``SFTConfig`` and ``RewardConfig`` built from our config."""
    from rlhf.models import checkpointing_argument, pick_device, pick_dtype

    device = pick_device()
    dtype = pick_dtype(cfg.precision, device)
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
        "use_cpu": device.type == "cpu",  # transformers refuses bf16 without a GPU unless told the run is on the CPU
        checkpointing_argument(): cfg.gradient_checkpointing,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        **eval_kwargs,
    }


def parallel_notice(trainer) -> str:
    """Warnings about an N-process launch, one per line, or "".

    - The launch asked for DeepSpeed or FSDP but accelerate runs something else: without a GPU ``rlhf.cli`` has
      accelerate use the CPU, and accelerate then trains plain data-parallel (DDP over gloo) whatever the config
      file says: correct, but nothing is sharded.
    - The training rows do not fill whole global batches: each epoch's last step repeats rows (see
      :func:`repeated_rows`), so the weights are not those of one process there.
    """
    notices = []
    asked = [name for name, var in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP"))
             if os.environ.get(var, "false").lower() == "true"]  # fmt: skip
    runs = trainer.accelerator.distributed_type.value
    world = trainer.accelerator.num_processes
    if asked and runs not in ("DEEPSPEED", "FSDP"):
        notices.append(f"warning: the accelerate config asks for {' and '.join(asked)}, but accelerate runs {runs} "
                       f"with {world} process(es) here (DeepSpeed and FSDP need GPUs): plain data-parallel "
                       "training, nothing sharded")
    n, per_device = len(trainer.train_dataset), trainer.args.per_device_train_batch_size
    repeated = repeated_rows(n, per_device, world)
    if repeated:
        notices.append(f"note: {n} training rows do not fill whole batches of {per_device} x {world} processes: "
                       f"each epoch's last step also trains {repeated} rows of its start again, to give every "
                       f"process a full batch (one process trains that step on {n % (per_device * world)} rows)")
    return "\n".join(notices)


def repeated_rows(n: int, per_device: int, world: int) -> int:
    """Rows that the last step of each epoch over ``n`` rows repeats on ``world`` processes of ``per_device``
    rows each: accelerate fills that step's shortfall with rows from the epoch's start, so every process gets
    a full batch. 0 on one process or when n is a multiple of the global batch."""
    whole = per_device * world
    return (-n) % whole if world > 1 else 0


class WholeEvalSet:
    """Mixin for a ``transformers.Trainer``: on N processes every process evaluates the whole eval set.

    ``Trainer`` gives each process 1/N of the eval set and, to keep the shares equal, pads the last one with
    repeats of the first examples, which then count in the loss and in TRL's metrics (DPO's reward accuracy,
    margins, log-probs). Here every process walks the batches one process would and keeps its own values
    (the trainer's cross-batch gather is skipped), so ``evaluate()`` returns the one-process figures. Inside a
    batch TRL still gathers over processes, i.e. N identical copies, whose means are the one-process means.
    Evaluation costs one process's time on each; training is still split. One process: ``Trainer`` as is.
    """

    def get_eval_dataloader(self, eval_dataset=None):
        if self.accelerator.num_processes == 1:
            return super().get_eval_dataloader(eval_dataset)
        import datasets
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        if isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]
        else:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        collate = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Evaluation")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="Evaluation")
        loader = DataLoader(dataset, batch_size=self.args.eval_batch_size, collate_fn=collate,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        # accelerate's wrapper for one "process" (no sharding): while iterated it is the loader gather_for_metrics
        # consults, even when an evaluation runs in the middle of a training epoch
        loader = prepare_data_loader(loader, num_processes=1, process_index=0, put_on_device=False)
        loader.whole_eval_set = True
        return loader

    def evaluation_loop(self, dataloader, *args, **kwargs):
        if not getattr(dataloader, "whole_eval_set", False):
            return super().evaluation_loop(dataloader, *args, **kwargs)
        saved, self.gather_function = self.gather_function, self._own_values
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self.gather_function = saved

    def _own_values(self, tensors, *args, **kwargs):
        """``gather_for_metrics`` of one process: every process already holds every value. The trainer repeats a
        batch's loss ``eval_batch_size`` times; in a short last batch only its real rows are kept."""
        from accelerate.utils import recursively_apply

        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            return recursively_apply(lambda t: t[: state.remainder], tensors)
        return tensors


def whole_eval_set(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`WholeEvalSet` mixed in."""
    return type(trainer_cls.__name__, (WholeEvalSet, trainer_cls), {"__module__": __name__})


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def finish_output(trainer, work, cfg, metrics: dict, seconds: float) -> None:
    """Rank 0's last writes into a TRL stage's staging folder: the tokenizer, ``run_config.yaml`` and
    ``metrics.json`` (with ``wall_time_s``), without the trainer's own checkpoints folder."""
    import shutil
    from pathlib import Path

    from rlhf.config import save_config
    from rlhf.outputs import write_json

    work = Path(work)
    trainer.processing_class.save_pretrained(str(work))
    shutil.rmtree(work / "trainer", ignore_errors=True)
    metrics["wall_time_s"] = seconds
    save_config(cfg, work / "run_config.yaml")
    write_json(work / "metrics.json", metrics)
