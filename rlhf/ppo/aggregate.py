"""Aggregating the scores of a reward-model ensemble into the one reward PPO optimises.

Pure functions. ``s`` is (K, B): the scores of K ensemble members for B responses::

    mean:            r[b] = (1 / K) * sum_k s[k, b]
    min:             r[b] = min_k s[k, b]                                  (worst case, Coste et al. 2024)
    mean_minus_std:  r[b] = mean_k s[k, b] - c * std_k s[k, b]             (uncertainty-weighted)

``std_k`` is the population standard deviation over members,
``sqrt((1 / K) * sum_k (s[k, b] - mean_k s[k, b])^2)`` (0 for a single member), so
``min <= mean`` and ``mean_minus_std <= mean`` for every ``c >= 0``; with K = 1 all three
equal the one member's score.

Normalisation statistics (``reward_stats.json`` of an ensemble) describe the aggregated score
over the training responses: ``aggregates[how] = {"mean", "std"}`` for ``mean`` and ``min``, and
for ``mean_minus_std`` the moments of ``m = mean_k s`` and ``d = std_k s``, from which any
coefficient follows exactly::

    E[m - c d]   = E[m] - c E[d]
    Var[m - c d] = Var[m] + c^2 Var[d] - 2 c Cov[m, d]
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

AGGREGATES = ("mean", "min", "mean_minus_std")


def member_std(member_scores: Tensor) -> Tensor:
    """Population standard deviation over members: (K, B) -> (B,)."""
    return member_scores.std(dim=0, unbiased=False)


def aggregate_rewards(member_scores: Tensor, how: str = "mean", std_coef: float = 1.0) -> Tensor:
    """One reward per response from the scores of every member: (K, B) -> (B,) (see the module docstring)."""
    if member_scores.dim() != 2 or member_scores.shape[0] < 1:
        raise ValueError(f"member_scores must be (K, B) with K >= 1, got shape {tuple(member_scores.shape)}")
    if how == "mean":
        return member_scores.mean(dim=0)
    if how == "min":
        return member_scores.min(dim=0).values
    if how == "mean_minus_std":
        return member_scores.mean(dim=0) - std_coef * member_std(member_scores)
    raise ValueError(f"unknown reward aggregate {how!r} (one of {', '.join(AGGREGATES)})")


def _mean_var(x: Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(((x - x.mean()) ** 2).mean())


def ensemble_moments(member_scores: Tensor) -> dict:
    """Moments of ``m = mean_k s`` and ``d = std_k s`` over the B responses (population, 1/B): (K, B) -> dict."""
    m, d = member_scores.double().mean(dim=0), member_std(member_scores.double())
    mean_m, var_m = _mean_var(m)
    mean_d, var_d = _mean_var(d)
    cov = float(((m - mean_m) * (d - mean_d)).mean())
    return {"mean_of_mean": mean_m, "var_of_mean": var_m, "mean_of_std": mean_d, "var_of_std": var_d,
            "cov_mean_std": cov}


def aggregate_stats(stats: dict | None, how: str = "mean", std_coef: float = 1.0) -> dict | None:
    """``{"mean", "std", ...}`` of the aggregated score, from a reward model's saved statistics.

    Statistics without ``aggregates`` belong to a single reward model: every aggregate is its score,
    so they are returned unchanged. ``None`` stays ``None``.
    """
    if stats is None or "aggregates" not in stats:
        return stats
    base = {k: v for k, v in stats.items() if k in ("n", "source")}
    if how == "mean_minus_std":
        mom = stats["moments"]
        mean = mom["mean_of_mean"] - std_coef * mom["mean_of_std"]
        var = mom["var_of_mean"] + std_coef**2 * mom["var_of_std"] - 2 * std_coef * mom["cov_mean_std"]
        return {**base, "mean": mean, "std": math.sqrt(max(var, 0.0)), "aggregate": how, "std_coef": std_coef}
    if how not in stats["aggregates"]:
        raise ValueError(f"unknown reward aggregate {how!r} (one of {', '.join(AGGREGATES)})")
    return {**base, **stats["aggregates"][how], "aggregate": how}


def aggregate_table(member_scores: Tensor, std_coef: float = 1.0) -> dict:
    """The ``aggregates`` and ``moments`` entries of an ensemble's ``reward_stats.json``: (K, B) -> dict."""
    table = {}
    for how in AGGREGATES:
        mean, var = _mean_var(aggregate_rewards(member_scores, how, std_coef))
        table[how] = {"mean": mean, "std": math.sqrt(var)}
    table["mean_minus_std"]["std_coef"] = std_coef
    return {"aggregates": table, "moments": ensemble_moments(member_scores)}
