"""``RewardScorer``: score (prompt, response) pairs with a trained reward model.

Two ways to get one:

* ``RewardScorer.from_pretrained(dir)`` -- standalone: base model (+ merged SFT adapter when the
  RM was trained on one) + the RM's LoRA adapter and score head.
* ``RewardScorer.attach(peft_model, tokenizer, dir)`` -- on the policy's ``PeftModel`` (same base
  weights in memory): the RM's LoRA becomes a frozen extra adapter, the head a frozen
  ``nn.Linear``; scoring switches adapters and restores everything afterwards.

Both score through :func:`reward.modeling.pooled_rewards` with the input layout documented in
:mod:`reward.modeling`, so they give the same numbers for the same texts.
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
    pad_right,
    pooled_rewards,
    read_metadata,
    read_stats,
    trunk_and_head,
)
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
    ):
        self.trunk = trunk  # decoder trunk (shared with the policy after attach)
        self.head = head  # (H,) -> 1 score head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.metadata = metadata or {}
        self._stats = dict(stats or {"mean": 0.0, "std": 1.0})
        self._scope = scope  # context manager factory run around every forward
        self._owner = owner  # the module that owns trunk/head (kept alive; switched to eval in scope)
        self._untouched: int | None = None  # see untouched_blocks (the adapters do not change once attached)

    # construction

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, precision: str = "auto") -> RewardScorer:
        """Load a reward model folder written by ``rlhf reward`` on its own."""
        from peft import PeftModel

        from reward.modeling import build_reward_model
        from rlhf.models import load_tokenizer, pick_device, pick_dtype

        meta = read_metadata(path)
        device = torch.device(device) if device is not None else pick_device()
        dtype = pick_dtype(precision, device)
        sft = str(Path(path) / meta["sft_adapter"]) if meta.get("sft_adapter") else None
        base = meta["base_model_path"] if Path(meta["base_model_path"]).exists() else meta["base_model"]
        model = build_reward_model(base, sft, dtype=dtype, device=device, seed=0)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False).eval()
        trunk, head = trunk_and_head(model)
        tokenizer = load_tokenizer(str(path))
        return cls(
            trunk, head, tokenizer, max_length=meta["max_length"], stats=read_stats(path), metadata=meta, owner=model
        )

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, max_length: int, stats: dict | None = None) -> RewardScorer:
        """Wrap an in-memory ``*ForSequenceClassification`` model (PEFT or not), e.g. right after training."""
        trunk, head = trunk_and_head(model)
        return cls(trunk, head, tokenizer, max_length=max_length, stats=stats, owner=model)

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

        from reward.attach import adapters_active, add_frozen_lora, frozen_head, lora_weights, split_head

        if not isinstance(peft_model, PeftModel):
            raise UserError("RewardScorer.attach needs a peft.PeftModel (the policy with its LoRA adapter)")
        meta = read_metadata(reward_dir)
        base_path = peft_model.get_base_model().name_or_path
        reason = cls.incompatibility(reward_dir, base_path, tokenizer, merged_sft_adapter=merged_sft_adapter)
        if reason:
            raise UserError(f"cannot attach the reward model {reward_dir} to the policy: {reason}; use a standalone RM")
        rm_config = json.loads((Path(reward_dir) / "adapter_config.json").read_text())
        weights, head_weights = split_head(lora_weights(reward_dir), rm_config.get("modules_to_save") or ["score"])
        names = [adapter_name]
        if meta.get("sft_merged") and merged_sft_adapter is None:
            sft_dir = Path(reward_dir) / SFT_COPY
            add_frozen_lora(peft_model, sft_dir, f"{adapter_name}_sft", lora_weights(sft_dir))
            names.insert(0, f"{adapter_name}_sft")
        add_frozen_lora(peft_model, reward_dir, adapter_name, weights)
        trunk = getattr(peft_model.get_base_model(), peft_model.get_base_model().base_model_prefix)
        like = next(p for p in trunk.parameters())
        head = frozen_head(head_weights, like)
        return cls(
            trunk,
            head,
            tokenizer,
            max_length=meta["max_length"],
            stats=read_stats(reward_dir),
            metadata={**meta, "attached_adapters": names},
            scope=lambda: adapters_active(peft_model, names),
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

    def _context(self):
        if self._scope is not None:
            return self._scope()
        return _eval_mode(self._owner or self.trunk)

    def untouched_blocks(self) -> int:
        """Lowest blocks of the shared trunk that the attached RM adapters leave as the bare base (0 standalone)."""
        if self._untouched is None:
            from rlhf.models import untouched_blocks

            names = self.metadata.get("attached_adapters")
            self._untouched = min(untouched_blocks(self.trunk, name) for name in names) if names else 0
        return self._untouched

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     lower: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """Rewards (B,) float32 for tokenised sequences (B, T), right- or left-padded (mask marks real tokens).

        Sequences should be laid out as in training: chat-templated prompt, response, EOS.
        ``lower = (h, k)`` (attached RMs): ``h`` is the bare base's input of block ``k`` for these
        sequences; when the RM adapters leave blocks below ``k`` untouched only the blocks above are run.
        """
        device = self.device
        if lower is not None and not 0 < lower[1] <= self.untouched_blocks():
            lower = None
        with self._context():
            return pooled_rewards(self.trunk, self.head, input_ids.to(device), attention_mask.to(device), lower)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 16) -> list[float]:
        """Rewards for token-id lists, batched by similar length (results in input order)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_right([seqs[i] for i in idx], pad, self.device)
            for i, r in zip(idx, self.score_tokens(ids, mask).tolist()):
                out[i] = r
        return out

    def score(self, prompts: list[Any], responses: list[str], batch_size: int = 16) -> list[float]:
        """One reward per (prompt, response); prompts are strings or message lists."""
        if not responses:
            return []
        seqs, _ = self.encode(prompts, responses)
        return self.score_ids(seqs, batch_size)


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
