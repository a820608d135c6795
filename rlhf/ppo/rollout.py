"""Rollouts: sample responses, score them, and turn scores into PPO targets.

One PPO step's data flow (B rollouts, P prompt tokens, R response tokens)::

    prompts --generate(policy, KV cache)--> response_ids (B, R)
            --eos_truncation_mask--> response_mask (B, R), has_eos (B,)
            --policy / value / reference passes (no grad)--> logprobs, values, ref_logprobs (B, R)
            --scorer--> raw scores (B,) --process_scores--> scores (B,)
            [--rloo_scores / grpo_scores within each prompt's K samples (critic-free estimators)]
            --shape_rewards (per-token KL penalty)--> rewards (B, R)
            --compute_gae (+ whitening) | returns_to_go (+ whitening)--> advantages, returns (B, R)

Without a critic (``advantage_estimator`` rloo, grpo, reinforce_pp) there is no value pass and
``values`` is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.errors import UserError
from rlhf.generation import decode_responses, encode_prompts
from rlhf.ppo.losses import (
    compute_gae,
    grpo_scores,
    rloo_scores,
    returns_to_go,
    eos_truncation_mask,
    kl_k1,
    kl_k3,
    masked_mean_var,
    masked_rescale,
    masked_sum,
    masked_whiten,
    penalize_missing_eos,
    penalize_rows,
    shape_rewards,
)
from rlhf.ppo.scorers import ScoreInput

Tensor = torch.Tensor


@dataclass
class Rollout:
    """Everything one PPO step trains on; tensors are (B, ...) on the model's device."""

    prompts: list[Any]
    responses: list[str]
    input_ids: Tensor        # (B, P + R) left-padded prompt + response (pads after EOS)
    attention_mask: Tensor   # (B, P + R)
    response_ids: Tensor     # (B, R)
    response_mask: Tensor    # (B, R) float, 1 up to and including the first EOS
    has_eos: Tensor          # (B,) bool
    logprobs: Tensor         # (B, R) policy log-probs at sampling time (temperature applied)
    ref_logprobs: Tensor     # (B, R)
    values: Tensor | None    # (B, R); None without a critic
    entropy: Tensor          # (B, R)
    raw_scores: Tensor       # (B,) scorer output
    value_trunk: Tensor | None = None  # (B, P + R, H) input of the value adapter's lowest block, if it skips any
    policy_trunk: Tensor | None = None  # (B, P + R, H) input of the lowest trained policy block (lora_top_layers)
    scores: Tensor | None = None      # (B,) after normalisation, clipping, EOS penalty
    rewards: Tensor | None = None     # (B, R) shaped per-token rewards
    kl: Tensor | None = None          # (B, R) per-token KL in the penalty
    advantages: Tensor | None = None  # (B, R)
    returns: Tensor | None = None     # (B, R)

    @property
    def size(self) -> int:
        return self.response_ids.shape[0]

    def select(self, idx: Tensor) -> dict[str, Tensor]:
        """The training tensors of rows ``idx``, without the columns that are padding in all of them
        (leading prompt pads, trailing response pads): less compute, same positions and results."""
        columns = ("input_ids", "attention_mask") + tuple(
            k for k in ("value_trunk", "policy_trunk") if getattr(self, k) is not None)
        d = {k: getattr(self, k)[idx] for k in columns}
        P = d["input_ids"].shape[1] - self.response_ids.shape[1]
        used = d["attention_mask"][:, :P].sum(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        width = max(1, int(self.response_mask[idx].sum(dim=1).max()))
        d = {k: v[:, start : P + width] for k, v in d.items()}
        for k in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "advantages", "returns"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)[idx][:, :width]
        return d


# helper functions


