"""How one scalar comes out of the reward model: the trunk's hidden states pooled per row, then the head::

    h = trunk(ids, attention_mask, position_ids = cumsum(mask) - 1).last_hidden_state   # (B, T, H)
    r = head(h[b, last attended position of row b])                    # pooling: last (the default)
    r = head(h[b, last attended position] + mean over attended positions of h[b])   # pooling: last_mean
    r = head([that sum ; mean over attended positions of E[ids[b]] / rms(E)])      # pooling: last_mean_embeddings
    r = head([... ; max over the response's positions of E[ids[b]] / rms(E)])     # pooling: last_mean_embeddings_max
    r = head([h[b, last] + mean over the response's positions of h[b] ; the same two embedding features])
                                                                                   # pooling: response

``last_mean_embeddings`` gives the head (a :class:`FeatureHead`, 2H -> 1) the input embeddings ``E`` of the
tokens beside the block's state: which tokens occur (a digit, a comma, a word) is a token's identity, which the
embeddings carry and the upper blocks dilute. ``E`` is frozen, so that part is a fixed bag of tokens.
``last_mean_embeddings_max`` adds their element-wise max over the response's tokens (3H -> 1): whether a kind
of token occurs *at all* in the answer, which a mean dilutes by length. The max is taken over the response
(``response_mask``, its tokens and the final EOS), not the prompt: the two sides of a pair share the prompt, so
a token the prompt holds would set the feature on both. ``response`` takes the states' mean over the response's
positions too: the prompt's states are the same for both answers of a pair (the decoder is causal), so in a mean
over every position they only dilute the answer's evidence by the prompt's length. ``auto`` is one of those last
two, chosen by the head probe's cross-validation on the training pairs before the first step
(:func:`reward.probe.choose_pooling`); the saved model records the chosen one.

The pooled position comes from the attention mask, not from ``input_ids != pad_token_id``:
tokenizers whose pad token is their EOS (SmolLM2, the test tokenizer) would otherwise pool the
token *before* EOS. ``transformers``' own ``*ForSequenceClassification.forward`` uses the latter
rule, so always score through this module (or ``RewardScorer``). A reward model trained with
``trunk_layers: N`` reads block ``N - 1`` (``stop``). The input layout: :mod:`reward.modeling`.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.ppo.shared_prompt import decode

# pooling mode: (how the block's states are pooled (:func:`pool`), H-wide embedding features beside them:
# 0, 1 = their mean, 2 = their mean and their max over the response)
_MODES = {
    "last": ("last", 0),
    "last_mean": ("last_mean", 0),
    "last_mean_embeddings": ("last_mean", 1),
    "last_mean_embeddings_max": ("last_mean", 2),
    "response": ("last_response_mean", 2),
    "auto": ("auto", 2),  # one of AUTO_CANDIDATES, chosen by the head probe before training (never scored as such)
}
POOL_MODES = tuple(_MODES)
# pooling auto: the head probe's candidates, the incumbent first (reward.probe.choose_pooling). Both read the same
# embedding features, so the head (3H -> 1) and the training rows (with response lengths) are built alike.
AUTO_CANDIDATES = ("last_mean_embeddings_max", "response")
_DESCRIPTIONS = {
    "last": "last attended token (attention_mask), position_ids = cumsum(mask) - 1",
    "last_mean": "last attended token + mean over attended tokens (attention_mask), one head on their sum",
    "last_mean_embeddings": "[last attended token + mean over attended tokens ; mean of the input embeddings over "
                            "attended tokens / rms of the embedding matrix], one head (2H -> 1) on both",
    "last_mean_embeddings_max": "[last attended token + mean over attended tokens ; mean of the input embeddings over "
                                "attended tokens / rms of the embedding matrix ; their max over the response's "
                                "tokens and EOS / the same rms], one head (3H -> 1) on all three",
    "response": "[last attended token + mean over the response's tokens and EOS ; mean of the input embeddings over "
                "attended tokens / rms of the embedding matrix ; their max over the response's tokens and EOS / the "
                "same rms], one head (3H -> 1) on all three",
}


def _state_mode(mode: str) -> str:
    """How the block's hidden states are pooled under ``mode`` (an unknown mode is passed on: :func:`pool` names it)."""
    return _MODES.get(mode, (mode, 0))[0]


