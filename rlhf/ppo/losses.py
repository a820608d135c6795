"""Pure-math core of PPO for RLHF.

Conventions: ``B`` batch, ``T`` response length, ``V`` vocabulary. A ``mask``
is ``(B, T)`` of 0/1 (bool or float) marking response tokens, right-padded.
No function keeps state or mutates its inputs. Masked reductions over an
empty mask return 0 rather than NaN (count is clamped to >= 1).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum(x * m) over ``dim`` (all if None). Entries with m == 0 are ignored
    even if they hold inf/NaN. x, mask: same shape."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum(x * m) / max(sum(m), 1) over ``dim``; an empty mask gives 0."""
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _local_sum(t: Tensor) -> Tensor:
    return t


def masked_mean_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce_sum=None) -> tuple[Tensor, Tensor]:
    """(mean, variance) of x over the masked entries (scalars), see :func:`masked_var`.

    ``reduce_sum`` (a function ``t -> sum of t over all processes``, e.g.
    ``rlhf.distributed.all_reduce_sum``) makes them the moments of the masked entries of every
    process's ``x`` together; None: this ``x`` alone.
    """
    reduce_sum = reduce_sum or _local_sum
    n, total = reduce_sum(torch.stack([masked_sum(torch.ones_like(x), mask), masked_sum(x, mask)]))
    mean = total / n.clamp(min=1)
    var = reduce_sum(masked_sum((x - mean) ** 2, mask)) / n.clamp(min=1)
    if unbiased:
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    return mean, var


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of x over masked entries: mean_m((x - mean_m(x))^2),
    times n / (n - 1) if ``unbiased`` and n = sum(m) > 1 (else factor 1,
    so a single entry has variance 0)."""
    return masked_mean_var(x, mask, unbiased)[1]


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce_sum=None) -> Tensor:
    """(x - mu) / sqrt(var + 1e-8) with mu, unbiased var over the mask; if not
    ``shift_mean`` the mean mu is added back. Positions with m == 0 are 0.
    x, mask: same shape (e.g. (B, T)). ``reduce_sum``: moments over all processes (:func:`masked_mean_var`)."""
    mean, var = masked_mean_var(x, mask, True, reduce_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def masked_rescale(x: Tensor, mask: Tensor, reduce_sum=None) -> Tensor:
    """x / sqrt(var + 1e-8) with the unbiased var over the mask, NOT re-centred: every entry keeps its
    sign (for advantages that are already centred, e.g. RLOO's per-prompt baseline; re-centring them
    over tokens would shift them by a length-weighted mean). Positions with m == 0 are 0. (B, T) -> (B, T).
    ``reduce_sum``: the variance over all processes (:func:`masked_mean_var`)."""
    out = x * torch.rsqrt(masked_mean_var(x, mask, True, reduce_sum)[1] + 1e-8)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def token_mean(x: Tensor, mask: Tensor, token_count=None) -> Tensor:
    """masked_mean(x, mask), or sum(x * m) / ``token_count`` when given: the share of this batch in
    the mean over ``token_count`` tokens (a whole mini-batch split over micro-batches and processes,
    so that every token weighs the same however the rows are split)."""
    if token_count is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask) / max(float(token_count), 1.0)


# ---------------------------------------------------------------- KL estimators
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp (unbiased, can be negative). (B, T) -> (B, T)."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2 (biased, >= 0). (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(d) - 1 - d with d = ref_logp - logp (unbiased, >= 0)."""
    d = ref_logp - logp
    return torch.expm1(d) - d


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def shape_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                  kl_coef, kl_estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward.

    kl[b, t] = est(logp, ref_logp)[b, t] * m[b, t]                    # (B, T)
    rewards[b, t] = -kl_coef * kl[b, t] + score[b] * [t == last[b]]   # (B, T)
    where last[b] is the last index with m[b, t] == 1. score is (B,).
    A row whose mask is all zeros gets no score anywhere (rewards all 0).
    Returns (rewards, kl).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; "
                         f"expected one of {sorted(KL_ESTIMATORS)}")
    m = mask.bool()
    kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)
    kl = torch.where(m, kl, torch.zeros_like(kl))
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)   # (B, T)
    last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values  # (B,)
    at_last = (pos == last.unsqueeze(1)) & m                       # (B, T)
    bonus = at_last.to(kl.dtype) * score.to(kl.dtype).unsqueeze(1)
    return -kl_coef * kl + bonus, kl


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, vectorised over B, looped over T.

    delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
    A_t     = m_t * (delta_t + gamma * lam * m_{t+1} * A_{t+1}),  m_T = 0
    R_t     = m_t * (A_t + V_t)
    So the value after the last response token is 0 (episode end) and masked
    positions get 0 advantage/return. A 0 in the mask ends the episode there.
    rewards, values, mask: (B, T). Returns detached (advantages, returns).
    """
    r = rewards.detach()
    v = values.detach()
    m = _as_mask(mask, v)
    T = r.shape[1]
    adv = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])    # (B,)
    next_val = torch.zeros_like(v[:, 0])    # (B,), already multiplied by m_{t+1}
    next_m = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_val - v[:, t]
        a_t = m[:, t] * (delta + gamma * lam * next_m * next_adv)
        adv[:, t] = a_t
        next_adv, next_val, next_m = a_t, m[:, t] * v[:, t], m[:, t]
    returns = m * (adv + v)
    return adv, returns


# ------------------------------------------------- critic-free estimators
def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / K, K): rows i*K .. i*K + K - 1 are the K samples of prompt i."""
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)


