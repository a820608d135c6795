"""``RewardScorer``: score (prompt, response) pairs with a trained reward model.

Two ways to get one:

* ``RewardScorer.from_pretrained(dir)`` -- standalone: base model (+ merged SFT adapter when the
  RM was trained on one) + the RM's LoRA adapter and score head (or, for ``--method loreft``, its
  LoReFT interventions and score head, :mod:`reward.reft`).
* ``RewardScorer.attach(peft_model, tokenizer, dir)`` -- on the policy's ``PeftModel`` (same base
  weights in memory): the RM's LoRA becomes a frozen extra adapter, the head a frozen
  ``nn.Linear``; scoring switches adapters and restores everything afterwards. LoReFT reward models
  are never attached (see :meth:`RewardScorer.incompatibility`).

Both score through :func:`reward.pooling.pooled_rewards` with the input layout documented in
:mod:`reward.modeling`, so they give the same numbers for the same texts.

Ensembles (``rlhf reward --ensemble K``): the folder holds ``ensemble.json`` and one adapter per
member in ``members/i``; both constructors load every member (K LoRA adapters on the one base,
each with its own frozen head, into which the member's calibration ``(raw - mean) / std`` is
folded). ``score`` / ``score_tokens`` return the mean over members; ``score_members`` /
``score_tokens(..., members=True)`` return every member's (calibrated) scores (K, B).
Blocks below the lowest block any member adapts are run once per batch, not once per member.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reward.modeling import (
    SFT_COPY,
    adapter_digest,
    encode_for_reward,
    head_linear,
    is_reft_reward,
    member_calibrations,
    member_dirs,
    pad_right,
    read_metadata,
    read_stats,
    trunk_and_head,
)
from reward.pooling import lower_hidden, pooled_rewards, response_tail_mask
from rlhf.errors import UserError


class RewardScorer:
    """Scalar rewards from a trained RM; see the module docstring for how to build one."""

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        tokenizer,
        *,
        max_length: int,
        stats: dict | None = None,
        metadata: dict | None = None,
        scope=None,
        owner: nn.Module | None = None,
        members: list[tuple[nn.Module, Any]] | None = None,
    ):
        self.trunk = trunk  # decoder trunk (shared with the policy after attach)
        self.head = head  # (H,) -> 1 score head (member 0's in an ensemble)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.metadata = metadata or {}
        self._stats = dict(stats or {"mean": 0.0, "std": 1.0})
        self._scope = scope  # context manager factory run around every forward
        self._owner = owner  # the module that owns trunk/head (kept alive; switched to eval in scope)
        self._untouched: int | None = None  # see untouched_blocks (the adapters do not change once attached)
        # ensemble: (head, scope factory) per member, each scope activating that member's adapters only
        self._members = list(members) if members else None
        # a reward model trained with trunk_layers: N reads block N-1 (the blocks above are not run)
        self._stop = int(self.metadata.get("trunk_layers") or 0) or None
        self._pool = self.metadata.get("pool", "last")

    # construction

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, precision: str = "auto") -> RewardScorer:
        """Load a reward model folder written by ``rlhf reward`` on its own."""
        from reward.modeling import build_reward_model
        from rlhf.models import load_peft_adapter, load_tokenizer, pick_device, pick_dtype

        meta = read_metadata(path)
        device = torch.device(device) if device is not None else pick_device()
        dtype = pick_dtype(precision, device)
        sft = str(Path(path) / meta["sft_adapter"]) if meta.get("sft_adapter") else None
        base = meta["base_model_path"] if Path(meta["base_model_path"]).exists() else meta["base_model"]
        model = build_reward_model(base, sft, dtype=dtype, device=device, seed=0,
                                   trunk_layers=int(meta.get("trunk_layers") or 0), pooling=meta.get("pool", "last"))
        tokenizer = load_tokenizer(str(path))
        if is_reft_reward(meta):
            from reward.reft import load_reward_interventions

            model = load_reward_interventions(model, path).eval()
            trunk, head = trunk_and_head(model)
            return cls(
                trunk, head, tokenizer, max_length=meta["max_length"], stats=read_stats(path), metadata=meta, owner=model
            )
        dirs = member_dirs(path)
        if len(dirs) == 1:
            model = load_peft_adapter(model, dirs[0], is_trainable=False).eval()
            trunk, head = trunk_and_head(model)
            return cls(
                trunk, head, tokenizer, max_length=meta["max_length"], stats=read_stats(path), metadata=meta, owner=model
            )
        from reward.attach import adapters_active, add_frozen_lora, frozen_head, frozen_lora_model

        like = next(model.parameters())
        names = [f"member_{i}" for i in range(len(dirs))]
        heads = []
        for i, (name, folder, calibration) in enumerate(zip(names, dirs, member_calibrations(path))):
            weights, head_weights = _member_weights(folder)
            if i == 0:
                model = frozen_lora_model(model, folder, name, weights)
            else:
                add_frozen_lora(model, folder, name, weights)
            heads.append(frozen_head(head_weights, like, calibration))
        trunk, _ = trunk_and_head(model)
        members = [(h, _scope_of(adapters_active, model, [n])) for h, n in zip(heads, names)]
        return cls(
            trunk, heads[0], tokenizer, max_length=meta["max_length"], stats=read_stats(path),
            metadata={**meta, "member_adapters": names}, owner=model, members=members,
        )

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, max_length: int, stats: dict | None = None,
                   pool: str = "last") -> RewardScorer:
        """Wrap an in-memory ``*ForSequenceClassification`` model (PEFT or not), e.g. right after training
        (``pool``: its ``pooling``; a model built with ``trunk_layers`` has only those blocks already)."""
        trunk, head = trunk_and_head(model)
        return cls(trunk, head, tokenizer, max_length=max_length, stats=stats, owner=model, metadata={"pool": pool})

    @classmethod
    def incompatibility(
        cls, reward_dir: str | Path, base_model: str, tokenizer, *, merged_sft_adapter: str | None = None
    ) -> str | None:
        """Why the RM in ``reward_dir`` cannot be attached to a policy on ``base_model``; None when it can.

        ``base_model``: the folder/alias the policy's base weights were loaded from;
        ``tokenizer``: the policy's tokenizer (same vocabulary, EOS and chat template required);
        ``merged_sft_adapter``: the SFT adapter already merged into those in-memory base weights, if any.
        """
        from rlhf.models import resolve_model_path

        meta = read_metadata(reward_dir)
        if is_reft_reward(meta):
            from reward.reft import STANDALONE_REASON

            return STANDALONE_REASON
        try:
            same_base = Path(resolve_model_path(base_model)).resolve() == Path(meta["base_model_path"]).resolve()
        except UserError:
            same_base = False
        if not same_base and base_model != meta["base_model"]:
            return f"the reward model was trained on base {meta['base_model']}, the policy uses {base_model}"
        from transformers import AutoTokenizer

        rm_tok = AutoTokenizer.from_pretrained(str(reward_dir))
        if rm_tok.get_vocab() != tokenizer.get_vocab() or rm_tok.eos_token_id != tokenizer.eos_token_id:
            return "the reward model's tokenizer differs from the policy's (vocabulary or EOS)"
        if (rm_tok.chat_template or "") != (tokenizer.chat_template or ""):
            return "the reward model's chat template differs from the policy's"
        rm_sft = meta.get("sft_adapter_sha256")
        if merged_sft_adapter is not None and adapter_digest(merged_sft_adapter) != rm_sft:
            return (
                "the policy's base weights have an SFT adapter merged in that the reward model was not trained on"
            )
        return None

    @classmethod
    def compatible_with(cls, reward_dir: str | Path, base_model: str, tokenizer, *, merged_sft_adapter=None) -> bool:
        """True when :meth:`attach` can put this RM on a policy built from ``base_model`` and ``tokenizer``."""
        return cls.incompatibility(reward_dir, base_model, tokenizer, merged_sft_adapter=merged_sft_adapter) is None

    @classmethod
    def attach(
        cls,
        peft_model,
        tokenizer,
        reward_dir: str | Path,
        adapter_name: str = "reward",
        *,
        merged_sft_adapter: str | None = None,
    ) -> RewardScorer:
        """Load the RM as a frozen adapter (+ frozen head) onto the policy's LoRA ``PeftModel``.

        Supported also when the RM was trained on base + merged SFT adapter: that adapter is loaded
        as a second frozen adapter ``f"{adapter_name}_sft"`` and both are active while scoring
        (unless ``merged_sft_adapter`` says the same SFT adapter is already merged into the policy's
        base weights). Raises UserError when :meth:`incompatibility` finds a reason; the caller then
        uses :meth:`from_pretrained` and re-tokenises texts.
        """
        from peft import PeftModel

        from reward.attach import adapters_active, add_frozen_lora, frozen_head, lora_weights

        if not isinstance(peft_model, PeftModel):
            raise UserError("RewardScorer.attach needs a peft.PeftModel (the policy with its LoRA adapter)")
        meta = read_metadata(reward_dir)
        base_path = peft_model.get_base_model().name_or_path
        reason = cls.incompatibility(reward_dir, base_path, tokenizer, merged_sft_adapter=merged_sft_adapter)
        if reason:
            raise UserError(f"cannot attach the reward model {reward_dir} to the policy: {reason}; use a standalone RM")
        dirs = member_dirs(reward_dir)
        loaded = [_member_weights(d) for d in dirs]
        shared = []
        if meta.get("sft_merged") and merged_sft_adapter is None:
            sft_dir = Path(reward_dir) / SFT_COPY
            add_frozen_lora(peft_model, sft_dir, f"{adapter_name}_sft", lora_weights(sft_dir))
            shared = [f"{adapter_name}_sft"]
        member_names = [adapter_name] + [f"{adapter_name}_member{i}" for i in range(1, len(dirs))]
        for name, folder, (weights, _) in zip(member_names, dirs, loaded):
            add_frozen_lora(peft_model, folder, name, weights)
        trunk = getattr(peft_model.get_base_model(), peft_model.get_base_model().base_model_prefix)
        like = next(p for p in trunk.parameters())
        calibrations = member_calibrations(reward_dir) if len(dirs) > 1 else [None]
        heads = [frozen_head(head_weights, like, c) for (_, head_weights), c in zip(loaded, calibrations)]
        names = shared + member_names
        if len(dirs) == 1:
            return cls(
                trunk,
                heads[0],
                tokenizer,
                max_length=meta["max_length"],
                stats=read_stats(reward_dir),
                metadata={**meta, "attached_adapters": names},
                scope=lambda: adapters_active(peft_model, names),
            )
        members = [(h, _scope_of(adapters_active, peft_model, shared + [n])) for h, n in zip(heads, member_names)]
        return cls(
            trunk,
            heads[0],
            tokenizer,
            max_length=meta["max_length"],
            stats=read_stats(reward_dir),
            metadata={**meta, "attached_adapters": names},
            scope=members[0][1],
            members=members,
        )

    # scoring

    @property
    def stats(self) -> dict:
        """Normalisation statistics saved at training time: ``mean``, ``std`` of training-set rewards (and ``n``)."""
        return dict(self._stats)

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(r - mean) / std`` with the saved statistics."""
        return (rewards - self._stats["mean"]) / max(float(self._stats["std"]), 1e-6)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of the score head's weight (1, H) and bias (1,) or None (e.g. to initialise a value head)."""
        linear = head_linear(self.head)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return linear.weight.detach().clone(), bias

    def encode(self, prompts: list[Any], responses: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids exactly as in training, and each response's length in tokens."""
        return encode_for_reward(self.tokenizer, prompts, responses, self.max_length)

    @property
    def ensemble_size(self) -> int:
        """Number of reward members (1 for a plain reward model)."""
        return len(self._members) if self._members else 1

    def _context(self):
        if self._scope is not None:
            return self._scope()
        return _eval_mode(self._owner or self.trunk)

    def untouched_blocks(self) -> int:
        """Lowest blocks of the trunk that every RM adapter leaves as the bare base (0 for a standalone plain RM)."""
        if self._untouched is None:
            from rlhf.models import untouched_blocks

            names = self.metadata.get("attached_adapters") or self.metadata.get("member_adapters")
            self._untouched = min(untouched_blocks(self.trunk, name) for name in names) if names else 0
        return self._untouched

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     lower: tuple[torch.Tensor, int] | None = None, members: bool = False,
                     group: int = 1, prompt_length: int = 0, response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) float32 for tokenised sequences (B, T), right- or left-padded (mask marks real tokens).

        Sequences should be laid out as in training: chat-templated prompt, response, EOS.
        ``lower = (h, k)`` (attached RMs): ``h`` is the bare base's input of block ``k`` for these
        sequences; when the RM adapters leave blocks below ``k`` untouched only the blocks above are run.
        An ensemble returns the mean over members, or with ``members=True`` every member's rewards (K, B)
        (a plain RM then gives (1, B)).
        ``group = K``, ``prompt_length = P``: rows i*K .. i*K+K-1 share their first P columns (a rollout's K
        samples of one prompt): each prompt then runs once (:func:`reward.pooling.pooled_hidden`).
        ``response_mask`` (B, T): the response's positions (and its EOS); pooling ``last_mean_embeddings_max`` needs
        it (:func:`reward.pooling.response_tail_mask` makes it from response lengths).
        """
        device = self.device
        shareable = self.untouched_blocks() if self._stop is None else min(self.untouched_blocks(), self._stop - 1)
        if lower is not None and not 0 < lower[1] <= shareable:
            lower = None
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if not self._members:
            with self._context():
                rewards = pooled_rewards(self.trunk, self.head, input_ids, attention_mask, lower, self._stop, self._pool,
                                         group, prompt_length, response_mask)
            return rewards.unsqueeze(0) if members else rewards
        if lower is None and shareable > 0:  # the blocks no member adapts: once for all members
            with self._members[0][1]():
                lower = (lower_hidden(self.trunk, input_ids, attention_mask, shareable, group, prompt_length), shareable)
        per_member = []
        for head, scope in self._members:
            with scope():
                per_member.append(
                    pooled_rewards(self.trunk, head, input_ids, attention_mask, lower, self._stop, self._pool,
                                   group, prompt_length, response_mask))
        stacked = torch.stack(per_member)  # (K, B)
        return stacked if members else stacked.mean(dim=0)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 16, members: bool = False,
                  response_lengths: list[int] | None = None) -> list:
        """Rewards for token-id lists, batched by similar length (results in input order).

        ``members=True``: one list per member (K lists of ``len(seqs)`` rewards). ``response_lengths``: each
        sequence's response tokens, as :meth:`encode` returns them (the EOS after them counts too); required by
        pooling ``last_mean_embeddings_max``, which takes a max over the response's positions.
        """
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        k = self.ensemble_size if members else 1
        out = [[0.0] * len(seqs) for _ in range(k)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_right([seqs[i] for i in idx], pad, self.device)
            tail = None
            if response_lengths is not None:  # the response's tokens and the EOS after them
                tail = response_tail_mask(mask, [response_lengths[i] + 1 for i in idx])
            rewards = self.score_tokens(ids, mask, members=members, response_mask=tail)
            for row, values in zip(out, (rewards if members else rewards.unsqueeze(0)).tolist()):
                for i, r in zip(idx, values):
                    row[i] = r
        return out if members else out[0]

    def score(self, prompts: list[Any], responses: list[str], batch_size: int = 16) -> list[float]:
        """One reward per (prompt, response) (the mean over members of an ensemble); prompts are strings or
        message lists."""
        if not responses:
            return []
        seqs, lengths = self.encode(prompts, responses)
        return self.score_ids(seqs, batch_size, response_lengths=lengths)

    def score_members(self, prompts: list[Any], responses: list[str], batch_size: int = 16) -> list[list[float]]:
        """Every member's rewards: K lists (members) of B rewards (K = 1 for a plain reward model)."""
        if not responses:
            return [[] for _ in range(self.ensemble_size)]
        seqs, lengths = self.encode(prompts, responses)
        return self.score_ids(seqs, batch_size, members=True, response_lengths=lengths)


# helper functions


def _member_weights(folder: Path) -> tuple[dict, dict]:
    """(LoRA weights, score-head weights) of one saved member adapter."""
    from reward.attach import lora_weights, split_head

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return split_head(lora_weights(folder), config.get("modules_to_save") or ["score"])


def _scope_of(adapters_active, peft_model, names: list[str]):
    return lambda: adapters_active(peft_model, names)


class _eval_mode:
    """Context: module (and children) in eval mode, training flags restored afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.modes:
            m.training = flag
        return False


__all__ = ["RewardScorer"]
