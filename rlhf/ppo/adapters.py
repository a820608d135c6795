"""Building the PPO actor-critic's adapters on one base model, and loading a policy's starting weights.

The policy starts as an exact copy of the SFT LoRA (``reference`` stays frozen beside it), or as a fresh LoRA
on the base, or from the LoRA weights of an earlier round's aligned policy (``policy_init``). The passes over
these adapters are :class:`rlhf.ppo.policy.ActorCritic`'s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rlhf.errors import UserError
from rlhf.ppo.policy import POLICY, REFERENCE, ActorCritic, disable_dropout


def load_policy_weights(peft, folder: str) -> None:
    """Set the policy adapter's LoRA weights to those of the adapter in ``folder`` (same shape required)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"policy_init: {folder} is not a LoRA adapter folder (adapter_config.json, "
                        "adapter_model.safetensors)")
    mine, theirs = peft.peft_config[POLICY], json.loads((path / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha"):
        if theirs.get(key) != getattr(mine, key):
            raise UserError(f"policy_init: {folder} has {key} {theirs.get(key)}, the policy adapter "
                            f"{getattr(mine, key)} (start from an adapter made on the same SFT adapter)")
    result = set_peft_model_state_dict(peft, load_file(str(path / "adapter_model.safetensors")), adapter_name=POLICY)
    missing = [k for k in result.missing_keys if f".{POLICY}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise UserError(f"policy_init: {folder} does not match the policy adapter ({name})")


def build_actor_critic(base_model, *, sft_adapter: str | None, lora, value_model: str = "separate",
                       base_name_or_path: str | None = None, policy_init: str | None = None) -> ActorCritic:
    """Wrap ``base_model`` (modified in place, never copied) into an :class:`ActorCritic`.

    ``lora`` is the LoraConfig of a fresh policy adapter (without ``sft_adapter``). The policy starts
    as a copy of the SFT adapter (or, fresh, as the base), or from the LoRA weights of ``policy_init``
    (e.g. the previous round's aligned policy, an adapter of the same shape). The value
    adapter is added afterwards with :meth:`ActorCritic.add_value_adapter` (a fresh LoRA or a copy
    of the reward adapter, once the reward model is attached).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from rlhf.models import load_peft_adapter

    disable_dropout(base_model)
    if sft_adapter:
        path = Path(sft_adapter)
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"sft_adapter folder {sft_adapter} has no adapter_config.json")
        peft = load_peft_adapter(base_model, path, adapter_name=REFERENCE, is_trainable=False)
        ref_config = peft.peft_config[REFERENCE]
        if ref_config.peft_type.value != "LORA":
            raise UserError(
                f"sft_adapter {sft_adapter} is a {ref_config.peft_type.value} adapter; PPO needs a LoRA adapter "
                "(for a full or merged SFT model pass it as model_name_or_path)"
            )
        config = copy.deepcopy(ref_config)
        config.inference_mode = False
        config.lora_dropout = 0.0
        peft.add_adapter(POLICY, config)
        state = get_peft_model_state_dict(peft, adapter_name=REFERENCE)
        set_peft_model_state_dict(peft, state, adapter_name=POLICY)
    else:
        peft = get_peft_model(base_model, copy.deepcopy(lora), adapter_name=POLICY)
    if policy_init:
        load_policy_weights(peft, policy_init)
    if base_name_or_path:
        peft.peft_config[POLICY].base_model_name_or_path = base_name_or_path
    peft.set_adapter(POLICY, inference_mode=True)
    peft.eval()
    actor = ActorCritic(peft, has_reference_adapter=bool(sft_adapter), value_model=value_model)
    return actor
