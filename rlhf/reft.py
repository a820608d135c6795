"""LoReFT: low-rank representation fine-tuning (Wu et al., 2024).

Instead of changing weights, a LoReFT intervention edits the hidden state h
(d,) that a transformer block writes to the residual stream:

    LoReFT(h) = h + R^T (W h + b - R h)

with R (r, d) having orthonormal rows, W (r, d), b (r,). Only R, W, b train;
the base model is frozen. Here the intervention is applied at every position
of the chosen blocks' outputs (so generation sees the same edit as training),
and W = R, b = 0 at initialisation, so training starts from the base model.

Saved as ``reft_config.json`` + ``reft_interventions.safetensors``;
``rlhf.models.load_model(base, adapter=folder)`` re-attaches them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from rlhf.models import decoder_layers

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
        r = self.rotate.weight.to(h.dtype)  # (r, d)
        edit = self.learned(h) - h @ r.T  # (..., r)
        return h + edit @ r  # (..., d)


def _hook(intervention: LoReFTIntervention):
    def apply(module, args, output):
        if isinstance(output, tuple):
            return (intervention(output[0]),) + tuple(output[1:])
        return intervention(output)

    return apply


def attach_reft(model: nn.Module, layers: list[int], rank: int) -> nn.ModuleDict:
    """Add LoReFT interventions on the outputs of ``layers`` (negative indices count from the top).

    The interventions live in ``model.reft_interventions`` so optimisers and
    ``named_parameters`` see them; every other parameter is frozen.
    """
    blocks = decoder_layers(model)[1]
    resolved = sorted({i % len(blocks) for i in layers})
    model.requires_grad_(False)
    hidden = model.config.hidden_size
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    interventions = nn.ModuleDict({str(i): LoReFTIntervention(hidden, rank) for i in resolved}).to(device)
    if dtype != torch.float32:
        interventions.to(dtype)
    for i in resolved:
        blocks[i].register_forward_hook(_hook(interventions[str(i)]))
    model.reft_interventions = interventions
    model.reft_config = {"layers": resolved, "rank": rank, "base_model_name_or_path": model.config.name_or_path}
    return interventions


def save_reft(model: nn.Module, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.reft_interventions.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"reft_type": "loreft", **model.reft_config}, indent=2))


def is_reft_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_reft(model: nn.Module, folder: str | Path) -> nn.Module:
    """Attach the interventions saved in ``folder`` to ``model`` (in place) and return it."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(folder) / CONFIG_FILE).read_text())
    interventions = attach_reft(model, cfg["layers"], cfg["rank"])
    interventions.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return model