def _pad_to(t: Tensor, width: int, value: int, left: bool) -> Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class PromptStream:
    """Endless prompt batches: a seeded permutation per epoch; the position is resumable state."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.epoch, self.offset = 0, 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order()
            take = order[self.offset : self.offset + self.batch_size - len(out)]
            out += take
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def resolve_normalization(mode: str, stats: dict | None) -> str:
    """The reward normalisation in effect: ``auto`` is ``rm_stats`` when the scorer has saved stats, else ``none``."""
    if mode == "auto":
        return "rm_stats" if stats else "none"
    if mode == "rm_stats" and not stats:
        raise UserError("reward_normalization: rm_stats, but the reward model has no saved score stats")
    return mode


def normalized_head(weight: Tensor, bias: Tensor | None, stats: dict) -> tuple[Tensor, Tensor]:
    """A linear score head whose output is normalised like the rewards: r' = (w.h + b - mean) / std.

    (w (1, H), b (1,)) -> (w / std, (b - mean) / std); a value head initialised from it predicts the
    normalised reward the PPO loop actually trains on.
    """
    std = max(float(stats["std"]), 1e-8)
    b = bias if bias is not None else torch.zeros(1, dtype=weight.dtype)
    return weight / std, (b - float(stats["mean"])) / std


def process_scores(raw: Tensor, has_eos: Tensor, *, normalization: str, stats: dict | None,
                   clip: float | None, missing_eos_penalty: float | None, reduce_sum=None,
                   empty: Tensor | None = None, empty_response_penalty: float | None = None) -> Tensor:
    """Scores entering the reward, in this order (B,) -> (B,):

    rm_stats: s = (raw - stats.mean) / stats.std;  batch: s = (raw - mean_B) / (std_B + 1e-8);  none: s = raw
    (``reduce_sum``: mean_B and std_B over the scores of all processes, see ``masked_mean_var``)
    s = clip(s, -clip, clip)                     (if clip)
    s = s + missing_eos_penalty * (no EOS)       (if missing_eos_penalty)
    s = s + empty_response_penalty * empty       (if empty_response_penalty; ``empty``: (B,) bool, the
                                                  response holds nothing but whitespace)
    """
    s = raw.float()
    if normalization == "rm_stats":
        s = (s - float(stats["mean"])) / max(float(stats["std"]), 1e-8)
    elif normalization == "batch":
        mean, var = masked_mean_var(s, torch.ones_like(s), True, reduce_sum)
        s = (s - mean) / (var.sqrt() + 1e-8)
    if clip is not None:
        s = s.clamp(-clip, clip)
    if missing_eos_penalty is not None:
        s = penalize_missing_eos(s, has_eos.to(s.device), missing_eos_penalty)
    if empty_response_penalty is not None and empty is not None:
        s = penalize_rows(s, empty.to(s.device), empty_response_penalty)
    return s


def empty_responses(responses: list[str]) -> Tensor:
    """(B,) bool: which decoded responses hold nothing but whitespace."""
    return torch.tensor([not text.strip() for text in responses], dtype=torch.bool)


# rollout


@torch.no_grad()
def generate(actor, tokenizer, prompts: list, *, generate_kwargs: dict, max_prompt_length: int, chunk: int):
    """Sample one response per prompt in chunks. Returns (prompt_ids (B, P), prompt_mask, response_ids (B, R))."""
    device = actor.lm_head.weight.device
    parts = []
    for sl in _chunks(len(prompts), chunk):
        enc = encode_prompts(tokenizer, prompts[sl], device)
        ids, mask = enc["input_ids"][:, -max_prompt_length:], enc["attention_mask"][:, -max_prompt_length:]
        resp = actor.generate(ids, mask, generate_kwargs, tokenizer.pad_token_id, tokenizer.eos_token_id)
        parts.append((ids, mask, resp))
    P = max(p[0].shape[1] for p in parts)
    R = max(p[2].shape[1] for p in parts)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.cat([_pad_to(p[0], P, pad, left=True) for p in parts])
    prompt_mask = torch.cat([_pad_to(p[1], P, 0, left=True) for p in parts])
    response_ids = torch.cat([_pad_to(p[2], R, pad, left=False) for p in parts])
    return prompt_ids, prompt_mask, response_ids


def join_responses(tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor):
    """Truncate generated responses after their first EOS and append them to the prompts.

    (B, P) prompt ids / mask + (B, R) generated ids -> input_ids, attention_mask (B, P + R'), response_ids,
    response mask (B, R') and has_eos (B,), with R' <= R the longest kept response (all-pad columns dropped)
    and pads after each EOS.
    """
    mask, has_eos = eos_truncation_mask(response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    width = int(mask.sum(dim=1).max().clamp(min=1))
    mask, response_ids = mask[:, :width], response_ids[:, :width]
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return input_ids, attention_mask, response_ids, mask, has_eos


@torch.no_grad()
def collect_rollout(actor, tokenizer, scorer, prompts: list, *, temperature: float, generate_kwargs: dict,
                    max_prompt_length: int, chunk: int, timings: dict, group: int = 1) -> Rollout:
    """Generate, truncate after EOS, run the no-grad passes and score. Fills ``timings`` (seconds).

    ``group``: rows i*K .. i*K+K-1 are K samples of one prompt; the log-prob and reference passes then run
    each prompt once (:mod:`rlhf.ppo.shared_prompt`), in chunks of whole groups.
    """
    import time

    t0 = time.perf_counter()
    prompt_ids, prompt_mask, response_ids = generate(
        actor, tokenizer, prompts, generate_kwargs=generate_kwargs, max_prompt_length=max_prompt_length, chunk=chunk
    )
    t1 = time.perf_counter()
    input_ids, attention_mask, response_ids, mask, has_eos = join_responses(tokenizer, prompt_ids, prompt_mask,
                                                                            response_ids)
    P = prompt_ids.shape[1]

    logprobs, entropy, ref_logprobs, values, trunks, policy_trunks = [], [], [], [], [], []
    if group > 1:
        chunk = max(group, chunk // group * group)
    for sl in _chunks(len(prompts), chunk):
        ids, am = input_ids[sl], attention_mask[sl]
        lower = actor.policy_trunk(ids, am, group, P) if actor.policy_skip else None
        out = actor.policy_forward(ids, am, response_ids[sl], temperature, with_entropy=True, trunk=lower,
                                   group=group)
        logprobs.append(out["logprobs"])
        entropy.append(out["entropy"])
        trunk = actor.value_trunk(ids, am) if actor.value_skip else None
        if actor.value_model != "none":
            values.append(out["values"] if "values" in out else actor.value_forward(ids, am, P, trunk=trunk))
        ref_logprobs.append(actor.reference_logprobs(ids, am, response_ids[sl], temperature, trunk=trunk,
                                                     policy_trunk=lower, group=group))
        if trunk is not None:
            trunks.append(trunk)
        if lower is not None:
            policy_trunks.append(lower)
    t2 = time.perf_counter()
    responses = decode_responses(tokenizer, response_ids)
    trunk = value_trunk = torch.cat(trunks) if trunks else None
    policy_trunk = torch.cat(policy_trunks) if policy_trunks else None
    trunk_blocks = actor.value_skip if trunks else 0
    if trunk is None and policy_trunk is not None and not actor.has_reference_adapter:
        trunk, trunk_blocks = policy_trunk, actor.policy_skip  # the bare base's lower blocks: an RM may start there
    batch = ScoreInput(prompts, responses, input_ids, attention_mask, response_ids, mask, P,
                       group=group if actor.shares_prompts else 1, trunk=trunk, trunk_blocks=trunk_blocks)
    raw = scorer.score_batch(batch).float().reshape(-1).to(input_ids.device)
    if raw.shape[0] != len(prompts):
        raise ValueError(f"the scorer returned {raw.shape[0]} scores for {len(prompts)} responses")
    t3 = time.perf_counter()
    timings.update(generation_s=t1 - t0, forward_s=t2 - t1, scoring_s=t3 - t2)
    return Rollout(
        prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention_mask,
        response_ids=response_ids, response_mask=mask.float(), has_eos=has_eos,
        logprobs=torch.cat(logprobs), ref_logprobs=torch.cat(ref_logprobs), values=torch.cat(values).float() if values else None,
        entropy=torch.cat(entropy), raw_scores=raw, value_trunk=value_trunk,
        policy_trunk=policy_trunk,
    )


def compute_targets(rollout: Rollout, scores: Tensor, *, kl_coef: float, kl_estimator: str, gamma: float,
                    lam: float, whiten_advantages: bool, estimator: str = "gae", group_size: int = 1,
                    kl_in: str = "reward", grpo_scale_std: bool = True, reduce_sum=None) -> Rollout:
    """Fill rewards, kl, advantages and returns of ``rollout`` (in place) and return it.

    Per-token rewards: the (estimator-adjusted) score at the last token, minus ``kl_coef`` x KL per token
    when ``kl_in == "reward"`` (with ``kl_in == "loss"`` the KL is only measured here).

    * gae:          advantages from the value model (GAE), whitened if ``whiten_advantages``
    * rloo / grpo:  the score is first replaced by :func:`rloo_scores` / :func:`grpo_scores` of its prompt's
                    group (rows i*K .. i*K+K-1); advantage = return-to-go of the shaped rewards
                    (rloo: divided by its std over the batch, not re-centred, if ``whiten_advantages``;
                    grpo: never, it is normalised)
    * reinforce_pp: advantage = return-to-go of the shaped rewards, always whitened over the whole batch

    ``reduce_sum`` (``t -> sum over processes``): whitening and rescaling use the moments of the global
    batch, split over processes; a prompt's K samples are always on one process.
    """
    m = rollout.response_mask
    rollout.scores = scores
    if estimator == "rloo":
        scores = rloo_scores(scores, group_size)
    elif estimator == "grpo":
        scores = grpo_scores(scores, group_size, scale_std=grpo_scale_std)
    penalty = kl_coef if kl_in == "reward" else 0.0
    rollout.rewards, rollout.kl = shape_rewards(scores, rollout.logprobs, rollout.ref_logprobs, m, penalty, kl_estimator)
    if estimator == "gae":
        adv, ret = compute_gae(rollout.rewards, rollout.values, m, gamma, lam)
        rollout.advantages = masked_whiten(adv, m, reduce_sum=reduce_sum) if whiten_advantages else adv
    else:
        ret = returns_to_go(rollout.rewards, m, gamma)
        if estimator == "reinforce_pp":
            rollout.advantages = masked_whiten(ret, m, reduce_sum=reduce_sum)
        elif estimator == "rloo" and whiten_advantages:  # scaled only: the leave-one-out baseline already centres
            rollout.advantages = masked_rescale(ret, m, reduce_sum=reduce_sum)
        else:
            rollout.advantages = ret
    rollout.returns = ret
    return rollout


def rollout_stats(r: Rollout, reduce_sum=None) -> dict[str, float]:
    """Per-step statistics of a rollout with targets (plain floats). ``reduce_sum`` (on N processes): the
    spreads and the token means are those of every process's rollouts together (equal shares of sequences,
    so the sequence means of each process average to the global ones; their spreads and token means do not)."""
    m = r.response_mask
    k1 = masked_sum(kl_k1(r.logprobs, r.ref_logprobs), m, dim=1)   # (B,) sequence KL
    k3 = masked_sum(kl_k3(r.logprobs, r.ref_logprobs), m, dim=1)
    shaped = masked_sum(r.rewards, m, dim=1)
    lengths = m.sum(dim=1)
    every = torch.ones_like(r.scores)

    def moments(x, mask):  # (mean, std) over the masked entries of every process
        mean, var = masked_mean_var(x, mask, True, reduce_sum)
        return float(mean), float(var.sqrt())

    advantage_mean, advantage_std = moments(r.advantages, m)
    return {
        "reward/mean": float(r.scores.mean()),
        "reward/std": moments(r.scores, every)[1],
        "score/raw_mean": float(r.raw_scores.mean()),
        "score/raw_std": moments(r.raw_scores, every)[1],
        "reward/shaped_total_mean": float(shaped.mean()),
        "kl/k1": float(k1.mean()),
        "kl/k3": float(k3.mean()),
        "policy/entropy": moments(r.entropy, m)[0],
        "response/length_mean": float(lengths.mean()),
        "response/missing_eos_frac": float((~r.has_eos).float().mean()),
        "response/empty_frac": float(empty_responses(r.responses).float().mean()) if r.responses else 0.0,
        "advantage/mean": advantage_mean,
        "advantage/std": advantage_std,
        **({"value/mean": moments(r.values, m)[0]} if r.values is not None else {}),
    }
