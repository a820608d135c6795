"""Putting a saved reward model onto the policy's ``PeftModel`` (one base model in memory).

The RM folder holds a LoRA adapter trained on ``*ForSequenceClassification`` (task SEQ_CLS) with
the ``score`` head in ``modules_to_save``. Its LoRA keys name the decoder trunk
(``base_model.model.model.layers.N...``), which is the same path inside a causal-LM wrapper, so
the LoRA part loads onto the policy model unchanged; the head is kept outside as a frozen
``nn.Linear``. If the RM's base had an SFT LoRA merged into it, that SFT adapter (copied into the
RM folder) is loaded as a second frozen adapter and both are active while scoring: merged weights
``W + dW_sft`` followed by the RM LoRA equal ``W`` with both LoRAs active (up to float rounding).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhf.errors import UserError


def lora_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    return load_peft_weights(str(folder), device="cpu")


def split_head(weights: dict[str, torch.Tensor], head_names: list[str]) -> tuple[dict, dict]:
    """(LoRA weights, head weights): keys of ``modules_to_save`` modules (e.g. ``score``) go to the head."""
    lora, head = {}, {}
    for key, value in weights.items():
        parts = key.split(".")
        if any(name in parts for name in head_names):
            head[parts[-1]] = value
        else:
            lora[key] = value
    return lora, head


def frozen_head(head_weights: dict[str, torch.Tensor], like: torch.Tensor, calibration: dict | None = None) -> nn.Linear:
    """A frozen ``nn.Linear(H, 1)`` from saved ``weight`` (1, H) and optional ``bias`` (1,).

    ``calibration = {"mean": m, "std": s}`` folds ``(raw - m) / s`` into it: weight / s, (bias - m) / s.
    """
    if "weight" not in head_weights:
        raise UserError(
            "the reward adapter holds no score-head weight (was it trained with modules_to_save=['score']?)"
        )
    weight = head_weights["weight"].double()
    bias = head_weights["bias"].double() if "bias" in head_weights else None
    if calibration is not None:
        scale = max(float(calibration["std"]), 1e-6)
        weight = weight / scale
        bias = ((bias if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64))
                - float(calibration["mean"])) / scale
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    head.requires_grad_(False)
    return head.to(device=like.device, dtype=like.dtype).eval()


def _frozen_lora_config(folder: str | Path, task_type):
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    config.task_type = task_type
    config.modules_to_save = None
    config.lora_dropout = 0.0
    config.inference_mode = True
    return config


def _load_checked(peft_model, folder: str | Path, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
    """Fill ``adapter_name`` from ``weights``; every saved key must land on a parameter and every one be filled."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        peft_model.delete_adapter(adapter_name)
        bad = (list(result.unexpected_keys) + missing)[:3]
        raise UserError(f"the reward adapter in {folder} does not map onto the policy model (e.g. {', '.join(bad)})")
    for name, param in peft_model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)


def add_frozen_lora(peft_model, folder: str | Path, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
    """Add the LoRA adapter of ``folder`` to ``peft_model`` as ``adapter_name`` (frozen, inactive).

    Checks that every saved key lands on a parameter and every new parameter is filled.
    """
    if adapter_name in peft_model.peft_config:
        raise UserError(f"the policy model already has an adapter named '{adapter_name}'")
    config = _frozen_lora_config(folder, peft_model.peft_config[peft_model.active_adapters[0]].task_type)
    try:
        peft_model.add_adapter(adapter_name, config)
    except ValueError as exc:
        raise UserError(f"cannot add the reward adapter to the policy model: {exc}") from None
    _load_checked(peft_model, folder, adapter_name, weights)


def frozen_lora_model(model, folder: str | Path, adapter_name: str, weights: dict[str, torch.Tensor]):
    """``model`` wrapped in a ``PeftModel`` whose first adapter ``adapter_name`` is the frozen LoRA of ``folder``
    (LoRA weights only: heads are kept outside, as with :func:`add_frozen_lora`). No task type: a
    sequence-classification ``PeftModel`` would add its head to ``modules_to_save`` again."""
    from peft import get_peft_model

    config = _frozen_lora_config(folder, None)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _load_checked(peft_model, folder, adapter_name, weights)
    return peft_model.eval()


@contextmanager
def adapters_active(peft_model, adapter_names: list[str]):
    """Run the body with only ``adapter_names`` active and every module in eval mode, then restore exactly.

    Restored afterwards: the previously active adapter(s), each parameter's ``requires_grad``
    (PEFT's ``set_adapter`` flips them), each module's ``training`` flag, and adapters disabled
    by ``peft_model.disable_adapter()`` (scoring inside that context still uses the RM adapter).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    previous = peft_model.base_model.active_adapter
    grads = [(p, p.requires_grad) for p in peft_model.parameters()]
    modes = [(m, m.training) for m in peft_model.modules()]
    disabled = [(m, m._disable_adapters) for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    try:
        peft_model.eval()
        for m, _ in disabled:
            m._disable_adapters = False
        peft_model.base_model.set_adapter(
            adapter_names if len(adapter_names) > 1 else adapter_names[0], inference_mode=True
        )
        yield
    finally:
        peft_model.base_model.set_adapter(previous)
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
        for m, flag in disabled:
            m._disable_adapters = flag
