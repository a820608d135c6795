"""``rlhf export``: ship an aligned adapter as an adapter, a merged model, or an interpolation.

Interpolation is in weight space between the SFT policy and the aligned
policy: theta = (1 - alpha) * theta_SFT + alpha * theta_aligned. When both are
LoRA adapters on the same base and modules, the result is itself exactly a
LoRA adapter (see :func:`interpolate_lora`); otherwise it is written merged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import Literal, Optional, field, require
from rlhf.errors import UserError
from rlhf.outputs import check_output_dir, staged_output, write_json

if TYPE_CHECKING:  # the config below is imported by the CLI parser: torch loads only when an export runs
    import torch

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass
class ExportConfig:
    """Options of ``rlhf export``."""

    adapter: str = field("", "aligned PEFT adapter folder (e.g. the output_dir of rlhf ppo)")
    mode: Literal["adapter", "merged", "interpolate"] = field("adapter", "what to write")
    out: str = field("outputs/export", "output folder")
    alpha: float = field(0.5, "interpolate: weight of the aligned policy (0 = SFT, 1 = aligned)")
    sft_adapter: Optional[str] = field(
        None, "interpolate: the SFT adapter (default: the one recorded in the adapter's run_config.yaml; none = base)"
    )
    model_name_or_path: Optional[str] = field(None, "base model (default: the one recorded in adapter_config.json)")
    interpolate_format: Literal["auto", "adapter", "merged"] = field(
        "auto", "interpolate: write an adapter when exact (auto), or force one format"
    )

    def __post_init__(self):
        require(bool(self.adapter), "config key 'adapter' is required")
        require(0.0 <= self.alpha <= 1.0, "config key 'alpha' must be in [0, 1]")


# helper functions


def adapter_config(folder: str | Path) -> dict:
    from rlhf.models import read_adapter_config

    if not (Path(folder) / "adapter_config.json").is_file():
        raise UserError(f"adapter folder {folder} has no adapter_config.json (export takes PEFT adapters)")
    return read_adapter_config(folder)


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
        raise UserError("adapters wrap different modules; interpolation can only be written merged")
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
            raise UserError("adapters use per-module ranks; interpolation can only be written merged")
        total_rank = rank
    return out, int(total_rank or 0)


def is_plain_lora(cfg: dict, state: dict) -> bool:
    """True when the adapter is LoRA with one rank/alpha everywhere and nothing but lora_A/lora_B weights."""
    return (
        cfg.get("peft_type") == "LORA"
        and not cfg.get("rank_pattern")
        and not cfg.get("alpha_pattern")
        and not cfg.get("use_dora")
        and all(".lora_A." in k or ".lora_B." in k for k in state)
    )


def load_adapter_state(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"adapter folder {folder} has no adapter_model.safetensors")
    return load_file(str(path))


def merged_model(base: str, adapter: str | None):
    """Base weights with ``adapter`` folded in (or the plain base)."""
    import torch
    from peft import PeftModel

    from rlhf.models import load_base_model

    model = load_base_model(base, dtype=torch.float32, device=torch.device("cpu"))
    if adapter:
        peft_type = adapter_config(adapter).get("peft_type")
        if peft_type not in ("LORA", "LOHA", "LOKR", "IA3"):
            raise UserError(f"a {peft_type} adapter cannot be merged into the weights; export it with mode=adapter")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def save_merged(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def recorded_sft_adapter(adapter: str) -> str | None:
    import yaml

    cfg_path = Path(adapter) / "run_config.yaml"
    if cfg_path.is_file():
        value = (yaml.safe_load(cfg_path.read_text()) or {}).get("sft_adapter")
        return value or None
    return None


def check_export_sources(cfg: ExportConfig, out: Path) -> None:
    """Every adapter read has its weights; ``out`` neither is, holds nor lies inside one (it would be lost)."""
    from rlhf.models import check_safetensors

    sources = [cfg.adapter]
    if cfg.mode == "interpolate" and cfg.sft_adapter:
        adapter_config(cfg.sft_adapter)
        sources.append(cfg.sft_adapter)
    for folder in sources:
        if not (Path(folder) / "adapter_model.safetensors").is_file():
            raise UserError(f"adapter folder {folder} has no adapter_model.safetensors")
        check_safetensors(Path(folder) / "adapter_model.safetensors")
        resolved = Path(folder).expanduser().resolve()
        if out == resolved or resolved in out.parents or out in resolved.parents:
            raise UserError(f"out {out} would replace the adapter it exports from ({folder}); choose another out")


# the stage


def export_interpolation(cfg: ExportConfig, base: str, work: Path, tokenizer) -> str:
    """Write theta = (1 - alpha) theta_SFT + alpha theta_aligned into ``work``; returns the format used."""
    import torch

    sft = cfg.sft_adapter if cfg.sft_adapter is not None else recorded_sft_adapter(cfg.adapter)
    aligned_cfg, aligned_state = adapter_config(cfg.adapter), load_adapter_state(cfg.adapter)
    terms = [(cfg.alpha, aligned_state, aligned_cfg)]
    exact = is_plain_lora(aligned_cfg, aligned_state)
    if sft:
        sft_cfg, sft_state = adapter_config(sft), load_adapter_state(sft)
        terms.insert(0, (1.0 - cfg.alpha, sft_state, sft_cfg))
        exact = exact and is_plain_lora(sft_cfg, sft_state)
    if cfg.interpolate_format == "adapter" and not exact:
        raise UserError("these adapters cannot be interpolated exactly as one LoRA adapter; use interpolate_format=merged")
    if exact and cfg.interpolate_format != "merged":
        from safetensors.torch import save_file

        try:
            state, rank = interpolate_lora(terms)
        except UserError:
            if cfg.interpolate_format == "adapter":
                raise
        else:
            new_cfg = dict(aligned_cfg, r=rank, lora_alpha=rank, use_rslora=False, base_model_name_or_path=base)
            (work / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2))
            save_file(state, str(work / "adapter_model.safetensors"))
            tokenizer.save_pretrained(work)
            return "adapter"
    sft_model = merged_model(base, sft)
    aligned = merged_model(base, cfg.adapter)
    with torch.no_grad():
        sft_params = dict(sft_model.named_parameters())
        for name, param in aligned.named_parameters():
            param.copy_((1.0 - cfg.alpha) * sft_params[name] + cfg.alpha * param)
    del sft_model
    save_merged(aligned, tokenizer, work)
    return "merged"


def run_export(cfg: ExportConfig) -> Path:
    from rlhf.lineage import collect_lineage, model_card
    from rlhf.models import load_tokenizer, tokenizer_source

    out = check_output_dir(cfg.out, "out").resolve()
    acfg = adapter_config(cfg.adapter)
    check_export_sources(cfg, out)
    base = cfg.model_name_or_path or acfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter {cfg.adapter} does not record its base model; pass --model_name_or_path")
    tokenizer = load_tokenizer(tokenizer_source(base, cfg.adapter))
    details: dict = {"mode": cfg.mode, "source_adapter": str(Path(cfg.adapter).resolve())}
    with staged_output(cfg.out, "out") as work:
        if cfg.mode == "adapter":
            for name in ADAPTER_FILES:
                shutil.copy2(Path(cfg.adapter) / name, work / name)
            cfg_out = dict(acfg, base_model_name_or_path=base)
            (work / "adapter_config.json").write_text(json.dumps(cfg_out, indent=2))
            tokenizer.save_pretrained(work)
        elif cfg.mode == "merged":
            save_merged(merged_model(base, cfg.adapter), tokenizer, work)
        else:
            details["alpha"] = cfg.alpha
            details["format"] = export_interpolation(cfg, base, work, tokenizer)
        lineage = collect_lineage(cfg.adapter)
        card = model_card(f"Aligned model ({cfg.mode})", base, lineage, details)
        (work / "README.md").write_text(card)
        write_json(work / "export.json", {**details, "base_model": base, "lineage": [s["path"] for s in lineage]})
    print(f"exported ({cfg.mode}) to {cfg.out}", file=sys.stderr)
    return Path(cfg.out)
