"""One reward model of ``rlhf reward``: building its trainer, starting its head as a probe, training it and
scoring what the metrics need.

:func:`train_member` trains member ``i`` (the RM itself when ``ensemble == 1``) and frees its model,
keeping only its held-out scores and the scores of the ``reward_stats.json`` sample;
:mod:`reward.summary` turns those into the metrics and statistics of the saved RM. See :mod:`reward.train`
for the folder layout.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.hf_trainer import parallel_notice, trainer_kwargs

if TYPE_CHECKING:
    from reward.train import RewardStageConfig
    from rlhf.tracking import MetricsLogger

def lora_config_for(cfg: RewardStageConfig, num_layers: int):
    """LoRA for sequence classification; the score head is trained in full and saved with the adapter."""
    from rlhf.models import lora_config

    return lora_config(
        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="SEQ_CLS",
        top_layers=cfg.lora_top_layers, num_layers=num_layers, modules_to_save=["score"],
    )


def build_trainer(cfg: RewardStageConfig, work: Path, train_pairs, held_pairs, logger: MetricsLogger | None):
    """A :class:`~reward.trainer.PairwiseRewardTrainer` on the (SFT-merged) base with a fresh RM LoRA, or with
    fresh LoReFT interventions (``method: loreft``, :mod:`reward.reft`)."""
    from trl import RewardConfig

    from reward.data import pairs_to_dataset
    from reward.modeling import build_reward_model
    from reward.pooling import needs_response_mask
    from reward.trainer import PairwiseRewardTrainer
    from rlhf.budget import stage_callbacks
    from rlhf.models import check_lora_targets, load_tokenizer, pick_device, pick_dtype

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    device = pick_device()
    model = build_reward_model(
        cfg.model_name_or_path, cfg.sft_adapter, dtype=pick_dtype(cfg.precision, device), device=device, seed=cfg.seed,
        trunk_layers=cfg.trunk_layers, pooling=cfg.pooling,
    )
    if cfg.method == "loreft":
        from reward.reft import attach_reward_interventions

        attach_reward_interventions(model, cfg.reft_layers, cfg.reft_rank)
    with_margin = cfg.use_margin and any(p.margin is not None for p in train_pairs)
    length_head = new_length_head(model, cfg.seed) if cfg.length_debias == "length_head" else None
    with_lengths = length_head is not None or needs_response_mask(cfg.pooling)
    train_ds = pairs_to_dataset(tokenizer, train_pairs, cfg.max_length, with_margin, with_lengths)
    periodic = bool(cfg.eval_steps and held_pairs)
    eval_ds = pairs_to_dataset(tokenizer, held_pairs, cfg.max_length, with_margin, with_lengths) if periodic else None
    args = RewardConfig(
        **trainer_kwargs(cfg, str(work / "trainer"), periodic, cfg.eval_steps or None),
        max_length=None,  # sequences are already left-truncated to cfg.max_length
        disable_dropout=not cfg.keep_dropout,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        dataset_num_proc=None,
        dataloader_pin_memory=device.type == "cuda",
        # every trainable parameter gets a gradient each step; the length head is used outside the model's forward,
        # which DDP's search for unused parameters would take for unused (and then see its gradient twice)
        ddp_find_unused_parameters=False,
    )
    num_layers = model.config.get_text_config().num_hidden_layers
    if cfg.method == "lora":
        check_lora_targets(model, cfg.lora_target_modules)
    return PairwiseRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config_for(cfg, num_layers) if cfg.method == "lora" else None,
        callbacks=stage_callbacks(cfg, logger),
        length_head=length_head,
        length_coef=cfg.length_head_coef,
        orthogonal_coef=cfg.length_orthogonal_coef,
        groups=[prompt_key(p) for p in train_pairs] if cfg.batch_by_prompt else None,
        pooling=cfg.pooling,
    )


def probe_head(trainer, cfg: RewardStageConfig, pairs) -> dict:
    """Set the score head to a linear probe of the training pairs on the model as built (:mod:`reward.probe`):
    every distinct training sequence pooled once, no gradient; margins are not used. Every process computes the
    same probe (the full training set, deterministic). Under ``last_mean_embeddings[_max]`` the embedding part is
    fitted only where cross-validation keeps it (:func:`reward.probe.probe_feature_set`); otherwise it stays 0 and
    gets no gradient. Under ``auto`` the pooling is chosen the same way (:func:`reward.probe.choose_pooling`) and
    set on the trainer (``trainer.pooling``). Returns the probe's summary."""
    import time

    import torch
    from tqdm.auto import tqdm

    from reward.modeling import head_linear, pad_right, trunk_and_head
    from reward.pooling import AUTO_CANDIDATES, needs_response_mask, pooled_hidden_each, response_tail_mask
    from reward.pooling import uses_embeddings
    from reward.probe import choose_pooling, probe_feature_set, probe_weights
    from rlhf import distributed

    start = time.perf_counter()
    trunk, head = trunk_and_head(trainer.model)
    tokenizer = trainer.processing_class
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen_ids, rejected_ids = trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"]
    if len(chosen_ids) != len(pairs):
        raise RuntimeError(f"the training set has {len(chosen_ids)} rows for {len(pairs)} pairs")
    modes = AUTO_CANDIDATES if cfg.pooling == "auto" else (cfg.pooling,)
    distinct = {tuple(ids): None for ids in list(chosen_ids) + list(rejected_ids)}
    lengths = {}  # response tokens of each distinct sequence, where the pooling reads the response's positions
    if needs_response_mask(cfg.pooling):
        data = trainer.train_dataset
        for ids, side in ((chosen_ids, "chosen"), (rejected_ids, "rejected")):
            lengths.update(zip(map(tuple, ids), data[f"{side}_len"]))
    seqs = sorted(distinct, key=len)  # similar lengths together: less padding
    device = next(trunk.parameters()).device
    was_training = trunk.training
    trunk.eval()
    bar = tqdm(total=len(seqs), desc="head probe", unit="seq", disable=not distributed.is_main())
    with torch.no_grad():
        for i in range(0, len(seqs), cfg.per_device_eval_batch_size):
            batch = seqs[i : i + cfg.per_device_eval_batch_size]
            ids, mask = pad_right([list(s) for s in batch], pad, device)
            tail = response_tail_mask(mask, [lengths[s] + 1 for s in batch]) if lengths else None
            pooled = pooled_hidden_each(trunk, ids, mask, modes, response_mask=tail)  # one tensor per mode
            for j, s in enumerate(batch):
                distinct[s] = [p[j].float().cpu() for p in pooled]
            bar.update(len(batch))
    bar.close()
    trunk.train(was_training)

    def features(m: int):  # (P, D) of the chosen and the rejected sequences under modes[m]
        return (torch.stack([distinct[tuple(ids)][m] for ids in chosen_ids]),
                torch.stack([distinct[tuple(ids)][m] for ids in rejected_ids]))

    linear = head_linear(head)
    groups = [prompt_key(p) for p in pairs]
    if cfg.pooling == "auto":  # the pooling, then the embeddings beside its state, by cross-validation
        chosen_mode, weights, summary = choose_pooling({m: features(i) for i, m in enumerate(modes)}, groups,
                                                       narrow=linear.hidden_size)
        trainer.pooling = chosen_mode
        linear.embedding_trainable = summary["features"] == "all"
    elif uses_embeddings(cfg.pooling):  # the embeddings beside the state only where cross-validation wants them
        weights, summary = probe_feature_set(*features(0), groups, narrow=linear.hidden_size)
        linear.embedding_trainable = summary["features"] == "all"
    else:
        weights, summary = probe_weights(*features(0), groups)
    with torch.no_grad():
        linear.weight.copy_(weights.to(linear.weight.dtype).view_as(linear.weight))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def prompt_key(pair) -> str:
    """What pairs of the same prompt share (the prompt's messages as JSON)."""
    import json

    return json.dumps(pair.prompt_messages, sort_keys=True, ensure_ascii=False)