def embedding_parts(mode: str) -> int:
    """How many H-wide embedding features the head of pooling ``mode`` reads beside the state: 0, 1 or 2."""
    return _MODES.get(mode, (mode, 0))[1]


def uses_embeddings(mode: str) -> bool:
    """Whether the head of pooling ``mode`` also reads the input embeddings (a :class:`FeatureHead`)."""
    return embedding_parts(mode) > 0


def needs_response_mask(mode: str) -> bool:
    """Whether pooling ``mode`` reads which positions are the response's (``response_mask``): the states' mean
    over the response, or the embeddings' max over it."""
    return _state_mode(mode) == "last_response_mean" or embedding_parts(mode) == 2


class FeatureHead(nn.Module):
    """The score head of ``last_mean_embeddings[_max]``: one linear map (1, (1 + parts) H) over [pooled state ;
    embedding features] (``parts`` = 1: their mean; 2: their mean and their max over the response).

    Called on H-wide input (the ``*ForSequenceClassification`` model's own forward applies its ``score``
    to every position's hidden state) it applies the state part and the bias; on wider features, all of it.
    """

    def __init__(self, hidden_size: int, bias: bool = True, parts: int = 1):
        super().__init__()
        self.hidden_size = hidden_size
        self.in_features, self.out_features = (1 + parts) * hidden_size, 1
        self.weight = nn.Parameter(torch.zeros(1, self.in_features))
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None
        self.embedding_trainable = True  # False: the embedding columns get no gradient (they stay as they are)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.hidden_size:
            return nn.functional.linear(x, self.weight[:, : self.hidden_size], self.bias)
        state, embedding = self.weight[:, : self.hidden_size], self._embedding_weight()
        return nn.functional.linear(x, torch.cat([state, embedding], 1), self.bias)

    def embedding_part(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding columns alone (no bias) applied to (B, parts * H) embedding features: (B, 1)."""
        return nn.functional.linear(features.to(self.weight.dtype), self._embedding_weight())

    def _embedding_weight(self) -> torch.Tensor:
        embedding = self.weight[:, self.hidden_size :]
        return embedding if self.embedding_trainable else embedding.detach()


def feature_head_like(head: nn.Linear, parts: int = 1) -> FeatureHead:
    """A :class:`FeatureHead` whose state part is ``head``'s weight and bias and whose embedding part is 0."""
    wide = FeatureHead(head.in_features, bias=head.bias is not None, parts=parts).to(head.weight.device,
                                                                                     head.weight.dtype)
    with torch.no_grad():
        wide.weight[:, : head.in_features].copy_(head.weight)
        if head.bias is not None:
            wide.bias.copy_(head.bias)
    return wide


def embedding_features(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str,
                       response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The embedding features of pooling ``mode``: the input embeddings' mean over each row's attended tokens
    (B, H), and where ``mode`` reads two parts beside it their max over the row's response positions (B, 2H).

    Both are over the embedding matrix's rms: the scale makes the features about as large as a normalised hidden
    state's, whatever the model's initialisation, so one learning rate suits every part of the head.
    ``response_mask`` (B, T) is required for the max (``RewardScorer.score_ids`` makes it from
    ``response_lengths``)."""
    with_max = embedding_parts(mode) == 2
    if with_max and response_mask is None:
        raise ValueError(f"pooling {mode} needs the response's positions (response_mask; RewardScorer.score_ids: "
                         "response_lengths)")
    embed = trunk.get_input_embeddings()
    with torch.no_grad():
        values = embed(input_ids).float()  # (B, T, H)
        scale = _inverse_rms(embed.weight)
        weights = attention_mask.to(values.device, values.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (values * weights).sum(1) / weights.sum(1).clamp(min=1) * scale
        if not with_max:
            return mean
        keep = response_mask.to(values.device).bool() & attention_mask.to(values.device).bool()
        if not bool(keep.any(-1).all()):
            raise ValueError("response_mask marks no position of some row")
        top = values.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)  # (B, H)
        return torch.cat([mean, top * scale], -1)


def response_tail_mask(attention_mask: torch.Tensor, counts) -> torch.Tensor:
    """1 on the last ``counts[b]`` attended positions of each row (its response and EOS, as
    :func:`reward.modeling.encode_for_reward` lays them out), 0 elsewhere: (B, T), right or left padding."""
    mask = attention_mask.long()
    counts = torch.as_tensor(counts, device=mask.device).long().view(-1, 1)  # (B, 1)
    from_end = mask.flip(-1).cumsum(-1).flip(-1)  # attended positions from here to the row's end
    return mask * (from_end <= counts).long()


def _inverse_rms(weight: torch.Tensor) -> torch.Tensor:
    """``1 / rms(weight)``, kept on the weight and computed again only when it has changed in place (its version
    counter): the embedding matrix is read once, not on every call."""
    cached = getattr(weight, "_inverse_rms", None)
    if cached is None or cached[0] != weight._version:
        cached = (weight._version, weight.numel() ** 0.5 / torch.linalg.vector_norm(weight.detach().float()))
        weight._inverse_rms = cached
    return cached[1]


def pooling_description(mode: str) -> str:
    """What ``reward_model.json`` says under ``pooling`` for a pooling mode."""
    return _DESCRIPTIONS[mode]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (right or left padding): (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, so left padding does not shift them: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pool(values: torch.Tensor, attention_mask: torch.Tensor, mode: str = "last",
         response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row pooling of per-position ``values`` (B, T, D) -> (B, D): the value at the last attended position
    (``last``), or that plus the mean over attended positions (``last_mean``: the mean lets a linear head
    weigh evidence anywhere in the sequence, the last position keeps what only the end shows), or plus the mean
    over the response's positions (``last_response_mean``, ``response_mask`` (B, T))."""
    mask = attention_mask.to(values.device)
    rows = torch.arange(values.shape[0], device=values.device)
    last = values[rows, last_token_index(mask)]
    if mode == "last":
        return last
    if mode == "last_response_mean":
        if response_mask is None:
            raise ValueError("pooling response needs the response's positions (response_mask; "
                             "RewardScorer.score_ids: response_lengths)")
        mask = mask * response_mask.to(mask.device, mask.dtype)
    elif mode != "last_mean":
        raise ValueError(f"unknown pooling {mode!r} of hidden states; expected 'last', 'last_mean' or "
                         "'last_response_mean' (pooling auto is one of them once the head probe has chosen)")
    weights = mask.to(values.dtype).unsqueeze(-1)  # (B, T, 1)
    return last + (values * weights).sum(1) / weights.sum(1).clamp(min=1)


def pooled_hidden(
    trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    lower: tuple[torch.Tensor, int] | None = None, stop: int | None = None, mode: str = "last",
    group: int = 1, prompt_length: int = 0, response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The trunk's last hidden state pooled over each row (:func:`pool`, ``mode``): (B, T) -> (B, H); under
    ``last_mean_embeddings[_max]`` the embedding features (:func:`embedding_features`) follow: (B, 2H or 3H),
    the head's features (``response_mask`` (B, T): the response's positions, which the max reads).

    ``lower = (h, k)``: ``h`` (B, T, H) is already the input of block ``k`` (the caller guarantees the
    active adapters leave blocks below ``k`` untouched); only blocks ``k`` and up are run.
    ``stop = n``: the blocks from ``n`` up are not run; the final norm is applied to block ``n - 1``'s output
    (a reward model trained with ``trunk_layers: n`` on a trunk that has more blocks).
    ``group = K``, ``prompt_length = P``: rows i*K .. i*K+K-1 share their first P columns (a PPO rollout's K
    samples of one prompt), which then run once per group (:mod:`rlhf.ppo.shared_prompt`; same values).
    """
    return pooled_hidden_each(trunk, input_ids, attention_mask, (mode,), lower, stop, group, prompt_length,
                              response_mask)[0]


def pooled_hidden_each(
    trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...],
    lower: tuple[torch.Tensor, int] | None = None, stop: int | None = None,
    group: int = 1, prompt_length: int = 0, response_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`pooled_hidden` under each of ``modes`` from one run of the trunk (the head probe of ``pooling:
    auto`` compares poolings): one (B, H), (B, 2H) or (B, 3H) tensor per mode."""
    from contextlib import nullcontext

    from rlhf.models import block_range

    start, stop = (lower[1] if lower is not None else 0), (stop or len(trunk.layers))
    inputs = {"inputs_embeds": lower[0]} if lower is not None else {"input_ids": input_ids}
    whole = start == 0 and stop == len(trunk.layers)
    with nullcontext() if whole else block_range(trunk, start, stop, final_norm=True):
        hidden = decode(trunk, attention_mask, group, prompt_length, **inputs)  # (B, T, H)
    embedded = {}  # embedding features by number of parts: the same for every mode that reads as many
    out = []
    for mode in modes:
        pooled = pool(hidden, attention_mask, _state_mode(mode), response_mask)  # (B, H)
        parts = embedding_parts(mode)
        if parts:
            if parts not in embedded:
                embedded[parts] = embedding_features(trunk, input_ids, attention_mask, mode, response_mask)
            pooled = torch.cat([pooled, embedded[parts].to(pooled.dtype)], -1)  # (B, 2H or 3H)
        out.append(pooled)
    return out


def lower_hidden(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, blocks: int,
                 group: int = 1, prompt_length: int = 0) -> torch.Tensor:
    """The input of block ``blocks`` (the output of the blocks below it): (B, T) -> (B, T, H).
    ``group``, ``prompt_length``: see :func:`pooled_hidden`."""
    from rlhf.models import block_range

    with block_range(trunk, 0, blocks):
        return decode(trunk, attention_mask, group, prompt_length, input_ids=input_ids)


def apply_head(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """``head(pooled)`` in the head's dtype, one float32 scalar per row: (B, H), (B, 2H) or (B, 3H) -> (B,)."""
    return head(pooled.to(_param_dtype(head, pooled.dtype))).squeeze(-1).float()


def pooled_rewards(
    trunk: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    lower: tuple[torch.Tensor, int] | None = None, stop: int | None = None, mode: str = "last",
    group: int = 1, prompt_length: int = 0, response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One scalar per row: ``head(pooled trunk output)``; (B, T) -> (B,) float32.

    ``lower``, ``stop``, ``mode``, ``group``, ``prompt_length``, ``response_mask``: see :func:`pooled_hidden`.
    """
    return apply_head(head, pooled_hidden(trunk, input_ids, attention_mask, lower, stop, mode, group, prompt_length,
                                          response_mask))


def pooled_through(
    model: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str = "last",
    trunk: nn.Module | None = None, response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features (B, H), (B, 2H) or (B, 3H), rewards (B,) float32) from one call of ``model`` itself: ...

    ``model`` is the sequence-classification model as a trainer holds it (inside a DDP, FSDP or DeepSpeed
    wrapper too), so the wrapper sees the forward pass and synchronises the gradients. ``head`` is its
    ``score`` module; its input ``h`` (B, T, H) and output (B, T, 1) are pooled over each row by :func:`pool`
    (``mode``), so the values are those of :func:`pooled_hidden` / :func:`pooled_rewards` (the wrapper's own
    pooled ``logits``, at the last non-pad token, are not used). Under a pooling that reads embeddings the head's
    embedding part is added (``trunk``: the decoder trunk, whose input embeddings it reads; ``response_mask``: see
    :func:`pooled_hidden`).
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        seen["hidden"], seen["scores"] = args[0], output  # (B, T, H), (B, T, 1)

    handle = head.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), use_cache=False)  # fmt: skip
    finally:
        handle.remove()
    state_mode = _state_mode(mode)
    pooled = pool(seen["hidden"], attention_mask, state_mode, response_mask)
    rewards = pool(seen["scores"], attention_mask, state_mode, response_mask).squeeze(-1).float()  # head(pool(h))
    from reward.modeling import head_linear

    linear = head_linear(head)
    if state_mode != "last" and linear.bias is not None:  # the head is linear: up to its bias, once per pooled term
        rewards = rewards - linear.bias.float()
    if uses_embeddings(mode):
        if trunk is None or not isinstance(linear, FeatureHead):
            raise ValueError(f"pooling {mode} needs the trunk and a FeatureHead")
        embedded = embedding_features(trunk, input_ids, attention_mask, mode, response_mask).to(pooled.dtype)
        rewards = rewards + linear.embedding_part(embedded).squeeze(-1).float()
        pooled = torch.cat([pooled, embedded], -1)  # (B, 2H or 3H)
    return pooled, rewards


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default
