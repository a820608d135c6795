"""The SFT stage: supervised fine-tuning with LoRA or another method, via TRL's SFTTrainer."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import Literal, Optional, TrainingConfig, check_lora_keys, field, require
from rlhf.data import fingerprint, load_sft_dataset, split_train_eval
from rlhf.errors import ConfigError
from rlhf.hf_trainer import Stopwatch, finish_output, parallel_notice, trainer_kwargs, whole_eval_set
from rlhf.outputs import check_not_input, shared_staged_output

if TYPE_CHECKING:  # the config above is imported by the CLI parser: torch & co. load only when a run starts
    from torch import nn

    from rlhf.tracking import MetricsLogger


@dataclasses.dataclass
class SFTStageConfig(TrainingConfig):
    """Options of ``rlhf sft``."""

    dataset_name: str = field("sample:sft", "SFT data with `messages` or `prompt`/`completion` columns")
    output_dir: str = field("outputs/sft", "folder for the adapter (or full model), metrics.json, run_config.yaml")
    eval_dataset_name: Optional[str] = field(None, "separate validation file (overrides eval_fraction)")
    eval_fraction: float = field(0.1, "fraction of the training data held out for eval loss (0 disables)")
    eval_steps: int = field(10, "evaluate every N optimizer steps")
    early_stopping_patience: int = field(0, "stop after N evaluations without eval-loss improvement (0 = off)")
    method: Literal["lora", "full", "freeze", "prompt_tuning", "prefix_tuning", "loreft", "bottleneck_adapter"] = field(
        "lora", "what is trained"
    )
    lora_r: int = field(16, "LoRA rank")
    lora_alpha: int = field(32, "LoRA scaling alpha")
    lora_dropout: float = field(0.05, "LoRA dropout")
    lora_target_modules: list[str] = field(["all-linear"], "modules LoRA wraps (comma-separated names or all-linear)")
    freeze_trainable_layers: int = field(2, "method=freeze: number of top transformer blocks trained (plus head)")
    num_virtual_tokens: int = field(20, "prompt_tuning/prefix_tuning: number of virtual tokens")
    reft_rank: int = field(4, "loreft: rank r of each intervention")
    reft_layers: list[int] = field([], "loreft: blocks whose outputs are edited (negative = from the top; empty = all)")
    adapter_reduction_factor: int = field(
        16, "bottleneck_adapter: hidden size / bottleneck width of each adapter (16: width 36 on a 576-wide model)"
    )
    adapter_placement: Literal["attention", "mlp", "both"] = field(
        "mlp", "bottleneck_adapter: adapters after every block's MLP (Pfeiffer), attention, or both (Houlsby)"
    )
    adapter_non_linearity: Literal["relu", "gelu", "silu", "tanh"] = field(
        "relu", "bottleneck_adapter: activation between the down- and up-projection"
    )
    completion_only_loss: bool = field(True, "compute the loss only on the assistant completion")
    max_length: int = field(512, "truncate examples to this many tokens")
    max_train_samples: Optional[int] = field(None, "use at most this many training examples")

    def __post_init__(self):
        super().__post_init__()
        check_lora_keys(self)
        require(self.freeze_trainable_layers >= 1, "config key 'freeze_trainable_layers' must be >= 1")
        require(self.num_virtual_tokens >= 1, "config key 'num_virtual_tokens' must be >= 1")
        require(self.reft_rank >= 1, "config key 'reft_rank' must be >= 1")
        require(self.adapter_reduction_factor >= 1, "config key 'adapter_reduction_factor' must be >= 1")
        require(0 <= self.eval_fraction < 1, "config key 'eval_fraction' must be in [0, 1)")
        require(self.eval_steps >= 1, "config key 'eval_steps' must be >= 1")
        require(self.max_length >= 16, "config key 'max_length' must be >= 16")
        require(self.early_stopping_patience >= 0, "config key 'early_stopping_patience' must be >= 0")
        require(
            self.max_train_samples is None or self.max_train_samples >= 1, "config key 'max_train_samples' must be >= 1"
        )
        if self.early_stopping_patience and not (self.eval_fraction > 0 or self.eval_dataset_name):
            raise ConfigError("config key 'early_stopping_patience' needs a validation split (eval_fraction or eval_dataset_name)")


# helper functions


def freeze_lower_layers(model: nn.Module, n_trainable: int) -> None:
    """Train only the top ``n_trainable`` blocks, the final norm and the output head."""
    from rlhf.hooked import decoder_layers

    prefix, layers = decoder_layers(model)
    if n_trainable > len(layers):
        raise ConfigError(f"config key 'freeze_trainable_layers' is {n_trainable} but the model has {len(layers)} blocks")
    model.requires_grad_(False)
    for block in list(layers)[-n_trainable:]:
        block.requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)
    for name, module in model.named_modules():  # the final norm (norm, ln_f, final_layer_norm; not an embeddings' one)
        outside = name and not name.startswith(prefix + ".") and "embed" not in name
        if outside and type(module).__name__.endswith("Norm"):
            module.requires_grad_(True)


def peft_config_for(cfg: SFTStageConfig):
    """The PEFT config for adapter methods, None for full/freeze."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType

    from rlhf.models import lora_config

    if cfg.method == "lora":
        return lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.method == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    return None


