"""``rlhf reward evaluate``: accuracy and margins of a reward model on a preference file."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rlhf.config import Literal, Optional, field, require
from rlhf.outputs import check_not_input, check_output_file, write_json
from rlhf.pairs import PreferencePair


@dataclasses.dataclass
class RewardEvalConfig:
    """Options of ``rlhf reward evaluate``."""

    reward_model: str = field("", "reward-model folder written by `rlhf reward`")
    dataset_name: str = field("", "preference data (prompt/chosen/rejected, HH-style dialogues or message lists)")
    out: Optional[str] = field(None, "write the metrics as JSON to this file")
    batch_size: int = field(16, "sequences per forward pass")
    max_pairs: Optional[int] = field(None, "evaluate at most this many pairs (the first ones)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", "numeric precision")

    def __post_init__(self):
        require(bool(self.reward_model), "config key 'reward_model' must be set (a folder written by `rlhf reward`)")
        require(bool(self.dataset_name), "config key 'dataset_name' must be set (a preference file)")
        require(self.batch_size >= 1, "config key 'batch_size' must be >= 1")
        require(self.max_pairs is None or self.max_pairs >= 1, "config key 'max_pairs' must be >= 1")


def score_pairs(scorer, pairs: list[PreferencePair], batch_size: int = 16) -> dict:
    """Score both responses of every pair: rewards and response token lengths per side."""
    prompts = [p.prompt_messages for p in pairs]
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    seqs, lengths = scorer.encode(prompts + prompts, texts)
    rewards = scorer.score_ids(seqs, batch_size, response_lengths=lengths)
    n = len(pairs)
    return {
        "chosen": rewards[:n],
        "rejected": rewards[n:],
        "chosen_len": lengths[:n],
        "rejected_len": lengths[n:],
        "margins": [p.margin for p in pairs],
    }


def score_pairs_shared(scorer, pairs: list[PreferencePair], batch_size: int = 16) -> dict:
    """:func:`score_pairs` with the work split over the launched processes; every process gets the whole result.

    Process r of W scores pairs r, r + W, r + 2W, ...; the parts are gathered and put back in order, so each
    pair is scored exactly once (no pair repeated to even out the shares, none dropped). One process: ``score_pairs``.
    """
    from rlhf import distributed

    world, rank = distributed.world_size(), distributed.rank()
    if world == 1 or not pairs:
        return score_pairs(scorer, pairs, batch_size)
    mine = pairs[rank::world]
    part = score_pairs(scorer, mine, batch_size) if mine else None
    parts = distributed.all_gather_object(part)
    out: dict = {}
    for r, got in enumerate(parts):
        if got is None:
            continue
        for key, values in got.items():
            out.setdefault(key, [None] * len(pairs))[r::world] = values
    return out


def evaluate_pairs(scorer, pairs: list[PreferencePair], batch_size: int = 16) -> dict:
    """:func:`reward.losses.preference_metrics` of ``scorer`` on ``pairs``."""
    from reward.losses import preference_metrics

    s = score_pairs(scorer, pairs, batch_size)
    return preference_metrics(s["chosen"], s["rejected"], s["margins"], s["chosen_len"], s["rejected_len"])


def evaluate_members(scorer, pairs: list[PreferencePair], batch_size: int = 16) -> dict:
    """An ensemble's metrics (its mean score) plus ``member_accuracy`` (one per member) and
    ``member_disagreement`` (mean over responses of the members' population std); one scoring pass."""
    import torch

    from reward.losses import preference_metrics
    from rlhf.ppo.aggregate import aggregate_rewards, member_std

    prompts = [p.prompt_messages for p in pairs]
    seqs, lengths = scorer.encode(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    per = torch.tensor(scorer.score_ids(seqs, batch_size, members=True, response_lengths=lengths))  # (K, 2n)
    n, margins = len(pairs), [p.margin for p in pairs]
    mean = aggregate_rewards(per, "mean").tolist()
    metrics = preference_metrics(mean[:n], mean[n:], margins, lengths[:n], lengths[n:])
    metrics["member_accuracy"] = [preference_metrics(row[:n], row[n:])["accuracy"] for row in per.tolist()]
    metrics["member_disagreement"] = float(member_std(per).mean())
    return metrics


def format_summary(metrics: dict) -> str:
    corr = metrics.get("length_correlation")
    corr_text = "n/a" if corr is None else f"{corr:+.3f}"
    return (
        f"pairs {metrics['n']}  accuracy {metrics['accuracy']:.4f}  mean margin {metrics['mean_margin']:+.4f}  "
        f"loss {metrics['loss']:.4f}  reward {metrics['reward_mean']:+.3f} ± {metrics['reward_std']:.3f}  "
        f"length corr {corr_text}"
    )


def run_reward_evaluate(cfg: RewardEvalConfig) -> dict:
    """Score every pair of ``cfg.dataset_name`` with ``cfg.reward_model``; print and optionally write the metrics."""
    from reward.scorer import RewardScorer
    from rlhf.pairs import load_pairs

    if cfg.out:
        check_output_file(cfg.out, "out")  # before any scoring
        check_not_input(cfg.out, {"dataset_name": cfg.dataset_name, "reward_model": cfg.reward_model}, "out")
    pairs = load_pairs(cfg.dataset_name)
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    scorer = RewardScorer.from_pretrained(cfg.reward_model, precision=cfg.precision)
    if scorer.ensemble_size > 1:
        metrics = evaluate_members(scorer, pairs, cfg.batch_size)
    else:
        metrics = evaluate_pairs(scorer, pairs, cfg.batch_size)
    metrics.update(reward_model=str(cfg.reward_model), dataset=cfg.dataset_name)
    print(format_summary(metrics))
    if "member_accuracy" in metrics:
        print(f"members: accuracy {', '.join(f'{a:.4f}' for a in metrics['member_accuracy'])}  "
              f"disagreement (std) {metrics['member_disagreement']:.4f}")
    if cfg.out:
        Path(cfg.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(cfg.out).expanduser(), metrics)
        print(f"metrics written to {cfg.out}", file=sys.stderr)
    return metrics