def new_length_head(model, seed: int):
    """A fresh ``nn.Linear(H, 1)`` shaped like the model's score head, N(0, initializer_range) from its own
    seeded generator (the global RNG is left alone)."""
    import torch

    from reward.modeling import trunk_and_head

    _, head = trunk_and_head(model)
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
    weight = torch.empty(head.weight.shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed + 7919))
    length_head = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    with torch.no_grad():
        length_head.weight.copy_(weight)
        if length_head.bias is not None:
            length_head.bias.zero_()
    return length_head.to(device=head.weight.device, dtype=head.weight.dtype)


def bootstrap_pairs(pairs: list, seed: int) -> list:
    """n pairs drawn with replacement from the n ``pairs`` (seeded)."""
    return random.Random(seed).choices(pairs, k=len(pairs))


def stats_sample(pairs: list, max_pairs: int, seed: int) -> list:
    """The seeded sample of training pairs whose responses ``reward_stats.json`` describes."""
    sample = list(pairs)
    random.Random(seed).shuffle(sample)
    return sample[:max_pairs]


class _Prefixed:
    """A :class:`MetricsLogger` view that prefixes every metric name (one ensemble member's logs)."""

    def __init__(self, logger: MetricsLogger, prefix: str):
        self.logger, self.prefix = logger, prefix

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, {self.prefix + k: v for k, v in metrics.items()})


@dataclasses.dataclass
class MemberResult:
    """What one trained member leaves behind once its model is freed."""

    metrics: dict           # training figures (train_loss, steps, runtime, ...)
    held: dict | None       # score_pairs of the held-out pairs (quality head)
    stats_rewards: list     # rewards of the stats sample's responses (chosen then rejected)
    length_head_corr: float | None  # Pearson(length head, response length) on held-out responses
    tokenizer: object
    hidden_size: int
    pooling: str            # the pooling it was trained with (pooling auto: the probe's choice)


