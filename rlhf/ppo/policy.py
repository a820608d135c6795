"""Policy, reference and value on ONE base model: named adapters on a ``PeftModel``.

Adapters on the shared ``PeftModel`` (the base weights exist once):

* ``policy``    trainable LoRA. With an SFT adapter it starts as an exact copy
                of the SFT LoRA (same config), so the exported policy adapter
                alone applies to the original base model.
* ``reference`` the SFT LoRA, frozen. Without an SFT adapter the reference is
                the base model with all adapters disabled.
* ``value``     trainable LoRA (``value_model: separate``) read out by a scalar
                head: V(s_t) = w . h_L(s_t) + b, h_L the final hidden state.
                With ``value_model: shared`` there is no value adapter and the
                head reads the policy's hidden state (one pass, coupled losses).
                With ``value_model: none`` (the critic-free estimators RLOO, GRPO,
                REINFORCE++) there is no value adapter, head or pass.
                When the value LoRA leaves the lowest k blocks untouched (e.g. a
                copy of a reward adapter trained with ``lora_top_layers``), the
                input of block k is the bare base's: it is computed once per
                rollout (``value_trunk``) and training runs only blocks k..L-1.
                The reference reuses it too when it is the bare base (or its
                LoRA also leaves those blocks untouched).
* frozen lower policy blocks (``lora_top_layers`` of ``rlhf ppo``): when only
                the top blocks of the policy are trained, its lower blocks stay
                equal to the reference's (the SFT LoRA copy frozen there, or no
                LoRA there without an SFT adapter). Their output is computed once
                per rollout under the reference (``policy_trunk``) and shared by
                the log-prob, reference and training passes, which then run only
                the top blocks: backward never reaches the lower ones.
* ``reward``    (optional) attached by a reward scorer that shares the base.

Index convention for a sequence [prompt (P, left-padded) | response (R)]:
the log-prob and value of response token t come from position P - 1 + t.

``group=K`` on the policy, trunk and reference passes: rows i*K .. i*K+K-1 share their prompt, which
then runs once per group (:mod:`rlhf.ppo.shared_prompt`; same results up to rounding). It applies
where ``shares_prompts`` (checked on a probe at start-up) and the rows do share their prompt columns;
otherwise the rows run whole.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.generation import plain_generation_config
from rlhf.models import block_range, save_adapter, untouched_blocks
from rlhf.outputs import replace_files
from rlhf.packed_weights import sampling_weights
from rlhf.ppo.losses import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.shared_prompt import decode, shared_pass_matches_whole

POLICY, REFERENCE, VALUE = "policy", "reference", "value"
VOCAB_ROWS = 2  # sequences per vocabulary projection in no-grad passes
Tensor = torch.Tensor


# helper functions


def disable_dropout(model: nn.Module) -> None:
    """PPO ratios must compare the same function: no dropout anywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


