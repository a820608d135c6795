"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021).

A bottleneck adapter rewrites the output h (d,) of a transformer sub-layer (attention or MLP) before it
is added to the residual stream:

    Adapter(h) = h + W_up act(W_down h + b_down) + b_up

with W_down (m, d), W_up (d, m), m = d // reduction_factor. W_up = 0, b_up = 0 at initialisation, so
training starts from the base model. ``placement``: after the MLP of every block (``mlp``, Pfeiffer),
after the attention (``attention``), or both (``both``, Houlsby). Only the adapters train.

Saved as ``bottleneck_config.json`` (method, reduction factor, placement, non-linearity, hidden size,
block count, base model) + ``bottleneck_adapter.safetensors``; ``rlhf.models.load_model(base,
adapter=folder)`` re-attaches them. A hooked module adapter (:mod:`rlhf.hooked`): it cannot be merged
into the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.errors import ConfigError, UserError
from rlhf.hooked import HookedAdapter, decoder_layers

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"attention": ("attention",), "mlp": ("mlp",), "both": ("attention", "mlp")}
SUBLAYER_NAMES = {  # attribute names of a block's sub-layers across architectures (Llama, GPT-2, NeoX, Falcon, ...)
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))); h: (..., d), down: d -> m, up: m -> d (zero at initialisation)."""

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)  # W_down (m, d), b_down (m,)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck_size, hidden_size)  # W_up (d, m), b_up (d,)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))  # (..., d)


def sublayer(block: nn.Module, part: str) -> nn.Module:
    """The attention or MLP sub-module of a transformer block."""
    for name in SUBLAYER_NAMES[part]:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"bottleneck_adapter: a {type(block).__name__} block has no {part} sub-layer "
                    f"(looked for {', '.join(SUBLAYER_NAMES[part])})")  # fmt: skip


class BottleneckAdapter(HookedAdapter):
    """One :class:`Bottleneck` per adapted sub-layer, keyed ``"<block>_<attention|mlp>"``."""

    method = "bottleneck_adapter"
    config_file = CONFIG_FILE
    weights_file = WEIGHTS_FILE
    attribute = "bottleneck_adapters"
    type_key = "adapter_type"

    @classmethod
    def from_settings(cls, model: nn.Module, settings: dict) -> BottleneckAdapter:
        """``settings``: ``reduction_factor``, ``placement``, ``non_linearity``; a saved config also records
        ``hidden_size`` and ``num_layers``, which must match ``model``."""
        n_blocks, hidden = len(decoder_layers(model)[1]), model.config.hidden_size
        recorded = settings.get("hidden_size", hidden), settings.get("num_layers", n_blocks)
        if recorded != (hidden, n_blocks):
            raise UserError(f"it was made for a base with hidden size {recorded[0]} and {recorded[1]} blocks, "
                            f"this base has {hidden} and {n_blocks}")  # fmt: skip
        reduction, placement, non_linearity = (
            int(settings["reduction_factor"]), settings["placement"], settings["non_linearity"]
        )
        if placement not in PLACEMENTS or non_linearity not in ACTIVATIONS:
            raise ValueError(f"placement {placement!r} or non_linearity {non_linearity!r}")
        width = hidden // reduction if reduction >= 1 else 0
        if width < 1:
            raise ConfigError(f"config key 'adapter_reduction_factor' is {reduction}: it must be between 1 and "
                              f"the model's hidden size {hidden}")  # fmt: skip
        edits = {f"{i}_{part}": Bottleneck(hidden, width, non_linearity)
                 for i in range(n_blocks) for part in PLACEMENTS[placement]}  # fmt: skip
        return cls(
            {"reduction_factor": reduction, "placement": placement, "non_linearity": non_linearity,
             "hidden_size": hidden, "bottleneck_size": width, "num_layers": n_blocks},  # fmt: skip
            edits,
        )

    def sites(self, model: nn.Module) -> dict[str, nn.Module]:
        blocks = decoder_layers(model)[1]
        sites = {}
        for key in self:
            index, part = key.split("_", 1)
            sites[key] = sublayer(blocks[int(index)], part)
        return sites


def attach_bottleneck(model: nn.Module, reduction_factor: int, placement: str, non_linearity: str):
    """Add bottleneck adapters to every block of ``model`` (in ``model.bottleneck_adapters``); the base is frozen."""
    settings = {"reduction_factor": reduction_factor, "placement": placement, "non_linearity": non_linearity}
    return BottleneckAdapter.from_settings(model, settings).attach(model)