def rloo_scores(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al., 2024): each sample's score minus the mean of the OTHER K - 1 samples of its prompt.

    a_i = s_i - (sum_{j in g(i)} s_j - s_i) / (K - 1),  K >= 2.   (B,) -> (B,)
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _groups(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def grpo_scores(scores: Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al., 2024): scores normalised within each prompt's group of K samples.

    a_i = (s_i - mean_g) / (std_g + eps)  with std_g the unbiased std of the group;
    ``scale_std=False`` is Dr. GRPO (Liu et al., 2025): a_i = s_i - mean_g.   (B,) -> (B,)
    """
    if group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = m_t * (r_t + gamma * G_{t+1}),  G_T = 0. rewards, mask (B, T) -> (B, T), detached.

    The REINFORCE return of every response token: with the score at the last token and a per-token
    KL penalty, G_t = score - kl_coef * sum_{t' >= t} kl_t' (gamma = 1).
    """
    r = rewards.detach()
    m = _as_mask(mask, r)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = m[:, t] * (r[:, t] + gamma * running)
        out[:, t] = running
    return out


def kl_penalty_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_estimator: str = "k3",
                    token_count=None) -> Tensor:
    """KL to the reference as a loss term (``kl_in: loss``): masked_mean(est(logp, ref_logp)), differentiable
    in ``logp``. k2 and k3 give gradients of KL(pi || ref) on the policy's own samples; k1's gradient is
    not, so it is refused. (B, T) -> scalar; ``token_count``: see :func:`token_mean`."""
    if kl_estimator not in ("k2", "k3"):
        raise ValueError(f"kl_estimator {kl_estimator!r} cannot be a loss term; use k2 or k3")
    return token_mean(KL_ESTIMATORS[kl_estimator](logp, ref_logp), mask, token_count)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float, token_count=None) -> tuple[Tensor, dict]:
    """PPO clipped surrogate. r = exp(logp - old_logp), all (B, T).

    loss = masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))   # scalar
           (sum / token_count with ``token_count``, see :func:`token_mean`)
    stats (detached scalars):
      clipfrac  = masked_mean(clipped term > unclipped term)
      approx_kl = masked_mean(r - 1 - log r)   (k3 estimate of KL(old||new), >= 0)
      ratio_max = max of r over the mask (-inf for an empty mask)
    """
    m = mask.bool()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.maximum(unclipped, clipped), m, token_count)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
            "ratio_max": torch.where(m, ratio, torch.full_like(ratio, -float("inf"))).max(),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float, token_count=None) -> tuple[Tensor, dict]:
    """Clipped value loss, all inputs (B, T):

    v_c  = clip(v, old - eps, old + eps)
    loss = 0.5 * masked_mean(max((v - R)^2, (v_c - R)^2))            # scalar (``token_count``: token_mean)
    stats: vf_clipfrac = masked_mean((v_c - R)^2 > (v - R)^2) (detached).
    """
    m = mask.bool()
    v_clipped = old_values + torch.clamp(values - old_values,
                                         -clip_range_value, clip_range_value)
    l_unclipped = (values - returns) ** 2
    l_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(l_unclipped, l_clipped), m, token_count)
    with torch.no_grad():
        clipfrac = masked_mean((l_clipped > l_unclipped).to(values.dtype), m)
    return loss, {"vf_clipfrac": clipfrac}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v * z_v. (B, T, V) -> (B, T).
    z is first shifted by its max over V (H is shift-invariant) so large
    logits do not cancel; terms with probability 0 (z = -inf) contribute 0."""
    zmax = logits.detach().amax(dim=-1, keepdim=True)
    z = logits - torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
    p = torch.softmax(z, dim=-1)
    pz = p * torch.where(p > 0, z, torch.zeros_like(z))   # no 0 * -inf, in the value or its gradient
    return torch.logsumexp(z, dim=-1) - pz.sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(z)[label] = z[label] - logsumexp(z).
    logits (B, T, V), labels (B, T) int -> (B, T), in the logits' dtype."""
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce_sum=None) -> Tensor:
    """1 - var_m(R - V) / var_m(R) (unbiased, over the mask). (B, T) -> scalar.
    Detached. Is +-inf or NaN when var_m(R) == 0. ``reduce_sum``: over all processes (:func:`masked_mean_var`)."""
    with torch.no_grad():
        residual = masked_mean_var(returns - values, mask, True, reduce_sum)[1]
        return 1.0 - residual / masked_mean_var(returns, mask, True, reduce_sum)[1]


