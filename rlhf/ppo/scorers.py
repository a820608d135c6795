"""Reward scorers: what the PPO loop asks for a score of each rollout.

The loop never imports a reward-model implementation. It calls
``scorer.score_batch(batch) -> Tensor (B,)`` on a :class:`ScoreInput`, which
holds both the texts and the token ids, so a scorer can work on whichever
suits it:

* :class:`TokenScorer` wraps a reward model attached to the policy's own
  ``PeftModel`` (same base weights, same tokenizer): it scores the token ids
  directly with ``rm.score_tokens(input_ids, attention_mask, response_mask=...)``
  (the response's columns, for a pooling that reads them), starting from
  the rollout's bare-base ``trunk`` when the RM's adapters leave those blocks
  untouched. A response cut off at ``max_new_tokens`` gets the EOS the RM's
  training sequences end with (:func:`with_final_eos`): the RM judges the text
  as it judged the labelled candidates, themselves cut off at a token limit.
* :class:`TextScorer` wraps a standalone reward model (another base or
  tokenizer): it re-tokenises the texts with ``rm.score(prompts, responses)``.

  For an ensemble reward model (``rm.ensemble_size > 1``) both ask for every
  member's scores (``score_tokens(..., members=True)`` / ``score_members``)
  and combine them with :func:`rlhf.ppo.aggregate.aggregate_rewards`
  (``reward_aggregate``: mean, min, mean_minus_std); their ``stats`` are then
  those of the aggregated score.
* :class:`TokenCountScorer` and :class:`FunctionScorer` are programmatic
  rewards for tests, smoke runs and rule-based objectives.

``stats`` is ``{"mean", "std"}`` of the reward model's scores on its training
data when known (used by ``reward_normalization: rm_stats``), else None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlhf.ppo.aggregate import AGGREGATES, aggregate_rewards, aggregate_stats

Tensor = torch.Tensor


@dataclass
class ScoreInput:
    """One rollout batch as a scorer sees it.

    input_ids / attention_mask: (B, P + R) left-padded prompt followed by the
    response; response positions after the first EOS hold the pad token and
    have attention 0, so the last attended token of each row is its EOS (or
    its last generated token when it has none).
    """

    prompts: list[Any]          # B prompts (message lists)
    responses: list[str]        # B decoded responses (up to the first EOS)
    input_ids: Tensor           # (B, P + R)
    attention_mask: Tensor      # (B, P + R)
    response_ids: Tensor        # (B, R)
    response_mask: Tensor       # (B, R)
    prompt_length: int          # P
    group: int = 1              # rows i*K .. i*K+K-1 share their prompt columns (K samples of one prompt)
    trunk: Tensor | None = None   # (B, P + R, H) the bare base's input of block ``trunk_blocks``, if computed
    trunk_blocks: int = 0


class Scorer:
    """Base class: subclasses implement :meth:`score_batch`."""

    stats: dict | None = None

    def score_batch(self, batch: ScoreInput) -> Tensor:
        """Scores (B,) float32 on CPU or the batch's device; no gradient."""
        raise NotImplementedError


class _RewardModelScorer(Scorer):
    """Shared by the two reward-model scorers: the ensemble aggregate and its statistics."""

    def __init__(self, rm, aggregate: str = "mean", std_coef: float = 1.0):
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown reward aggregate {aggregate!r} (one of {', '.join(AGGREGATES)})")
        self.rm = rm
        self.aggregate = aggregate
        self.std_coef = float(std_coef)
        self.members = int(getattr(rm, "ensemble_size", 1))
        self.stats = aggregate_stats(getattr(rm, "stats", None), aggregate, self.std_coef)

    def _combine(self, member_scores) -> Tensor:
        """(K, B) member scores -> (B,) rewards."""
        return aggregate_rewards(torch.as_tensor(member_scores).detach().float(), self.aggregate, self.std_coef)


def with_final_eos(input_ids: Tensor, attention_mask: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows whose last attended token is not ``eos_id`` get one appended right after it.

    (B, T) ids and mask (left- or right-padded) -> (B, T) unchanged when every row ends with EOS, else
    (B, T + 1) with a pad column added and EOS written (attended) after each unfinished row's last token.
    A reward model trained on ``prompt + response + EOS`` (``encode_for_reward``) then reads every
    rollout at the position it was trained to score, whether or not the policy finished the response.
    """
    last = (torch.arange(attention_mask.shape[1], device=attention_mask.device) * attention_mask.long()).argmax(-1)
    unfinished = input_ids.gather(1, last[:, None]).squeeze(1) != eos_id
    if not bool(unfinished.any()):
        return input_ids, attention_mask
    rows = unfinished.nonzero().squeeze(1)
    ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], 1), pad_id)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_zeros((attention_mask.shape[0], 1))], dim=1)
    ids[rows, last[rows] + 1] = eos_id
    mask[rows, last[rows] + 1] = 1
    return ids, mask


class TokenScorer(_RewardModelScorer):
    """A reward model sharing the policy's base model and tokenizer (``rm.score_tokens``)."""

    @torch.no_grad()
    def score_batch(self, batch: ScoreInput) -> Tensor:
        tok = self.rm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, mask = with_final_eos(batch.input_ids, batch.attention_mask, tok.eos_token_id, pad)
        # the trunk covers the rollout's own columns only: with an EOS column added, the RM runs every block
        lower = (batch.trunk, batch.trunk_blocks) if batch.trunk is not None and ids is batch.input_ids else None
        columns = torch.arange(mask.shape[1], device=mask.device)
        response = mask * (columns >= batch.prompt_length).to(mask.dtype)  # the response and its EOS
        shared = dict(group=batch.group, prompt_length=batch.prompt_length, response_mask=response)
        if self.members > 1:
            return self._combine(self.rm.score_tokens(ids, mask, lower=lower, members=True, **shared))
        scores = self.rm.score_tokens(ids, mask, lower=lower, **shared)
        return torch.as_tensor(scores).detach().float().reshape(-1)


class TextScorer(_RewardModelScorer):
    """A standalone reward model that tokenises texts itself (``rm.score(prompts, responses)``)."""

    @torch.no_grad()
    def score_batch(self, batch: ScoreInput) -> Tensor:
        if self.members > 1:
            return self._combine(self.rm.score_members(batch.prompts, batch.responses))
        return torch.tensor(list(self.rm.score(batch.prompts, batch.responses)), dtype=torch.float32)


class FunctionScorer(Scorer):
    """``fn(prompts, responses) -> list[float]`` on texts (rule-based rewards)."""

    def __init__(self, fn: Callable[[list, list[str]], Sequence[float]], stats: dict | None = None):
        self.fn = fn
        self.stats = stats

    def score_batch(self, batch: ScoreInput) -> Tensor:
        return torch.tensor([float(s) for s in self.fn(batch.prompts, batch.responses)], dtype=torch.float32)


class TokenCountScorer(Scorer):
    """score[b] = scale * #{t : m[b, t] = 1 and response_ids[b, t] in token_ids}."""

    def __init__(self, token_ids: int | Sequence[int], scale: float = 1.0):
        self.token_ids = torch.tensor([token_ids] if isinstance(token_ids, int) else list(token_ids))
        self.scale = float(scale)

    def score_batch(self, batch: ScoreInput) -> Tensor:
        ids = batch.response_ids
        hit = torch.isin(ids, self.token_ids.to(ids.device)) & batch.response_mask.bool()
        return self.scale * hit.sum(dim=1).float().cpu()
