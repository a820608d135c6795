"""Inference-only weights for fast token-by-token sampling: oneDNN-prepacked copies of every linear weight,
with a LoRA adapter folded in (:func:`sampling_weights`), or the adapter merged into temporary dense copies
(:func:`merged_adapter`). The model's own tensors are never changed."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def _packed_linear_ops():
    """oneDNN's prepacked fp32 linear (``(pack, linear)``) when this torch build has it and it computes
    ``F.linear`` on a probe; else None. CPU only: it is the op torch's own CPU compiler uses for frozen weights."""
    global _PACKED_OPS
    if _PACKED_OPS is None:
        _PACKED_OPS = (None,)
        try:
            pack, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
            if torch.backends.mkldnn.is_available():   # fixed probe values: the global RNG is not touched
                w = torch.linspace(-1, 1, 15).reshape(5, 3)
                b, x = torch.linspace(0, 1, 5), torch.linspace(-2, 2, 24).reshape(2, 4, 3)
                if torch.allclose(linear(x, pack(w), b, "none", [], ""), nn.functional.linear(x, w, b), atol=1e-5):
                    _PACKED_OPS = (pack, linear)
        except (AttributeError, RuntimeError):
            pass
    return _PACKED_OPS if len(_PACKED_OPS) == 2 else None


_PACKED_OPS: tuple | None = None


def _foldable_lora(model: nn.Module, adapter: str) -> dict | None:
    """``{id(base linear): lora layer}`` when LoRA ``adapter`` is a plain ``W + delta_W`` on linear layers only;
    None when folding it and disabling the adapters would change the outputs (LoRA on embeddings or other
    layer types, DoRA and other variants, LoRA biases, ``modules_to_save`` / trainable tokens)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None or getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return None
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.r]
    plain = all(
        type(m) is LoraLinear and not m.use_dora.get(adapter) and adapter not in getattr(m, "lora_variant", {})
        and not getattr(m, "lora_bias", {}).get(adapter) for m in layers
    )
    return {id(m.get_base_layer()): m for m in layers} if plain else None


def _packed_forward(linear, packed, bias, x):
    if torch.is_grad_enabled():
        raise RuntimeError("sampling_weights is for inference: call the model under torch.no_grad()")
    return linear(x, packed, bias, "none", [], "")


@contextmanager
def sampling_weights(model: nn.Module, fold_adapter: str | None = None):
    """Run the body (inference only) with the fastest weights for token-by-token sampling.

    On CPU with fp32 weights, every ``nn.Linear`` computes from a oneDNN-prepacked copy of its
    weight: on the benchmark machine one decoding step's matmuls run 1.55-1.71x faster than with
    ``F.linear`` and HF ``generate`` 1.24-1.26x (bench/RESULTS.md); outputs equal ``F.linear``'s up
    to float rounding (~1e-5). ``fold_adapter`` (a LoRA adapter of a PEFT model) is folded into those
    copies (``W + delta_W``, one matmul per layer) and every adapter is disabled inside; an adapter
    that is not a plain sum on linear layers (see :func:`_foldable_lora`) is left on, unfolded. The
    copies cost one extra copy of the weights while the body runs and are dropped afterwards; the
    model's own tensors are not changed. Without the packed op (GPU, other dtypes, other torch
    builds) folding falls back to :func:`merged_adapter` (temporary dense copies of the adapted
    weights). A packed layer called with grad enabled raises; the context does not nest.
    """
    modules = list(model.modules())
    if any(getattr(m.__dict__.get("forward"), "func", None) is _packed_forward for m in modules):
        raise RuntimeError("sampling_weights does not nest: the model is already in a sampling_weights context")
    ops = _packed_linear_ops()
    linears = [m for m in modules if isinstance(m, nn.Linear)
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
               and "forward" not in m.__dict__] if ops else []   # (an instance forward: someone's hook, left alone)
    folded = (_foldable_lora(model, fold_adapter) or {}) if fold_adapter is not None else {}
    packable = {id(m) for m in linears}
    if not linears or any(key not in packable for key in folded):    # dense fold (e.g. CUDA or bf16 weights)
        with merged_adapter(model, fold_adapter) if folded else nullcontext(), _packed(linears, {}, ops):
            yield
        return
    with _packed(linears, {k: (lora, fold_adapter) for k, lora in folded.items()}, ops), \
            model.disable_adapter() if folded else nullcontext():
        yield


@contextmanager
def _packed(linears: list[nn.Linear], folds: dict, ops):
    """``linears`` compute from packed copies of ``weight`` (+ the LoRA delta ``folds[id(layer)]`` names)."""
    try:
        with torch.no_grad():
            for module in linears:
                weight = module.weight.detach()
                if id(module) in folds:
                    lora, name = folds[id(module)]
                    weight = weight + lora.get_delta_weight(name).to(weight.dtype)
                module.forward = functools.partial(_packed_forward, ops[1], ops[0](weight), module.bias)
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)


@contextmanager
def merged_adapter(peft_model, adapter: str):
    """Run the body with LoRA ``adapter`` folded into temporary copies of the weights it adapts.

    Inside, every adapter is disabled and each adapted layer computes with ``W + delta_W`` in one
    matmul (no per-layer LoRA calls: faster token-by-token sampling); afterwards the original weight
    tensors are put back untouched (same storage, same values). Costs one copy of the adapted
    weights while the body runs. For inference only. When an adapted weight is shared by another
    module (tied input/output embeddings), or the adapter is not a plain ``W + delta_W`` on linear
    layers (:func:`_foldable_lora`), folding would change the outputs: the body then runs with the
    adapter unmerged, as the caller left it.
    """
    layers = list((_foldable_lora(peft_model, adapter) or {}).values())
    if not layers:
        yield
        return
    owners: dict[int, int] = {}
    for module in peft_model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    if any(owners.get(id(m.get_base_layer().weight), 0) > 1 for m in layers):
        yield
        return
    saved = []
    try:
        with torch.no_grad():
            for module in layers:
                weight = module.get_base_layer().weight
                saved.append((weight, weight.data))
                weight.data = weight.data + module.get_delta_weight(adapter).to(weight.dtype)
        with peft_model.disable_adapter():
            yield
    finally:
        for weight, data in saved:
            weight.data = data