def build_trainer(cfg: SFTStageConfig, work_dir: Path, logger: MetricsLogger | None = None):
    """SFTTrainer for ``cfg`` writing into ``work_dir`` (data loaded and validated first)."""
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from rlhf.bottleneck import attach_bottleneck
    from rlhf.budget import stage_callbacks
    from rlhf.hooked import decoder_layers
    from rlhf.models import check_lora_targets, load_base_model, load_tokenizer, pick_device, pick_dtype
    from rlhf.reft import attach_reft

    dataset = load_sft_dataset(cfg.dataset_name)
    eval_dataset = load_sft_dataset(cfg.eval_dataset_name) if cfg.eval_dataset_name else None
    train, evaluation = split_train_eval(dataset, cfg.eval_fraction, cfg.seed, eval_dataset)
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    set_seed(cfg.seed)  # adapter / intervention initialisation is part of the run
    device = pick_device()
    model = load_base_model(cfg.model_name_or_path, dtype=pick_dtype(cfg.precision, device), device=device)
    if cfg.method == "lora":
        check_lora_targets(model, cfg.lora_target_modules)
    if cfg.method == "freeze":
        freeze_lower_layers(model, cfg.freeze_trainable_layers)
    if cfg.method == "loreft":
        n_blocks = len(decoder_layers(model)[1])
        if any(not -n_blocks <= i < n_blocks for i in cfg.reft_layers):
            raise ConfigError(f"config key 'reft_layers' must index the model's {n_blocks} blocks")
        attach_reft(model, cfg.reft_layers or list(range(n_blocks)), cfg.reft_rank)
    if cfg.method == "bottleneck_adapter":
        attach_bottleneck(model, cfg.adapter_reduction_factor, cfg.adapter_placement, cfg.adapter_non_linearity)

    kwargs = trainer_kwargs(cfg, str(work_dir / "trainer"), evaluation is not None, cfg.eval_steps)
    callbacks = stage_callbacks(cfg, logger)
    if cfg.early_stopping_patience:
        kwargs.update(
            save_strategy="steps",
            save_steps=cfg.eval_steps,
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
        )
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    args = SFTConfig(
        **kwargs,
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
    )
    return whole_eval_set(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config_for(cfg),
        callbacks=callbacks,
    )


def run_sft(cfg: SFTStageConfig) -> dict:
    """Train and write ``cfg.output_dir`` (adapter or model, tokenizer, run_config.yaml, metrics.json).

    Launched on N processes, every process trains (TRL's trainer shards the batches and synchronises the
    gradients) and rank 0 alone writes the folder.
    """
    from rlhf import distributed
    from rlhf.budget import stopped_by_budget
    from rlhf.hooked import attached_adapter
    from rlhf.models import count_parameters
    from rlhf.tracking import MetricsLogger

    watch = Stopwatch()
    check_not_input(cfg.output_dir, {"dataset_name": cfg.dataset_name, "eval_dataset_name": cfg.eval_dataset_name,
                                     "model_name_or_path": cfg.model_name_or_path})  # fmt: skip
    main, world = distributed.is_main(), distributed.world_size()
    with shared_staged_output(cfg.output_dir) as work:
        logger = MetricsLogger(work / "logs", tensorboard=cfg.report_to == "tensorboard") if main else None
        trainer = build_trainer(cfg, work, logger)
        trainable, total = count_parameters(trainer.model)
        if main:
            print(
                f"SFT ({cfg.method}): {len(trainer.train_dataset)} train examples, "
                f"{trainable:,} of {total:,} parameters trainable" + (f", {world} processes" if world > 1 else ""),
                file=sys.stderr,
            )
            notice = parallel_notice(trainer)
            if notice:
                print(notice, file=sys.stderr)
        result = trainer.train()
        metrics = {
            "method": cfg.method,
            "world_size": world,
            "train_loss": result.metrics.get("train_loss"),
            "train_examples": len(trainer.train_dataset),
            "steps": trainer.state.global_step,
            "stopped_by_time_budget": stopped_by_budget(trainer),
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "dataset_fingerprint": fingerprint(cfg.dataset_name),
        }
        if trainer.eval_dataset is not None:
            eval_loss = trainer.evaluate()["eval_loss"]
            metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
            metrics["eval_examples"] = len(trainer.eval_dataset)
        if logger is not None:
            logger.close()
        hooked = attached_adapter(trainer.model)  # loreft, bottleneck_adapter: saved as their own files
        if hooked is None:
            trainer.save_model(str(work))  # every process: sharded set-ups gather the weights; rank 0 writes
        runtime = max(result.metrics.get("train_runtime", 1e-9), 1e-9)
        metrics["tokens_per_s"] = round(metrics["tokens_seen"] / runtime, 1)
        if main:
            if hooked is not None:
                hooked.save(work)
            finish_output(trainer, work, cfg, metrics, watch.seconds)
    if not main:
        return metrics
    eval_part = f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
    print(f"SFT done in {metrics['wall_time_s']:.0f}s: {cfg.output_dir}{eval_part}", file=sys.stderr)
    return metrics
