"""The reward-model stage: ``rlhf reward --config configs/reward.yaml``.

A scalar reward model (``*ForSequenceClassification``, one label) trained with TRL's
``RewardTrainer`` on preference pairs (Bradley-Terry loss, minus the data's ``margin`` when it
has one), LoRA on the trunk and the ``score`` head trained in full (``modules_to_save``). The base
is ``model_name_or_path``, or that base with the LoRA ``sft_adapter`` merged into its weights.

Output folder (written through ``staged_output``, so nothing appears if the run fails)::

    output_dir/
      adapter_config.json, adapter_model.safetensors   RM LoRA + score head (PEFT, task SEQ_CLS)
      tokenizer files                                  the tokenizer the RM was trained with
      reward_model.json                                base, merged SFT adapter, max_length, input layout
      sft_adapter/                                     copy of the merged SFT adapter (only with sft_adapter)
      reward_stats.json                                mean/std of rewards on training responses (PPO normalisation)
      run_config.yaml, metrics.json, logs/             resolved config, results, metrics.jsonl + TensorBoard
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reward.pairs_format import split_by_prompt
from rlhf.config import Optional, TrainingConfig, field, require, save_config
from rlhf.errors import DataError
from rlhf.hf_trainer import Stopwatch, trainer_kwargs
from rlhf.outputs import staged_output, write_json

if TYPE_CHECKING:  # the config below is imported by the CLI parser: transformers loads only when a run starts
    from rlhf.tracking import MetricsLogger

LENGTH_WARNING = 0.5  # |Pearson(reward, response tokens)| above this is reported as a warning sign


@dataclasses.dataclass
class RewardStageConfig(TrainingConfig):
    """Options of ``rlhf reward``."""

    dataset_name: str = field(
        "outputs/prefs.jsonl", "preference pairs: prompt/chosen/rejected[/margin], HH-style or message lists"
    )
    output_dir: str = field("outputs/reward", "folder for the reward model, reward_stats.json, metrics.json")
    learning_rate: float = field(2e-4, "peak learning rate")
    sft_adapter: Optional[str] = field(None, "LoRA SFT adapter merged into the base before the RM LoRA is added")
    eval_dataset_name: Optional[str] = field(None, "separate held-out preference file (overrides eval_fraction)")
    eval_fraction: float = field(0.1, "fraction of distinct prompts held out (all their pairs) for accuracy")
    eval_steps: int = field(0, "also evaluate every N optimizer steps during training (0 = only at the end)")
    lora_r: int = field(16, "LoRA rank")
    lora_alpha: int = field(32, "LoRA scaling alpha")
    lora_dropout: float = field(0.0, "LoRA dropout (TRL disables dropout while training unless keep_dropout)")
    lora_target_modules: list[str] = field(["all-linear"], "modules LoRA wraps (comma-separated names or all-linear)")
    lora_top_layers: int = field(0, "put LoRA only on the top N transformer blocks (cheaper backward); 0 = all")
    keep_dropout: bool = field(False, "keep dropout active while training (TRL's disable_dropout=false)")
    max_length: int = field(512, "keep at most the last N tokens of prompt + response + EOS")
    use_margin: bool = field(True, "subtract the data's `margin` column inside the loss when present")
    center_rewards_coefficient: Optional[float] = field(
        None, "weight of the mean((r_c + r_r)^2) penalty (centres rewards)"
    )
    max_train_samples: Optional[int] = field(None, "use at most this many training pairs")
    stats_max_pairs: int = field(256, "training pairs scored for reward_stats.json (both responses each)")

    def __post_init__(self):
        super().__post_init__()
        require(self.lora_r >= 1, "config key 'lora_r' must be >= 1")
        require(self.lora_alpha >= 1, "config key 'lora_alpha' must be >= 1")
        require(0 <= self.lora_dropout < 1, "config key 'lora_dropout' must be in [0, 1)")
        require(bool(self.lora_target_modules), "config key 'lora_target_modules' must not be empty")
        require(self.lora_top_layers >= 0, "config key 'lora_top_layers' must be >= 0")
        require(0 <= self.eval_fraction < 1, "config key 'eval_fraction' must be in [0, 1)")
        require(self.eval_steps >= 0, "config key 'eval_steps' must be >= 0")
        require(self.max_length >= 16, "config key 'max_length' must be >= 16")
        require(
            self.max_train_samples is None or self.max_train_samples >= 1, "config key 'max_train_samples' must be >= 1"
        )
        require(self.stats_max_pairs >= 1, "config key 'stats_max_pairs' must be >= 1")
        if self.sft_adapter:
            require(Path(self.sft_adapter).is_dir(), f"config key 'sft_adapter': folder not found: {self.sft_adapter}")
        require(
            not self.eval_steps or self.eval_fraction > 0 or bool(self.eval_dataset_name),
            "config key 'eval_steps' needs held-out pairs (eval_fraction > 0 or eval_dataset_name)",
        )


# helper functions


def lora_config_for(cfg: RewardStageConfig, num_layers: int):
    """LoRA for sequence classification; the score head is trained in full and saved with the adapter."""
    from rlhf.models import lora_config

    return lora_config(
        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="SEQ_CLS",
        top_layers=cfg.lora_top_layers, num_layers=num_layers, modules_to_save=["score"],
    )


def load_splits(cfg: RewardStageConfig):
    """(train pairs, held-out pairs): held out by prompt, or a separate file."""
    from reward.data import load_pairs

    pairs = load_pairs(cfg.dataset_name)
    if cfg.eval_dataset_name:
        train, held = pairs, load_pairs(cfg.eval_dataset_name)
    else:
        train, held = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if not train:
        raise DataError(f"dataset {cfg.dataset_name} leaves no training pairs")
    return train, held


def build_trainer(cfg: RewardStageConfig, work: Path, train_pairs, held_pairs, logger: MetricsLogger | None):
    """A :class:`~reward.trainer.PairwiseRewardTrainer` on the (SFT-merged) base with a fresh RM LoRA."""
    from trl import RewardConfig

    from reward.data import pairs_to_dataset
    from reward.modeling import build_reward_model
    from reward.trainer import PairwiseRewardTrainer
    from rlhf.models import load_tokenizer, pick_device, pick_dtype
    from rlhf.tracking import LoggerCallback

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    device = pick_device()
    model = build_reward_model(
        cfg.model_name_or_path, cfg.sft_adapter, dtype=pick_dtype(cfg.precision, device), device=device, seed=cfg.seed
    )
    with_margin = cfg.use_margin and any(p.margin is not None for p in train_pairs)
    train_ds = pairs_to_dataset(tokenizer, train_pairs, cfg.max_length, with_margin)
    periodic = bool(cfg.eval_steps and held_pairs)
    eval_ds = pairs_to_dataset(tokenizer, held_pairs, cfg.max_length, with_margin) if periodic else None
    args = RewardConfig(
        **trainer_kwargs(cfg, str(work / "trainer"), periodic, cfg.eval_steps or None),
        max_length=None,  # sequences are already left-truncated to cfg.max_length
        disable_dropout=not cfg.keep_dropout,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        dataset_num_proc=None,
        dataloader_pin_memory=device.type == "cuda",
    )
    num_layers = model.config.get_text_config().num_hidden_layers
    return PairwiseRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config_for(cfg, num_layers),
        callbacks=[LoggerCallback(logger)] if logger else [],
    )


def training_stats(scorer, pairs, max_pairs: int, seed: int, batch_size: int) -> dict:
    """Mean/std of rewards over both responses of up to ``max_pairs`` training pairs (seeded sample)."""
    from reward.evaluate import score_pairs
    from reward.losses import mean_std

    sample = list(pairs)
    random.Random(seed).shuffle(sample)
    scored = score_pairs(scorer, sample[:max_pairs], batch_size)
    rewards = scored["chosen"] + scored["rejected"]
    mean, std = mean_std(rewards)
    return {"mean": mean, "std": std, "n": len(rewards), "source": "training pairs (chosen and rejected responses)"}


def final_evaluation(cfg: RewardStageConfig, scorer, train_pairs, held_pairs) -> tuple[dict, dict]:
    """(``eval_*`` metrics on the held-out pairs, reward statistics of training responses); prints a summary."""
    from reward.evaluate import evaluate_pairs, format_summary

    metrics = {}
    if held_pairs:
        held = evaluate_pairs(scorer, held_pairs, cfg.per_device_eval_batch_size)
        metrics = {f"eval_{k}": v for k, v in held.items() if k != "n"}
        print("held-out: " + format_summary(held), file=sys.stderr)
        corr = held.get("length_correlation")
        if corr is not None and abs(corr) > LENGTH_WARNING:
            print(
                f"warning: held-out rewards correlate with response length (Pearson {corr:+.2f}); "
                "the RM may be rewarding length itself",
                file=sys.stderr,
            )
    stats = training_stats(scorer, train_pairs, cfg.stats_max_pairs, cfg.seed, cfg.per_device_eval_batch_size)
    metrics.update(train_reward_mean=stats["mean"], train_reward_std=stats["std"])
    return metrics, stats


def run_reward(cfg: RewardStageConfig) -> dict:
    """Train the RM and write ``cfg.output_dir``; returns the metrics written to ``metrics.json``."""
    from reward.modeling import SFT_COPY, write_metadata
    from reward.scorer import RewardScorer
    from rlhf.data import fingerprint
    from rlhf.models import count_parameters, resolve_model_path
    from rlhf.tracking import MetricsLogger

    watch = Stopwatch()
    train_pairs, held_pairs = load_splits(cfg)
    with staged_output(cfg.output_dir) as work:
        logger = MetricsLogger(work / "logs", tensorboard=cfg.report_to == "tensorboard")
        try:
            trainer = build_trainer(cfg, work, train_pairs, held_pairs, logger)
            trainable, total = count_parameters(trainer.model)
            tokenizer = trainer.processing_class
            truncated = sum(
                len(ids) >= cfg.max_length
                for column in ("chosen_ids", "rejected_ids")
                for ids in list(trainer.train_dataset[column])
            )
            print(
                f"reward model: {len(train_pairs)} train pairs, {len(held_pairs)} held-out pairs, "
                f"{trainable:,} of {total:,} parameters trainable"
                + (f", {truncated} sequences truncated to {cfg.max_length} tokens" if truncated else ""),
                file=sys.stderr,
            )
            result = trainer.train()
            runtime = result.metrics.get("train_runtime", 0.0)
            pairs_seen = trainer.state.global_step * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
            pairs_seen = (
                min(pairs_seen, round(len(train_pairs) * cfg.num_train_epochs)) if cfg.max_steps < 0 else pairs_seen
            )
            metrics = {
                "train_loss": result.metrics.get("train_loss"),
                "train_pairs": len(train_pairs),
                "eval_pairs": len(held_pairs),
                "eval_prompts": len({p.prompt_key for p in held_pairs}),
                "steps": trainer.state.global_step,
                "margin_used": "margin" in trainer.train_dataset.column_names,
                "sft_adapter": cfg.sft_adapter,
                "trainable_parameters": trainable,
                "total_parameters": total,
                "truncated_sequences": truncated,
                "train_runtime_s": round(runtime, 2),
                "train_pairs_per_s": round(pairs_seen / runtime, 3) if runtime else None,
                "dataset_fingerprint": fingerprint(cfg.dataset_name),
            }
            model = trainer.model
            scorer = RewardScorer.from_model(model, tokenizer, cfg.max_length)
            held_metrics, stats = final_evaluation(cfg, scorer, train_pairs, held_pairs)
            metrics.update(held_metrics)
            logger.log(trainer.state.global_step, {f"final/{k}": v for k, v in held_metrics.items()})
        finally:
            logger.close()

        trainer.save_model(str(work))
        tokenizer.save_pretrained(str(work))
        shutil.rmtree(work / "trainer", ignore_errors=True)
        if cfg.sft_adapter:
            shutil.copytree(cfg.sft_adapter, work / SFT_COPY, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
        write_metadata(
            work,
            base=cfg.model_name_or_path,
            base_path=resolve_model_path(cfg.model_name_or_path),
            sft_adapter=cfg.sft_adapter,
            max_length=cfg.max_length,
            hidden_size=model.config.get_text_config().hidden_size,
        )
        write_json(work / "reward_stats.json", stats)
        metrics["wall_time_s"] = watch.seconds
        save_config(cfg, work / "run_config.yaml")
        write_json(work / "metrics.json", metrics)
    acc = f", held-out accuracy {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else ""
    print(f"reward model done in {metrics['wall_time_s']:.0f}s: {cfg.output_dir}{acc}", file=sys.stderr)
    return metrics


__all__ = ["RewardStageConfig", "run_reward"]