# -------------------------------------------------------------- KL controllers
class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient:

    e = clip(current_kl / target - 1, -0.2, 0.2)
    value *= 1 + e * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = float(d.get("horizon", self.horizon))


def make_kl_controller(kind: str, init_kl_coef: float, target=None,
                       horizon: float = 10000):
    """kind "fixed" -> FixedKLController; "adaptive" -> AdaptiveKLController
    (``target`` required)."""
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        if target is None:
            raise ValueError("adaptive KL controller needs a target KL")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")


# ------------------------------------------------------------------- EOS masks
def eos_truncation_mask(response_ids: Tensor, eos_token_id: int,
                        pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Response mask from generated ids (B, T).

    Row with an EOS: mask = 1 for t <= first EOS index, 0 after.
    Row without EOS: mask = 1 up to and including the last non-pad token,
    0 on the trailing pads (pads in the middle of a row stay 1).
    If pad_token_id == eos_token_id the first pad counts as the EOS.
    Returns (mask (B, T) long, has_eos (B,) bool).
    """
    ids = response_ids
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    big = torch.full_like(pos, ids.shape[1])
    is_eos = ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(is_eos, pos, big).min(dim=1).values          # (B,)
    last_real = torch.where(ids != pad_token_id, pos, torch.full_like(pos, -1)
                            ).max(dim=1).values                           # (B,)
    end = torch.where(has_eos, first_eos, last_real)                     # (B,)
    return (pos <= end.unsqueeze(1)).long(), has_eos


def penalize_rows(scores: Tensor, rows: Tensor, penalty: float) -> Tensor:
    """scores + penalty * rows: ``penalty`` (e.g. -1.0) is ADDED to the score of every row where the bool
    ``rows`` is true. (B,) -> (B,), new tensor."""
    return scores + penalty * rows.bool().to(scores.dtype)


def penalize_missing_eos(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """scores + penalty * (not has_eos): the penalty for every row that never emitted EOS."""
    return penalize_rows(scores, ~has_eos.bool(), penalty)
