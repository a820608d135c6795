"""LoReFT reward models: ``rlhf reward --method loreft``.

The backbone is adapted by LoReFT interventions (:mod:`rlhf.reft`) instead of LoRA: on the output h (d,) of
each chosen block of the frozen ``*ForSequenceClassification`` model,

    h -> h + R^T (W h + b - R h),      R (r, d) with orthonormal rows, W (r, d), b (r,)

and the ``score`` head (H -> 1) trains in full; nothing else changes (input layout, pooling, loss: see
:mod:`reward.modeling`, :mod:`reward.trainer`). ``R`` stays orthonormal while training: it is a
parametrisation (``torch.nn.utils.parametrizations.orthogonal``), so the optimizer moves the unconstrained
tensor behind it, never ``R`` itself. Saved beside ``reward_model.json`` (``"method": "loreft"``)::

    reft_config.json, reft_interventions.safetensors    the interventions (rlhf.hooked format)
    score_head.safetensors                             the score head: weight (1, H) [and bias (1,)]

SFT starting point (``sft_adapter``): a LoRA adapter is merged into the base weights, as for a LoRA reward
model; a hooked SFT adapter (``loreft``, ``bottleneck_adapter``) is attached, frozen, to the decoder trunk
(``model.model``, by :func:`reward.modeling.build_reward_model`) before the reward interventions are attached
to the classification model. On every block the SFT hooks, registered first, run first: the reward
interventions edit the hidden states of the SFT policy.

A LoReFT reward model is not attached to PPO's shared base (:meth:`reward.scorer.RewardScorer.incompatibility`
returns :data:`STANDALONE_REASON`): PPO loads it standalone and scores re-tokenised texts.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from reward.modeling import REFT_HEAD_FILE, check_lora_adapter, head_linear, trunk_and_head
from rlhf.errors import ConfigError, UserError
from rlhf.models import check_adapter, hooked_adapter_type, not_peft_message

STANDALONE_REASON = (
    "it adapts its backbone with LoReFT interventions, forward hooks on the base's blocks that cannot be switched "
    "off like LoRA adapters and would also edit the policy, reference and value passes on a shared base"
)


def check_sft_adapter(adapter: str, method: str = "lora") -> None:
    """An ``sft_adapter`` the reward ``method`` can start from (ConfigError otherwise): a LoRA adapter, or with
    method loreft also a hooked adapter (loreft, bottleneck_adapter)."""
    hooked = hooked_adapter_type(adapter)
    if hooked is None:
        check_lora_adapter(adapter)
    elif method != "loreft":
        raise ConfigError(f"config key 'sft_adapter': {not_peft_message(adapter, hooked.method)}, "
                          "or train the reward model with --method loreft, which stacks its interventions on it")
    else:
        check_adapter(adapter, hooked=True)


def check_reft_layers(model_name_or_path: str, layers: list[int]) -> None:
    """``reft_layers`` must index the base's blocks (read from its config, before any weights load)."""
    from transformers import AutoConfig

    from rlhf.models import resolve_model_path

    try:
        n_blocks = AutoConfig.from_pretrained(resolve_model_path(model_name_or_path)).get_text_config().num_hidden_layers
    except (OSError, ValueError, AttributeError):
        return  # an unreadable base is reported where it loads; attach_reward_interventions checks again
    if any(not -n_blocks <= i < n_blocks for i in layers):
        raise ConfigError(f"config key 'reft_layers' must index the model's {n_blocks} blocks")


def attach_reward_interventions(model: nn.Module, layers: list[int], rank: int):
    """LoReFT interventions on the outputs of ``layers`` (negative: from the top; empty: every block) of a
    sequence-classification model; every base parameter is frozen, the interventions and the ``score`` head
    train. Returns the interventions (``model.reft_interventions``)."""
    from rlhf.hooked import decoder_layers
    from rlhf.reft import LoReFT

    n_blocks = len(decoder_layers(model)[1])
    if any(not -n_blocks <= i < n_blocks for i in layers):
        raise ConfigError(f"config key 'reft_layers' must index the model's {n_blocks} blocks")
    adapter = LoReFT.from_settings(model, {"layers": list(layers) or list(range(n_blocks)), "rank": rank})
    adapter.attach(model)
    trunk_and_head(model)[1].requires_grad_(True)
    return adapter


def save_reward_interventions(model: nn.Module, folder: str | Path) -> None:
    """Write the interventions (``reft_config.json`` + ``reft_interventions.safetensors``) and the score head."""
    from safetensors.torch import save_file

    from rlhf.hooked import attached_adapter

    adapter = attached_adapter(model)
    if adapter is None or adapter.method != "loreft":
        raise UserError("the reward model carries no LoReFT interventions to save")
    adapter.save(folder)
    head = head_linear(trunk_and_head(model)[1])
    save_file({name: p.detach().cpu().contiguous() for name, p in head.named_parameters()},
              str(Path(folder) / REFT_HEAD_FILE))  # fmt: skip


def load_reward_interventions(model: nn.Module, folder: str | Path) -> nn.Module:
    """Attach the interventions saved in ``folder`` to ``model`` (sequence classification, frozen) and load
    its score head; returns ``model``."""
    from safetensors.torch import load_file

    from rlhf.reft import LoReFT

    LoReFT.load(model, folder)
    try:
        trunk_and_head(model)[1].load_state_dict(load_file(str(Path(folder) / REFT_HEAD_FILE)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot load the score head of {folder}: {first}") from None
    return model
