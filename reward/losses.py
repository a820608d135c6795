"""Pairwise reward-model math (pure functions on tensors and lists).

Bradley-Terry: the probability that ``chosen`` beats ``rejected`` is
``sigmoid(r_c - r_r)``; with a required margin ``m`` (Llama-2 style) the loss is

    loss = mean_i( -log sigmoid(r_c[i] - r_r[i] - m[i]) )
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """``-log sigmoid(r_c - r_r - m)``; ``chosen``, ``rejected``, ``margin``: (B,) -> () (or (B,) unreduced)."""
    diff = chosen - rejected  # (B,)
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)  # (B,)
    if reduction == "none":
        return losses
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of two equal-length sequences; None when either is constant or n < 2."""
    n = len(xs)
    if n != len(ys):
        raise ValueError("pearson needs sequences of equal length")
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0.0, 0.0 for no values)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def preference_metrics(
    chosen: Sequence[float],
    rejected: Sequence[float],
    margins: Sequence[float | None] | None = None,
    chosen_lengths: Sequence[int] | None = None,
    rejected_lengths: Sequence[int] | None = None,
) -> dict:
    """Summary of an RM on pairs (rewards given per pair).

    * ``accuracy``: share of pairs with ``r_c > r_r`` (a tie counts as half);
    * ``mean_margin``: mean of ``r_c - r_r``;
    * ``loss``: Bradley-Terry loss (with the data's margins where given);
    * ``reward_mean`` / ``reward_std``: over all 2n responses;
    * ``length_correlation``: Pearson(reward, response length in tokens) over all 2n responses;
      a large positive value warns that the RM may reward length rather than quality.
    """
    n = len(chosen)
    if n != len(rejected) or n == 0:
        raise ValueError("preference_metrics needs equal, non-empty chosen/rejected lists")
    diffs = [c - r for c, r in zip(chosen, rejected)]
    wins = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs)
    margin_t = None
    if margins is not None and any(m is not None for m in margins):
        margin_t = torch.tensor([m or 0.0 for m in margins], dtype=torch.float64)
    loss = bradley_terry_loss(
        torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64), margin_t
    )
    rewards = list(chosen) + list(rejected)
    mean, std = mean_std(rewards)
    out = {
        "n": n,
        "accuracy": wins / n,
        "mean_margin": sum(diffs) / n,
        "loss": float(loss),
        "reward_mean": mean,
        "reward_std": std,
        "chosen_reward_mean": sum(chosen) / n,
        "rejected_reward_mean": sum(rejected) / n,
    }
    if chosen_lengths is not None and rejected_lengths is not None:
        out["length_correlation"] = pearson(rewards, [float(x) for x in list(chosen_lengths) + list(rejected_lengths)])
    return out