def train_member(
    cfg: RewardStageConfig, index: int, work: Path, dest: Path, train_pairs, held_pairs, logger
) -> MemberResult:
    """Train member ``index`` (the RM itself when ``cfg.ensemble == 1``), score what the metrics need, save its
    adapter into ``dest`` and free the model.

    Launched on N processes, every process trains on its share of each batch and scores its share of the
    held-out and statistics pairs (each process then holds all the scores); rank 0 alone writes ``dest``.
    """
    from reward.evaluate import score_pairs_shared
    from reward.losses import pearson
    from reward.modeling import save_length_head
    from reward.scorer import RewardScorer
    from rlhf import distributed
    from rlhf.budget import stopped_by_budget
    from rlhf.models import count_parameters

    single = cfg.ensemble == 1
    member_cfg = cfg if single else dataclasses.replace(cfg, seed=cfg.seed + index)
    pairs = train_pairs if single or not cfg.ensemble_bootstrap else bootstrap_pairs(train_pairs, member_cfg.seed)
    member_logger = logger if single or logger is None else _Prefixed(logger, f"member{index}/")
    trainer = build_trainer(member_cfg, work, pairs, held_pairs, member_logger)
    probe = probe_head(trainer, member_cfg, pairs) if cfg.head_init == "probe" else None
    pooling = trainer.pooling  # pooling auto: the one the probe chose
    trainable, total = count_parameters(trainer.model)
    tokenizer = trainer.processing_class
    truncated = sum(
        len(ids) >= cfg.max_length
        for column in ("chosen_ids", "rejected_ids")
        for ids in list(trainer.train_dataset[column])
    )
    main, world = distributed.is_main(), distributed.world_size()
    if main:
        print(
            ("" if single else f"member {index}/{cfg.ensemble} (seed {member_cfg.seed}): ")
            + f"reward model: {len(pairs)} train pairs"
            + ("" if single or not cfg.ensemble_bootstrap else f" ({len({id(p) for p in pairs})} distinct)")
            + f", {len(held_pairs)} held-out pairs, {trainable:,} of {total:,} parameters trainable"
            + (f", {truncated} sequences truncated to {cfg.max_length} tokens" if truncated else "")
            + (f", {world} processes" if world > 1 else ""),
            file=sys.stderr,
        )
        if cfg.pooling == "auto":
            accuracy = ", ".join(f"{m} " + ("n/a" if a is None else f"{a:.3f}")  # n/a: one prompt, nothing to validate
                                 for m, a in probe["cv_accuracy_by_pooling"].items())
            print(f"pooling auto: {pooling} (the head probe's cross-validated accuracy: {accuracy})", file=sys.stderr)
        notice = parallel_notice(trainer) if index == 0 else ""
        if notice:
            print(notice, file=sys.stderr)
    result = trainer.train()
    runtime = result.metrics.get("train_runtime", 0.0)
    pairs_seen = trainer.state.global_step * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    pairs_seen = min(pairs_seen, round(len(pairs) * cfg.num_train_epochs)) if cfg.max_steps < 0 else pairs_seen
    metrics = {
        "seed": member_cfg.seed,
        "train_loss": result.metrics.get("train_loss"),
        "train_pairs": len(pairs),
        "distinct_train_pairs": len({id(p) for p in pairs}),
        "steps": trainer.state.global_step,
        "stopped_by_time_budget": stopped_by_budget(trainer),
        "margin_used": "margin" in trainer.train_dataset.column_names,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "truncated_sequences": truncated,
        "train_runtime_s": round(runtime, 2),
        "pairs_seen": pairs_seen,
    }
    if probe is not None:
        metrics["head_probe"] = probe
    model = trainer.model
    scorer = RewardScorer.from_model(model, tokenizer, cfg.max_length, pool=pooling)
    bs = cfg.per_device_eval_batch_size
    held = score_pairs_shared(scorer, held_pairs, bs) if held_pairs else None
    sample = score_pairs_shared(scorer, stats_sample(train_pairs, cfg.stats_max_pairs, cfg.seed), bs)
    length_corr = None
    if trainer.length_head is not None:
        if held_pairs:
            length_scorer = RewardScorer(scorer.trunk, trainer.length_head, tokenizer, max_length=cfg.max_length,
                                         owner=model, metadata={"pool": pooling})
            length_held = score_pairs_shared(length_scorer, held_pairs, bs)
            length_corr = pearson(
                length_held["chosen"] + length_held["rejected"],
                [float(x) for x in held["chosen_len"] + held["rejected_len"]],
            )
        if main:
            save_length_head(dest, trainer.length_head)
    if cfg.method == "loreft":
        if main:
            from reward.reft import save_reward_interventions

            save_reward_interventions(model, dest)
    else:
        trainer.save_model(str(dest))  # every process: sharded set-ups gather the weights; rank 0 writes
    if main:
        shutil.rmtree(work / "trainer", ignore_errors=True)
    hidden_size = model.config.get_text_config().hidden_size
    del trainer, model, scorer
    gc.collect()
    return MemberResult(metrics, held, sample["chosen"] + sample["rejected"], length_corr, tokenizer, hidden_size,
                        pooling)
