"""LoReFT: low-rank representation fine-tuning (Wu et al., 2024).

Instead of changing weights, a LoReFT intervention edits the hidden state h
(d,) that a transformer block writes to the residual stream:

    LoReFT(h) = h + R^T (W h + b - R h)

with R (r, d) having orthonormal rows, W (r, d), b (r,). Only R, W, b train;
the base model is frozen. Here the intervention is applied at every position
of the chosen blocks' outputs (so generation sees the same edit as training),
and W = R, b = 0 at initialisation, so training starts from the base model.

Saved as ``reft_config.json`` + ``reft_interventions.safetensors``;
``rlhf.models.load_model(base, adapter=folder)`` re-attaches them. The interventions are a
hooked module adapter (:mod:`rlhf.hooked`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from rlhf.errors import ConfigError
from rlhf.hooked import HookedAdapter, attached_adapter, decoder_layers

CONFIG_FILE = "reft_config.json"
WEIGHTS_FILE = "reft_interventions.safetensors"


class LoReFTIntervention(nn.Module):
    """h -> h + R^T (W h + b - R h); h: (..., d), R and W: (r, d), b: (r,)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.rotate = orthogonal(nn.Linear(hidden_size, rank, bias=False))  # R, orthonormal rows
        self.learned = nn.Linear(hidden_size, rank)  # W, b
        with torch.no_grad():
            self.learned.weight.copy_(self.rotate.weight)
            self.learned.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r, x = self.rotate.weight, h.to(self.rotate.weight.dtype)  # (r, d); in fp32 on a half-precision model
        edit = self.learned(x) - x @ r.T  # (..., r)
        return h + (edit @ r).to(h.dtype)  # (..., d)


class LoReFT(HookedAdapter):
    """One :class:`LoReFTIntervention` per edited block, keyed by the block index, on the block's output."""

    method = "loreft"
    full_precision = True  # the orthogonal parametrisation (Householder product) has no half-precision kernel
    config_file = CONFIG_FILE
    weights_file = WEIGHTS_FILE
    attribute = "reft_interventions"
    type_key = "reft_type"

    @classmethod
    def from_settings(cls, model: nn.Module, settings: dict) -> LoReFT:
        """``settings``: ``layers`` (negative indices count from the top) and ``rank``."""
        n_blocks = len(decoder_layers(model)[1])
        layers, rank = sorted({int(i) % n_blocks for i in settings["layers"]}), int(settings["rank"])
        hidden = model.config.hidden_size
        if not 1 <= rank <= hidden:  # R has orthonormal rows: at most as many as the hidden size
            raise ConfigError(f"config key 'reft_rank' is {rank}: it must be between 1 and the model's hidden size "
                              f"{hidden}")
        return cls({"layers": layers, "rank": rank}, {str(i): LoReFTIntervention(hidden, rank) for i in layers})

    def sites(self, model: nn.Module) -> dict[str, nn.Module]:
        blocks = decoder_layers(model)[1]
        return {key: blocks[int(key)] for key in self}


def attach_reft(model: nn.Module, layers: list[int], rank: int) -> LoReFT:
    """Add LoReFT interventions on the outputs of ``layers`` (negative indices count from the top).

    The interventions live in ``model.reft_interventions``; every other parameter is frozen.
    """
    return LoReFT.from_settings(model, {"layers": layers, "rank": rank}).attach(model)


def save_reft(model: nn.Module, folder: str | Path) -> None:
    attached_adapter(model).save(folder)
