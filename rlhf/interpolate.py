"""Weight-space interpolation (WiSE-FT): theta = (1 - alpha) * theta_from + alpha * theta_finetuned.

``theta_from`` is the base model or the SFT policy the fine-tuned weights started from. For LoRA
adapters the interpolation is itself a LoRA wherever that is exact:

* from the base: DeltaW(alpha) = alpha * s * B @ A, i.e. the same adapter with every B scaled by alpha
  (:func:`scale_lora`; any rank/alpha pattern, rsLoRA and LoRA biases included);
* from an SFT LoRA the policy started as a copy of: DeltaW(alpha) = (1 - alpha) * DeltaW_sft +
  alpha * DeltaW_policy, a LoRA of rank r_sft + r_policy (:func:`interpolate_lora`).

:func:`lora_interpolation` picks between the two; ``rlhf export`` writes its result and ``rlhf eval
--alpha_sweep`` loads it for each alpha. Anything else (other adapter kinds, differing targets, full
fine-tuned models) is mixed tensor by tensor on the full weights (:func:`mix_parameters`). Loading
and writing live in :mod:`rlhf.export`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

LORA_A = (".lora_A.", ".lora_embedding_A")
LORA_B = (".lora_B.", ".lora_embedding_B")


# pure math


def lora_scale(cfg: dict, rank: int) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = cfg.get("lora_alpha", rank)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def interpolate_lora(
    terms: list[tuple[float, dict[str, torch.Tensor], dict]],
) -> tuple[dict[str, torch.Tensor], int]:
    """Exact LoRA for sum_i c_i * DeltaW_i, each DeltaW_i = s_i * B_i @ A_i.

    ``terms``: (coefficient c_i, adapter state dict, adapter config). Ranks
    are concatenated: A = [A_1; A_2; ...] (r, in), B = [c_1 s_1 B_1, ...] (out, r),
    so that B @ A = sum_i c_i s_i B_i A_i with scale 1 (write lora_alpha = r).
    All adapters must wrap the same modules. Returns (state dict, total rank).
    """
    import torch

    keys = [sorted(k for k in sd if ".lora_A." in k) for _, sd, _ in terms]
    if any(k != keys[0] for k in keys):
        raise UserError("the two adapters wrap different modules: their interpolation is not one LoRA adapter")
    out: dict[str, torch.Tensor] = {}
    total_rank = None
    for a_key in keys[0]:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        a_parts, b_parts = [], []
        for coef, sd, cfg in terms:
            a, b = sd[a_key].float(), sd[b_key].float()
            a_parts.append(a)
            b_parts.append(b * (coef * lora_scale(cfg, a.shape[0])))
        out[a_key] = torch.cat(a_parts, dim=0).contiguous()
        out[b_key] = torch.cat(b_parts, dim=1).contiguous()
        rank = out[a_key].shape[0]
        if total_rank not in (None, rank):
            raise UserError("the adapters use per-module ranks: their interpolation is not one LoRA adapter")
        total_rank = rank
    return out, int(total_rank or 0)


def scale_lora(state: dict[str, torch.Tensor], coef: float) -> dict[str, torch.Tensor]:
    """The LoRA state with every B (weights and LoRA biases) times ``coef``: DeltaW -> coef * DeltaW, exactly.

    DeltaW = s * B @ A (+ b_B) is linear in B, whatever s (lora_alpha, alpha/rank patterns, rsLoRA).
    The input is not modified.
    """
    return {k: (v * coef if any(tag in k for tag in LORA_B) else v.clone()) for k, v in state.items()}


def is_plain_lora(cfg: dict, state: dict) -> bool:
    """True when the adapter is LoRA with one rank/alpha everywhere and nothing but lora_A/lora_B weights."""
    return (
        cfg.get("peft_type") == "LORA"
        and not cfg.get("rank_pattern")
        and not cfg.get("alpha_pattern")
        and not cfg.get("use_dora")
        and not cfg.get("lora_bias")
        and all(".lora_A." in k or ".lora_B." in k for k in state)
    )


def is_scalable_lora(cfg: dict, state: dict) -> bool:
    """True when DeltaW is linear in the B matrices: LoRA without DoRA and without full modules_to_save copies."""
    return (
        cfg.get("peft_type") == "LORA"
        and not cfg.get("use_dora")
        and all(any(tag in k for tag in LORA_A + LORA_B) for k in state)
    )


def lora_interpolation(
    alpha: float,
    tuned: tuple[dict, dict[str, torch.Tensor]],
    start: tuple[dict, dict[str, torch.Tensor]] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """theta(alpha) = (1 - alpha) * theta_start + alpha * theta_tuned as one LoRA adapter, exactly.

    ``tuned`` / ``start``: (adapter config, adapter state dict) of the fine-tuned LoRA and of the SFT
    LoRA it started from; ``start`` None means the base model. Returns (adapter config, state dict):
    from the base, the tuned adapter with B scaled by alpha (:func:`scale_lora`, same config); from an
    SFT LoRA, both products side by side (:func:`interpolate_lora`), rank r = r_sft + r_tuned with
    ``lora_alpha = r`` (scale 1). The config does not depend on alpha. UserError when the result is not
    one LoRA (see :func:`is_exact_lora`, or the two wrap different modules).
    """
    if not is_exact_lora(tuned, start):
        raise UserError("this interpolation is not exactly one LoRA adapter (that needs LoRA without DoRA or "
                        "full module copies, and plain LoRA on both sides from an SFT adapter)")  # fmt: skip
    tuned_cfg, tuned_state = tuned
    if start is None:
        return tuned_cfg, scale_lora(tuned_state, alpha)
    state, rank = interpolate_lora([(1.0 - alpha, start[1], start[0]), (alpha, tuned_state, tuned_cfg)])
    return dict(tuned_cfg, r=rank, lora_alpha=rank, use_rslora=False), state


def is_exact_lora(tuned: tuple[dict, dict], start: tuple[dict, dict] | None) -> bool:
    """Whether :func:`lora_interpolation` applies: a scalable LoRA from the base, two plain LoRAs from an SFT one.

    (From an SFT LoRA the two must also wrap the same modules with one rank each; that is checked
    when the products are stacked.)
    """
    if start is None:
        return is_scalable_lora(*tuned)
    return is_plain_lora(*tuned) and is_plain_lora(*start)


def mix_parameters(tuned: nn.Module, start: nn.Module, alpha: float, names: tuple[str, str]) -> None:
    """In place: every parameter p of ``tuned`` becomes (1 - alpha) * p_start + alpha * p.

    Both models must have the same parameter names and shapes (UserError naming ``names`` =
    (tuned, start) otherwise). Tied parameters are mixed once (``named_parameters`` lists them once).
    """
    import torch

    start_params = dict(start.named_parameters())
    tuned_params = dict(tuned.named_parameters())
    missing = sorted(set(tuned_params) ^ set(start_params))
    if missing:
        raise UserError(f"{names[1]} and {names[0]} have different weights (e.g. {missing[0]}): "
                        f"{names[1]} is not the model {names[0]} was fine-tuned from")  # fmt: skip
    for name, p in tuned_params.items():
        if p.shape != start_params[name].shape:
            raise UserError(f"{names[1]} and {names[0]} differ in the shape of {name}: "
                            f"{names[1]} is not the model {names[0]} was fine-tuned from")  # fmt: skip
    with torch.no_grad():
        for name, p in tuned_params.items():
            p.copy_((1.0 - alpha) * start_params[name].to(p.dtype) + alpha * p)


# where the fine-tuned weights started


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_folder(a: str | Path, b: str | Path, weights: str = "adapter_model.safetensors") -> bool:
    """Same folder, or a copy of it: the same resolved path, or byte-identical ``weights`` files."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.resolve() == b.resolve():
        return True
    fa, fb = a / weights, b / weights
    if not (fa.is_file() and fb.is_file()) or fa.stat().st_size != fb.stat().st_size:
        return False
    return _file_digest(fa) == _file_digest(fb)


def same_model_name(a: str, b: str) -> bool:
    """Two model references name the same model: equal strings, or paths resolving to one folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