class ActorCritic:
    """The shared ``PeftModel`` + value head, with forward helpers per role."""

    def __init__(self, peft_model, has_reference_adapter: bool, value_model: str = "separate"):
        self.peft = peft_model  # a PeftModel; a plain model for a hooked policy (rlhf.ppo.hooked_policy)
        self.base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        self.decoder = self.base.get_decoder()
        self.lm_head = self.base.get_output_embeddings()
        self.has_reference_adapter = has_reference_adapter
        self.value_model = value_model
        self.value_skip = 0  # lowest blocks the value adapter leaves untouched (see value_trunk)
        self.reference_uses_trunk = False  # the reference leaves the value_skip lowest blocks untouched too
        self.merge_for_generation = False  # sample with the policy LoRA folded into the weights (see generate)
        self.policy_skip = 0  # lowest blocks where policy == reference (frozen): see policy_trunk
        self.shares_prompts = False  # group=K passes run each prompt once (set below, after a probe)
        self.value_head = None  # value_model "none": a critic-free estimator, no value model at all
        if value_model != "none":
            hidden = self.base.config.get_text_config().hidden_size
            device = self.lm_head.weight.device
            self.value_head = nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self._refresh_trainable()
        self.shares_prompts = self._shared_prompt_matches_full()

    # adapters

    def _refresh_trainable(self) -> None:
        roles = [POLICY] + ([VALUE] if self.value_model == "separate" else [])
        head = [] if self.value_head is None else list(self.value_head.named_parameters())
        frozen = {id(p) for block in self.decoder.layers[: self.policy_skip] for n, p in block.named_parameters()
                  if f".{POLICY}." in n} if self.policy_skip else set()
        self.named_trainable = [
            (n, p) for n, p in self.peft.named_parameters()
            if any(f".{role}." in n for role in roles) and id(p) not in frozen
        ] + [(f"value_head.{n}", p) for n, p in head]
        self._trainable_ids = {id(p) for _, p in self.named_trainable}
        self.restore_grad_flags()

    def freeze_policy_below(self, top_layers: int) -> None:
        """Train the policy only on its top ``top_layers`` blocks (0 = all).

        Below them the policy's weights stay what they are now, which must equal the reference's there
        (a copy of the SFT LoRA, or no LoRA at all): then the policy's and the reference's hidden states
        agree up to block ``L - top_layers`` and :meth:`policy_trunk` computes them once for both.
        """
        n = len(self.decoder.layers) if isinstance(getattr(self.decoder, "layers", None), nn.ModuleList) else 0
        if not top_layers or top_layers >= n:
            return
        self.policy_skip = n - top_layers
        self._refresh_trainable()
        if not self._lower_policy_matches_reference() or not self._policy_split_matches_full():
            raise UserError(
                f"lora_top_layers: the policy's lowest {self.policy_skip} blocks differ from the reference's "
                "(or this model's blocks cannot be run apart): use lora_top_layers: 0"
            )

    @torch.no_grad()
    def _lower_policy_matches_reference(self) -> bool:
        """Below ``policy_skip``: every policy weight equals its reference twin, or, without a reference
        adapter, the policy adapter has no weight there."""
        if not self.has_reference_adapter:
            return untouched_blocks(self.decoder, POLICY) >= self.policy_skip
        for block in self.decoder.layers[: self.policy_skip]:
            params = dict(block.named_parameters())
            for name, p in params.items():
                if f".{POLICY}." in name:
                    twin = params.get(name.replace(f".{POLICY}.", f".{REFERENCE}."))
                    if twin is None or not torch.equal(twin, p):
                        return False
        return True

    @torch.no_grad()
    def _policy_split_matches_full(self) -> bool:
        """The policy pass split at ``policy_skip`` (trunk under the reference, then the upper blocks
        under the policy) equals the full policy pass on a probe (see :meth:`_split_matches_full`)."""
        ids, mask = self._probe()
        with self.use(POLICY):
            full = self.hidden_states(ids, mask)
        split = self._upper_hidden_as(POLICY, self.policy_trunk(ids, mask), mask, self.policy_skip)
        return bool(torch.allclose(full[mask.bool()], split[mask.bool()], rtol=1e-4, atol=1e-5))

    def _shared_prompt_matches_full(self) -> bool:
        """The policy pass with each group's prompt run once equals the whole-row pass on a probe."""
        with self.use(POLICY):
            return shared_pass_matches_whole(self.decoder, self.base.config.get_text_config().vocab_size,
                                             self.lm_head.weight.device)

    def _probe(self) -> tuple[Tensor, Tensor]:
        device = self.lm_head.weight.device
        ids = torch.arange(3, 11, device=device).reshape(2, 4) % self.base.config.get_text_config().vocab_size
        mask = torch.ones_like(ids)
        mask[1, 0] = 0
        return ids, mask

    def _upper_hidden_as(self, role: str | None, trunk: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        with self.use(role):
            return self._upper_hidden(trunk, attention_mask, start)

    @torch.no_grad()
    def policy_trunk(self, input_ids: Tensor, attention_mask: Tensor, group: int = 1,
                     prompt_length: int = 0) -> Tensor:
        """Input of block ``policy_skip`` (B, L, H) under the reference: equal to the policy's there.
        ``group``: K rows per prompt, the first ``prompt_length`` columns being the prompt (see the module doc)."""
        with self.use(REFERENCE if self.has_reference_adapter else None), block_range(self.decoder, 0, self.policy_skip):
            return self.hidden_states(input_ids, attention_mask, group, prompt_length)

    def restore_grad_flags(self) -> None:
        """Only the policy/value adapters and the value head require grad (PEFT's set_adapter flips flags)."""
        for p in self.peft.parameters():
            p.requires_grad_(id(p) in self._trainable_ids)
        if self.value_head is not None:
            self.value_head.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable]

    @contextmanager
    def use(self, role: str | None):
        """Run the body with adapter ``role`` active; None = all adapters disabled (the bare base)."""
        if role is None:
            with self.peft.disable_adapter():
                yield
            self.restore_grad_flags()
            return
        if self.peft.active_adapter != role:
            self.peft.set_adapter(role, inference_mode=True)
            self.restore_grad_flags()
        yield

    def add_value_adapter(self, config=None, init_from: str | None = None) -> None:
        """Add the ``value`` LoRA (a copy of adapter ``init_from``'s weights and config when given)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        if init_from is not None:
            config = copy.deepcopy(self.peft.peft_config[init_from])
            config.inference_mode = False
        self.peft.add_adapter(VALUE, config)
        if init_from is not None:
            state = get_peft_model_state_dict(self.peft, adapter_name=init_from)
            set_peft_model_state_dict(self.peft, state, adapter_name=VALUE)
        self._refresh_trainable()
        self.value_skip = untouched_blocks(self.decoder, VALUE)
        if self.value_skip and not self._split_matches_full():
            self.value_skip = 0
        untouched = untouched_blocks(self.decoder, REFERENCE) if self.has_reference_adapter else self.value_skip
        self.reference_uses_trunk = bool(self.value_skip) and untouched >= self.value_skip

    @torch.no_grad()
    def _split_matches_full(self) -> bool:
        """Does the value pass split at ``value_skip`` (trunk, then the upper blocks) equal the full pass?

        A probe on a few tokens: decoders whose blocks depend on more than their input hidden states,
        position ids and mask (e.g. per-layer attention types indexed by position in the list) fail it
        and keep the full pass.
        """
        ids, mask = self._probe()
        with self.use(VALUE):
            full = self.hidden_states(ids, mask)
            split = self._upper_hidden(self.value_trunk(ids, mask), mask, self.value_skip)
        return bool(torch.allclose(full[mask.bool()], split[mask.bool()], rtol=1e-4, atol=1e-5))

    def init_value_head(self, weight: Tensor, bias: Tensor | None = None) -> None:
        with torch.no_grad():
            self.value_head.weight.copy_(weight.reshape(1, -1).float())
            self.value_head.bias.copy_(bias.reshape(1).float() if bias is not None else torch.zeros(1))

    # forward helpers

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, group: int = 1, prompt_length: int = 0) -> Tensor:
        """Final hidden states (B, L, H) under the active adapter (``group``: see the module doc)."""
        return decode(self.decoder, attention_mask, group if self.shares_prompts else 1, prompt_length,
                      input_ids=input_ids)

    @torch.no_grad()
    def value_trunk(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Input of block ``value_skip`` (B, L, H): the bare base's lower blocks, shared by every value pass."""
        with self.use(None), block_range(self.decoder, 0, self.value_skip):
            return self.hidden_states(input_ids, attention_mask)

    def _upper_hidden(self, trunk: Tensor, attention_mask: Tensor, start: int, group: int = 1,
                      prompt_length: int = 0) -> Tensor:
        """Final hidden states (B, L, H) from the input ``trunk`` of block ``start`` (active adapter)."""
        with block_range(self.decoder, start, len(self.decoder.layers)):
            return decode(self.decoder, attention_mask, group if self.shares_prompts else 1, prompt_length,
                          inputs_embeds=trunk)

    def _response_hidden(self, input_ids, attention_mask, prompt_length: int, group: int = 1) -> Tensor:
        h = self.hidden_states(input_ids, attention_mask, group, prompt_length)  # (B, P + R, H)
        return h[:, prompt_length - 1 : -1]                                      # (B, R, H)

    def _logprobs(self, h: Tensor, response_ids: Tensor, temperature: float, with_entropy: bool):
        """Log-probs (B, R) of ``response_ids`` under softmax(lm_head(h) / temperature), and the entropy.

        Without grad the (rows, R, V) logits are built for ``VOCAB_ROWS`` rows at a time: the
        vocabulary-sized temporaries dominate the no-grad passes' memory otherwise.
        """
        rows = h.shape[0] if torch.is_grad_enabled() else VOCAB_ROWS
        logps, entropies = [], []
        for s in range(0, h.shape[0], rows):
            # h is the response's slice of the sequence's states: made contiguous, the vocabulary-sized product
            # runs 1.8x faster in fp32 and 6x in bf16 on CPU (bench/RESULTS.md)
            logits = self.lm_head(h[s : s + rows].contiguous()).float() / temperature   # (rows, R, V)
            logps.append(logprobs_from_logits(logits, response_ids[s : s + rows]))
            if with_entropy:  # differentiable under grad: the entropy bonus needs its gradient
                entropies.append(entropy_from_logits(logits))
            del logits
        return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)

    def _values(self, h: Tensor) -> Tensor:
        return self.value_head(h.float()).squeeze(-1)                 # (B, R)

    def policy_forward(self, input_ids, attention_mask, response_ids, temperature: float,
                       with_entropy: bool = False, trunk: Tensor | None = None, group: int = 1) -> dict:
        """Policy log-probs (B, R) of ``response_ids``; ``values`` too when the value head is shared.

        ``trunk``: :meth:`policy_trunk` of the same batch (only the blocks above ``policy_skip`` run).
        ``group``: K rows per prompt (see the module doc).
        """
        P = input_ids.shape[1] - response_ids.shape[1]
        with self.use(POLICY):
            if trunk is not None:
                h = self._upper_hidden(trunk, attention_mask, self.policy_skip, group, P)[:, P - 1 : -1]
            else:
                h = self._response_hidden(input_ids, attention_mask, P, group)
            logp, entropy = self._logprobs(h, response_ids, temperature, with_entropy)
            out = {"logprobs": logp, "entropy": entropy}
            if self.value_model == "shared":
                out["values"] = self._values(h)
        return out

    def value_forward(self, input_ids, attention_mask, prompt_length: int, trunk: Tensor | None = None) -> Tensor:
        """Values (B, R) from the value adapter (separate value model only).

        ``trunk``: :meth:`value_trunk` of the same batch, when already computed (blocks below
        ``value_skip`` are then not run again).
        """
        if not self.value_skip:
            with self.use(VALUE):
                return self._values(self._response_hidden(input_ids, attention_mask, prompt_length))
        if trunk is None:
            trunk = self.value_trunk(input_ids, attention_mask)
        with self.use(VALUE):
            h = self._upper_hidden(trunk, attention_mask, self.value_skip)
        return self._values(h[:, prompt_length - 1 : -1])

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, response_ids, temperature: float,
                           trunk: Tensor | None = None, policy_trunk: Tensor | None = None, group: int = 1) -> Tensor:
        """Reference log-probs (B, R). ``trunk``: :meth:`value_trunk` of the same batch; when the reference
        leaves those blocks untouched too (``reference_uses_trunk``) they are not run again.
        ``policy_trunk``: :meth:`policy_trunk` of the same batch (computed under the reference)."""
        P = input_ids.shape[1] - response_ids.shape[1]
        with self.use(REFERENCE if self.has_reference_adapter else None):
            if policy_trunk is not None:
                h = self._upper_hidden(policy_trunk, attention_mask, self.policy_skip, group, P)[:, P - 1 : -1]
            elif trunk is not None and self.reference_uses_trunk:
                h = self._upper_hidden(trunk, attention_mask, self.value_skip, group, P)[:, P - 1 : -1]
            else:
                h = self._response_hidden(input_ids, attention_mask, P, group)
            return self._logprobs(h, response_ids, temperature, False)[0]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, generate_kwargs: dict, pad_token_id: int,
                 eos_token_id) -> Tensor:
        """Sample responses (B, R) from the policy with the KV cache, on :func:`rlhf.packed_weights.sampling_weights`
        (prepacked weights on CPU; the policy LoRA folded in when ``merge_for_generation``).

        Log-probs are recomputed afterwards with the adapter unmerged and unpacked, so these changes
        alter sampling only by floating-point rounding and never the PPO ratios. Only the given
        ``generate_kwargs`` apply (:func:`rlhf.generation.plain_generation_config`): a penalty in the
        model's own generation config would sample from another distribution than the log-probs'.
        """
        with self.use(POLICY), sampling_weights(self.peft, POLICY if self.merge_for_generation else None), \
                plain_generation_config(self.peft):
            out = self.peft.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, **generate_kwargs,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id,
            )
        self.restore_grad_flags()
        return out[:, prompt_ids.shape[1]:]

    # saving

    def save_policy(self, out_dir: str | os.PathLike, base_name_or_path: str | None = None) -> None:
        """The policy adapter in PEFT format at the top level of ``out_dir`` (files replaced atomically)."""
        replace_files(out_dir, lambda tmp: save_adapter(self.peft, POLICY, tmp, base_name_or_path))
