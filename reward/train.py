"""The reward-model stage: ``rlhf reward --config configs/reward.yaml``.

A scalar reward model (``*ForSequenceClassification``, one label) trained with TRL's
``RewardTrainer`` on preference pairs (Bradley-Terry loss, minus the data's ``margin`` when it
has one), LoRA on the trunk and the ``score`` head trained in full (``modules_to_save``). The base
is ``model_name_or_path``, or that base with the LoRA ``sft_adapter`` merged into its weights.
``method: loreft`` adapts the trunk with LoReFT interventions instead (:mod:`reward.reft`; it can also
start from a hooked SFT adapter, attached frozen; one member, no ``lora_top_layers``).

Output folder (written through ``staged_output``, so nothing appears if the run fails; launched on N
processes, every process trains and scores its share and rank 0 alone writes it)::

    output_dir/
      adapter_config.json, adapter_model.safetensors   RM LoRA + score head (PEFT, task SEQ_CLS); member 0's
      reft_config.json, reft_interventions.safetensors,
      score_head.safetensors                           method loreft, in place of the PEFT files
      tokenizer files                                  the tokenizer the RM was trained with
      reward_model.json                                base, merged SFT adapter, max_length, input layout
      sft_adapter/                                     copy of the merged SFT adapter (only with sft_adapter)
      reward_stats.json                                mean/std of rewards on training responses (PPO normalisation)
      run_config.yaml, metrics.json, logs/             resolved config, results, metrics.jsonl + TensorBoard
      ensemble.json, members/0 .. members/K-1/         only with ensemble: K > 1 (one adapter per member)
      length_head.safetensors                          only with length_debias: length_head (not used to score)

Ensemble (``ensemble: K``): K LoRA adapters (each with its own score head) on the one base, trained
one after the other by ``RewardTrainer``; member ``i`` uses seed ``seed + i`` (head and LoRA
initialisation, data order) and, with ``ensemble_bootstrap``, a bootstrap resample (n pairs drawn
with replacement) of the training pairs. Separate adapters give members different features, not
only different linear read-outs of one feature set. Each member's score is standardised with its own
mean/std over the training responses of ``reward_stats.json`` (``ensemble.json`` keeps them): pairwise
training fixes neither offset nor scale. The score is the mean over members;
``metrics.json`` reports each member's held-out accuracy, the ensemble's (mean score), and the mean
disagreement (population std over members) on held-out responses. ``reward_stats.json`` keeps the
statistics of the mean score at the top level (what a plain reader uses) and, under
``aggregates``/``moments``, those of every aggregate PPO can optimise (see :mod:`rlhf.ppo.aggregate`).

Length debiasing (``length_debias: length_head``, ODIN): a second linear head on the same pooled
features learns what response length explains (see :mod:`reward.losses`); only the quality head is
saved as the RM's score head, so every reader scores without length.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from rlhf.config import Literal, Optional, TrainingConfig, check_lora_keys, field, require, save_config
from rlhf.hf_trainer import Stopwatch
from rlhf.outputs import check_not_input, shared_staged_output, write_json


@dataclasses.dataclass
class RewardStageConfig(TrainingConfig):
    """Options of ``rlhf reward``."""

    dataset_name: str = field(
        "outputs/prefs.jsonl", "preference pairs: prompt/chosen/rejected[/margin], HH-style or message lists"
    )
    output_dir: str = field("outputs/reward", "folder for the reward model, reward_stats.json, metrics.json")
    learning_rate: float = field(2e-4, "peak learning rate")
    sft_adapter: Optional[str] = field(
        None, "SFT adapter the RM starts from: a LoRA merged into the base; with method loreft also a loreft or "
        "bottleneck_adapter folder, attached frozen under the reward interventions"
    )
    method: Literal["lora", "loreft"] = field(
        "lora", "backbone adaptation: LoRA on the trunk, or LoReFT interventions on block outputs (+ the score head)"
    )
    reft_rank: int = field(4, "loreft: rank r of each intervention")
    reft_layers: list[int] = field([], "loreft: blocks whose outputs are edited (negative = from the top; empty = all)")
    eval_dataset_name: Optional[str] = field(None, "separate held-out preference file (overrides eval_fraction)")
    eval_fraction: float = field(0.1, "fraction of distinct prompts held out (all their pairs) for accuracy")
    eval_steps: int = field(0, "also evaluate every N optimizer steps during training (0 = only at the end)")
    lora_r: int = field(16, "LoRA rank")
    lora_alpha: int = field(32, "LoRA scaling alpha")
    lora_dropout: float = field(0.0, "LoRA dropout (TRL disables dropout while training unless keep_dropout)")
    lora_target_modules: list[str] = field(["all-linear"], "modules LoRA wraps (comma-separated names or all-linear)")
    lora_top_layers: int = field(0, "put LoRA only on the top N transformer blocks (cheaper backward); 0 = all")
    pooling: Literal[
        "last", "last_mean", "last_mean_embeddings", "last_mean_embeddings_max", "response", "auto"
    ] = field(
        "last", "what the score head reads: the last token's hidden state, or that plus the mean over every token "
        "(evidence anywhere in the answer, e.g. a digit or a word from the prompt, reaches the head directly); "
        "last_mean_embeddings: that sum beside the mean of the tokens' input embeddings (which tokens occur), "
        "one head on both; last_mean_embeddings_max: also the embeddings' max over the response's tokens (whether "
        "a kind of token occurs in the answer at all); response: as last_mean_embeddings_max, with the states' mean "
        "over the response's tokens instead of every token (the prompt's states are the same for both answers); "
        "auto: one of those two, chosen by the head probe's cross-validation on the training pairs (head_init: probe)"
    )
    trunk_layers: int = field(
        0, "score from the output of the lowest N blocks, the blocks above are not run (a middle layer carries more "
        "of what a preference reads than the top one, which is shaped for next-token prediction); lora_top_layers "
        "then counts down from block N; 0 = every block"
    )
    head_init: Literal["random", "probe"] = field(
        "random", "start of the score head: random, or a linear probe fitted to the training pairs on the frozen "
        "trunk's pooled states before the first step (L2 strength by cross-validation over prompts; reward.probe)"
    )
    keep_dropout: bool = field(False, "keep dropout active while training (TRL's disable_dropout=false)")
    max_length: int = field(512, "keep at most the last N tokens of prompt + response + EOS")
    use_margin: bool = field(True, "subtract the data's `margin` column inside the loss when present")
    center_rewards_coefficient: Optional[float] = field(
        None, "weight of the mean((r_c + r_r)^2) penalty (centres rewards)"
    )
    max_train_samples: Optional[int] = field(None, "use at most this many training pairs")
    batch_by_prompt: bool = field(
        True, "fill training batches prompt by prompt (shuffled prompt order): the comparisons among one prompt's "
        "candidates share one forward pass per distinct response (InstructGPT); false = pairs in random order"
    )
    stats_max_pairs: int = field(256, "training pairs scored for reward_stats.json (both responses each)")
    ensemble: int = field(
        1, "reward members: K LoRA adapters (+ heads) on one base, member i with seed + i; the score is their mean"
    )
    ensemble_bootstrap: bool = field(
        True, "ensemble > 1: each member trains on its own bootstrap resample of the training pairs (false: all pairs)"
    )
    length_debias: Literal["none", "length_head"] = field(
        "none", "length_head: a second head absorbs response length while training (ODIN) and is dropped for scoring"
    )
    length_head_coef: float = field(1.0, "length_head: weight of |corr(quality, length)| - corr(length head, length)")
    length_orthogonal_coef: float = field(1.0, "length_head: weight of |w_quality . w_length| (orthogonal heads)")

    def __post_init__(self):
        super().__post_init__()
        check_lora_keys(self)
        require(self.lora_top_layers >= 0, "config key 'lora_top_layers' must be >= 0")
        require(self.trunk_layers >= 0, "config key 'trunk_layers' must be >= 0")
        require(not self.trunk_layers or self.lora_top_layers <= self.trunk_layers,
                "config key 'lora_top_layers' must be <= trunk_layers (LoRA goes on the top blocks that are run)")
        require(0 <= self.eval_fraction < 1, "config key 'eval_fraction' must be in [0, 1)")
        require(self.eval_steps >= 0, "config key 'eval_steps' must be >= 0")
        require(self.max_length >= 16, "config key 'max_length' must be >= 16")
        require(
            self.max_train_samples is None or self.max_train_samples >= 1, "config key 'max_train_samples' must be >= 1"
        )
        require(self.stats_max_pairs >= 1, "config key 'stats_max_pairs' must be >= 1")
        require(1 <= self.ensemble <= 16, "config key 'ensemble' must be between 1 and 16")
        require(self.length_head_coef >= 0, "config key 'length_head_coef' must be >= 0")
        require(self.length_orthogonal_coef >= 0, "config key 'length_orthogonal_coef' must be >= 0")
        require(self.reft_rank >= 1, "config key 'reft_rank' must be >= 1")
        require(self.pooling != "auto" or self.head_init == "probe",
                "config key 'pooling': auto is chosen by the head probe; set head_init: probe or name a pooling")
        if self.method == "loreft":
            require(self.ensemble == 1, "config key 'ensemble' needs method lora (a loreft reward model is one member)")
            require(not self.lora_top_layers,
                    "config key 'lora_top_layers' is a LoRA option (configs/reward.yaml sets it): with method loreft "
                    "set it to 0 and choose the blocks with reft_layers")
            require(not self.trunk_layers,
                    "config key 'trunk_layers' is a LoRA option (configs/reward.yaml sets it): with method loreft "
                    "set it to 0")
        if self.sft_adapter:
            require(Path(self.sft_adapter).is_dir(), f"config key 'sft_adapter': folder not found: {self.sft_adapter}")
        require(
            not self.eval_steps or self.eval_fraction > 0 or bool(self.eval_dataset_name),
            "config key 'eval_steps' needs held-out pairs (eval_fraction > 0 or eval_dataset_name)",
        )


def run_reward(cfg: RewardStageConfig) -> dict:
    """Train the RM (or its ``ensemble`` members) and write ``cfg.output_dir``; returns the metrics written to
    ``metrics.json``."""
    from reward.member import train_member
    from reward.summary import combine_members, member_calibrations, training_summary
    from reward.modeling import MEMBERS_DIR, SFT_COPY, write_ensemble, write_metadata
    from reward.reft import check_reft_layers, check_sft_adapter
    from rlhf import distributed
    from rlhf.models import resolve_model_path
    from rlhf.pairs import load_splits
    from rlhf.tracking import MetricsLogger

    watch = Stopwatch()
    check_not_input(cfg.output_dir, {"dataset_name": cfg.dataset_name, "eval_dataset_name": cfg.eval_dataset_name,
                                     "sft_adapter": cfg.sft_adapter, "model_name_or_path": cfg.model_name_or_path})
    if cfg.sft_adapter:
        check_sft_adapter(cfg.sft_adapter, cfg.method)  # before any data or model loads
    if cfg.method == "loreft":
        check_reft_layers(cfg.model_name_or_path, cfg.reft_layers)
    train_pairs, held_pairs = load_splits(cfg)
    k = cfg.ensemble
    main = distributed.is_main()
    with shared_staged_output(cfg.output_dir) as work:
        logger = MetricsLogger(work / "logs", tensorboard=cfg.report_to == "tensorboard") if main else None
        try:
            members = []
            for i in range(k):
                dest = work if k == 1 else work / MEMBERS_DIR / str(i)
                if main:
                    dest.mkdir(parents=True, exist_ok=True)
                # pooling auto: member 0's probe chooses it for every member (one scorer reads them all alike)
                member_cfg = dataclasses.replace(cfg, pooling=members[0].pooling) if members else cfg
                members.append(train_member(member_cfg, i, work, dest, train_pairs, held_pairs, logger))
            metrics = training_summary(cfg, members, train_pairs, held_pairs)
            if main:  # every process holds the same scores; rank 0 reports and writes
                calibrations = member_calibrations(members) if k > 1 else None
                final, stats = combine_members(cfg, members, held_pairs, calibrations)
                metrics.update(final)
                logger.log(metrics["steps"], {f"final/{key}": v for key, v in final.items()})
        finally:
            if logger is not None:
                logger.close()
        if not main:
            return metrics

        tokenizer = members[0].tokenizer
        tokenizer.save_pretrained(str(work))
        if k > 1:
            for f in (work / MEMBERS_DIR / "0").iterdir():  # old readers score with member 0
                if f.is_file():
                    shutil.copy2(f, work / f.name)
            keys = ("seed", "train_pairs", "distinct_train_pairs")
            write_ensemble(work, [{**{key: m.metrics[key] for key in keys}, "calibration": c}
                                  for m, c in zip(members, calibrations)], bootstrap=cfg.ensemble_bootstrap)
        if cfg.sft_adapter:
            shutil.copytree(cfg.sft_adapter, work / SFT_COPY, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
        extra = {"method": cfg.method}
        if cfg.trunk_layers:
            extra["trunk_layers"] = cfg.trunk_layers
        if members[0].pooling != "last":
            extra["pool"] = members[0].pooling
        if k > 1:
            extra["ensemble"] = k
        if cfg.length_debias != "none":
            extra["length_debias"] = cfg.length_debias
        write_metadata(
            work,
            base=cfg.model_name_or_path,
            base_path=resolve_model_path(cfg.model_name_or_path),
            sft_adapter=cfg.sft_adapter,
            max_length=cfg.max_length,
            hidden_size=members[0].hidden_size,
            **extra,
        )
        write_json(work / "reward_stats.json", stats)
        metrics["wall_time_s"] = watch.seconds
        save_config(cfg, work / "run_config.yaml")
        write_json(work / "metrics.json", metrics)
    acc = f", held-out accuracy {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else ""
    print(f"reward model done in {metrics['wall_time_s']:.0f}s: {cfg.output_dir}{acc}", file=sys.stderr)
    return metrics


__all__ = ["RewardStageConfig", "run_reward"]
