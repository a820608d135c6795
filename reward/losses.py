"""Pairwise reward-model math (pure functions on tensors and lists).

Bradley-Terry: the probability that ``chosen`` beats ``rejected`` is
``sigmoid(r_c - r_r)``; with a required margin ``m`` (Llama-2 style) the loss is

    loss = mean_i( -log sigmoid(r_c[i] - r_r[i] - m[i]) )

Length disentanglement (ODIN, Chen et al. 2024): two linear heads on the same pooled features,
quality ``r_Q = w_Q . h`` and length ``r_L = w_L . h``; the pair loss is taken on ``r_Q + r_L`` and

    loss += lambda_L * ( |rho(r_Q, L)| - rho(r_L, L) ) + lambda_O * |w_Q . w_L|

with ``rho`` the Pearson correlation over the batch's responses and ``L`` their lengths in
tokens. Only ``r_Q`` is kept for scoring: the length head absorbs what length explains.
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


def unique_rows(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]) -> tuple[list, list]:
    """Each distinct sequence once: (``sequences``, ``pair_index``) with ``pair_index[i] = (c, r)`` the
    positions of pair i's chosen and rejected sequence in ``sequences`` (first-seen order, chosen before
    rejected). ``[[1, 2], [3]]``, ``[[3], [4]]`` -> ``[[1, 2], [3], [4]]``, ``[(0, 1), (1, 2)]``."""
    seen: dict[tuple, int] = {}
    for seq in list(chosen) + list(rejected):
        seen.setdefault(tuple(seq), len(seen))
    index = [(seen[tuple(c)], seen[tuple(r)]) for c, r in zip(chosen, rejected)]
    return [list(s) for s in seen], index


def pearson_t(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Differentiable Pearson correlation of two (N,) tensors -> (); 0 when either is constant.

    ``sum(xc * yc) / sqrt(sum(xc^2) * sum(yc^2) + eps)`` with ``xc = x - mean(x)``, ``yc = y - mean(y)``.
    """
    y = y.to(x.dtype)
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum() + eps)


def length_disentangle_loss(quality: torch.Tensor, length_reward: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ODIN's length term ``|rho(r_Q, L)| - rho(r_L, L)``: quality, length_reward, lengths (N,) -> ()."""
    return pearson_t(quality, lengths).abs() - pearson_t(length_reward, lengths)


def orthogonality_loss(w_quality: torch.Tensor, w_length: torch.Tensor) -> torch.Tensor:
    """``|w_Q . w_L|`` for two head weights of the same shape (1, H) or (H,) -> ()."""
    return (w_quality.reshape(-1) * w_length.reshape(-1).to(w_quality.dtype)).sum().abs()


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
