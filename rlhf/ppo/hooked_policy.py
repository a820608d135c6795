"""A PPO policy made of hooked module edits (LoReFT interventions) instead of a LoRA adapter.

The SFT stage's interventions (``rlhf sft --method loreft``) are loaded once onto the base model and
trained as the policy; a frozen copy of them is the reference. Both run through the same hooks
(:meth:`rlhf.hooked.HookedAdapter.swapped`), so there is still one base model in memory:

* ``policy``    the attached interventions, trainable (R stays orthonormal: it is parametrized).
* ``reference`` a frozen copy of the SFT interventions, swapped in for reference passes.
* no adapter    (``use(None)``) the bare base.

There is no value model (the critic-free estimators only) and the reward model is loaded on its own.
Blocks below the lowest edited block are the same under policy and reference: their output is computed
once per rollout (``policy_trunk``), as for a LoRA policy trained on its top blocks.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.generation import plain_generation_config
from rlhf.outputs import replace_files
from rlhf.packed_weights import sampling_weights
from rlhf.ppo.policy import POLICY, REFERENCE, ActorCritic, disable_dropout


class HookedActor(ActorCritic):
    """:class:`ActorCritic` whose policy and reference are the edits of one hooked adapter on ``model``."""

    def __init__(self, model: nn.Module, adapter):
        self.adapter = adapter
        self.reference_edits = nn.ModuleDict({k: copy.deepcopy(edit) for k, edit in adapter.items()})
        self.reference_edits.requires_grad_(False)
        super().__init__(model, has_reference_adapter=True, value_model="none")

    def _refresh_trainable(self) -> None:
        self.named_trainable = [(f"{self.adapter.attribute}.{n}", p) for n, p in self.adapter.named_parameters()]
        self._trainable_ids = {id(p) for _, p in self.named_trainable}
        self.restore_grad_flags()

    @contextmanager
    def use(self, role: str | None):
        """Run the body with the policy's edits, the reference's (``REFERENCE``) or none (None)."""
        if role == POLICY:
            yield
            return
        with self.adapter.swapped(self.reference_edits if role == REFERENCE else None):
            yield

    def freeze_policy_below(self, top_layers: int) -> None:
        """The policy trains every edit it has; the blocks below the lowest edited one are shared with
        the reference and run once per rollout (``lora_top_layers`` is a LoRA key and does not apply)."""
        lowest = min(int(key) for key in self.adapter)
        if lowest:
            self.policy_skip = lowest
            if not self._policy_split_matches_full():
                self.policy_skip = 0

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, generate_kwargs: dict, pad_token_id: int, eos_token_id):
        with sampling_weights(self.peft), plain_generation_config(self.peft):
            out = self.peft.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, **generate_kwargs,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id,
            )
        return out[:, prompt_ids.shape[1]:]

    def save_policy(self, out_dir: str | os.PathLike, base_name_or_path: str | None = None) -> None:
        """The policy's interventions as a hooked adapter folder at the top of ``out_dir`` (files replaced
        atomically); ``rlhf generate/eval --adapter`` load it like the SFT stage's."""
        def write(tmp: Path) -> Path:
            saved = self.adapter.base_model_name_or_path
            if base_name_or_path:
                self.adapter.base_model_name_or_path = base_name_or_path
            try:
                self.adapter.save(tmp)
            finally:
                self.adapter.base_model_name_or_path = saved
            return tmp

        replace_files(out_dir, write)


def build_hooked_actor(base_model, *, sft_adapter: str, kind, base_name_or_path: str | None = None,
                       policy_init: str | None = None) -> HookedActor:
    """Load the hooked SFT adapter of ``kind`` (e.g. LoReFT) onto ``base_model`` as the trainable policy
    (its frozen copy is the reference); ``policy_init``: start the policy from another folder of the same
    kind and shape (e.g. the previous round's aligned policy)."""
    from rlhf.hooked import attached_adapter

    disable_dropout(base_model)
    kind.load(base_model, sft_adapter)
    adapter = attached_adapter(base_model)
    actor = HookedActor(base_model, adapter)      # the reference copy is taken here: the SFT edits
    if policy_init:
        from safetensors.torch import load_file

        weights = Path(policy_init) / kind.weights_file
        if not weights.is_file():
            raise UserError(f"policy_init: {policy_init} is not a {kind.method} adapter folder "
                            f"(no {kind.weights_file})")
        try:
            adapter.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"policy_init: {policy_init} does not match the policy's interventions: {first}") from None
    if base_name_or_path:
        adapter.base_model_name_or_path = base_name_or_path
    base_model.eval()
    return actor
