"""``rlhf export``: ship a fine-tuned policy as an adapter, a merged model, or an interpolation.

Interpolation (WiSE-FT) is in weight space between where the fine-tuning started and where it ended:
theta = (1 - alpha) * theta_from + alpha * theta_finetuned, ``from`` being the base model or the SFT
policy. The fine-tuned side is a PEFT adapter or a full model folder. Where the result is exactly a
LoRA adapter it is written as one (see :mod:`rlhf.interpolate`); otherwise as a merged model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import Literal, Optional, field, require
from rlhf.errors import UserError
from rlhf.interpolate import is_exact_lora, lora_interpolation
from rlhf.outputs import check_not_input, check_output_dir, staged_output, write_json

if TYPE_CHECKING:  # the config below is imported by the CLI parser: torch loads only when an export runs
    import torch

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass
class ExportConfig:
    """Options of ``rlhf export``."""

    adapter: str = field(
        "", "fine-tuned PEFT adapter folder (e.g. the output_dir of rlhf ppo; a loreft or bottleneck_adapter folder "
        "with mode adapter only); interpolate also takes a full model folder"
    )
    mode: Literal["adapter", "merged", "interpolate"] = field("adapter", "what to write")
    out: str = field("outputs/export", "output folder")
    alpha: float = field(0.5, "interpolate: weight of the fine-tuned model (0 = the 'from' model, 1 = fine-tuned)")
    from_: Optional[Literal["base", "sft"]] = field(
        None, "interpolate: theta_from, the base or the SFT policy (command line --from, YAML from_; default: sft when "
        "recorded or given, else base)"
    )
    sft_adapter: Optional[str] = field(
        None, "interpolate --from sft: the SFT adapter (or full model folder) the fine-tuning started from "
        "(default: the one recorded in the adapter's run_config.yaml)"
    )
    model_name_or_path: Optional[str] = field(
        None, "base model (default: the one recorded in adapter_config.json, or a full model's run_config.yaml)"
    )
    interpolate_format: Literal["auto", "adapter", "merged"] = field(
        "auto", "interpolate: write an adapter when exact (auto), or force one format"
    )

    def __post_init__(self):
        require(bool(self.adapter), "config key 'adapter' is required")
        require(0.0 <= self.alpha <= 1.0, "config key 'alpha' must be in [0, 1]")
        require(
            self.mode == "interpolate" or self.from_ is None,
            "config key 'from_' (--from) is used only with mode interpolate",
        )
        require(
            not (self.from_ == "base" and self.sft_adapter),
            "config key 'sft_adapter' contradicts --from base (an SFT start is used only with --from sft)",
        )


# helper functions


def adapter_config(folder: str | Path, hooked: bool = False) -> dict:
    """The config of a PEFT adapter folder (or, with ``hooked``, of a LoReFT / bottleneck adapter folder)."""
    from rlhf.models import check_causal_lm_adapter, hooked_adapter_type, read_adapter_config

    kind = hooked_adapter_type(folder)
    if kind is not None and not hooked:
        raise UserError(f"{folder} is a {kind.method} adapter (modules hooked on the base): it cannot be merged "
                        "into the weights or interpolated; export it with --mode adapter, or train LoRA to merge")
    if kind is None and not (Path(folder) / "adapter_config.json").is_file():
        raise UserError(f"adapter folder {folder} has no adapter_config.json (export takes PEFT adapters)")
    config = read_adapter_config(folder)
    check_causal_lm_adapter(folder, config)
    return config


def adapter_files(folder: str | Path) -> tuple[str, str]:
    """(config file, weights file) of a PEFT or hooked adapter folder."""
    from rlhf.models import hooked_adapter_type

    kind = hooked_adapter_type(folder)
    return (kind.config_file, kind.weights_file) if kind else ADAPTER_FILES


def load_adapter_state(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"adapter folder {folder} has no adapter_model.safetensors")
    return load_file(str(path))


def merged_model(base: str, adapter: str | None):
    """Base weights with ``adapter`` folded in (or the plain base)."""
    import torch

    from rlhf.models import load_base_model, load_peft_adapter

    model = load_base_model(base, dtype=torch.float32, device=torch.device("cpu"))
    if adapter:
        config = adapter_config(adapter)
        if config.get("peft_type") not in ("LORA", "LOHA", "LOKR", "IA3"):
            raise UserError(f"a {config.get('peft_type')} adapter cannot be merged into the weights; export it with "
                            "mode=adapter")  # fmt: skip
        if adapts_embeddings(model, config):
            untie_embeddings(model)
        model = load_peft_adapter(model, adapter).merge_and_unload()
    return model.eval()


def adapts_embeddings(model, config: dict) -> bool:
    """Whether an adapter config names the input embeddings or the output projection (a target or a module it
    saves whole); "all-linear" leaves the output projection out."""
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    names = {path.rsplit(".", 1)[-1] for path, module in model.named_modules() if module in embeddings}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression: it may match them (untying then costs only memory)
        return targets != "all-linear"
    return any(str(t).rsplit(".", 1)[-1] in names for t in [*targets, *(config.get("modules_to_save") or [])])


def shares_embeddings(model) -> bool:
    """Whether the output projection and the input embeddings are one weight."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie_embeddings(model) -> None:
    """Give the output projection its own copy of a weight it shares with the input embeddings, so that merging
    an adapter into one leaves the other as it was (and the saved model keeps both)."""
    import torch

    if shares_embeddings(model):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        out.weight = torch.nn.Parameter(inp.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config()
        if text is not model.config:
            text.tie_word_embeddings = False


def save_merged(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def run_config_of(folder: str | Path) -> dict | None:
    """The ``run_config.yaml`` a stage wrote into ``folder`` (None when there is none)."""
    import yaml

    cfg_path = Path(folder) / "run_config.yaml"
    if not cfg_path.is_file():
        return None
    data = yaml.safe_load(cfg_path.read_text())
    return data if isinstance(data, dict) else {}


def is_full_model(folder: str | Path) -> bool:
    """A full model folder (``config.json``, no adapter config)."""
    from rlhf.models import ADAPTER_CONFIGS

    folder = Path(folder)
    return (folder / "config.json").is_file() and not any((folder / n).is_file() for n in ADAPTER_CONFIGS)


def interpolation_start(cfg: ExportConfig, tuned_base: str | None) -> str | None:
    """The ``from`` side of an interpolation: None for the base model, else the SFT folder, checked.

    An SFT folder must be where ``cfg.adapter`` started: the one its run_config.yaml records (or a
    copy of it), an adapter of the same base model, and not given for a run that started from the base.
    """
    from rlhf.interpolate import same_folder, same_model_name

    record = run_config_of(cfg.adapter)
    recorded = (record or {}).get("sft_adapter") or None
    start = cfg.from_ or ("sft" if cfg.sft_adapter or recorded else "base")
    if start == "base":
        return None
    sft = cfg.sft_adapter or recorded
    if not sft:
        raise UserError(f"--from sft: {cfg.adapter} records no SFT start (no sft_adapter in its run_config.yaml); "
                        "pass --sft_adapter DIR or use --from base")  # fmt: skip
    if not Path(sft).expanduser().is_dir():
        raise UserError(f"--from sft: sft_adapter folder not found: {sft}")
    if record is not None and "sft_adapter" in record and not recorded:
        raise UserError(f"--from sft: {cfg.adapter} was trained from the base model, not from {sft} "
                        "(its run_config.yaml records no sft_adapter); use --from base")  # fmt: skip
    if recorded and cfg.sft_adapter and Path(recorded).expanduser().is_dir() and not same_folder(recorded, sft):
        raise UserError(f"--from sft: {sft} is not where {cfg.adapter} started (its run_config.yaml records "
                        f"sft_adapter {recorded})")  # fmt: skip
    if not is_full_model(sft):
        sft_base = adapter_config(sft).get("base_model_name_or_path")
        if sft_base and tuned_base and not same_model_name(sft_base, tuned_base):
            raise UserError(f"--from sft: {sft} adapts {sft_base}, but {cfg.adapter} adapts {tuned_base}: "
                            "it is not where the fine-tuning started")  # fmt: skip
    return sft


def check_export_sources(folders: list[str], out: Path) -> None:
    """Every folder read has sound weights; ``out`` neither is, holds nor lies inside one (it would be lost)."""
    from rlhf.models import check_safetensors

    for folder in folders:
        if is_full_model(folder):
            weights = [Path(folder) / "model.safetensors"]
            weights = [w for w in weights if w.is_file()]
        else:
            weights = [Path(folder) / adapter_files(folder)[1]]
            if not weights[0].is_file():
                raise UserError(f"adapter folder {folder} has no {weights[0].name}")
        for w in weights:
            check_safetensors(w)
        resolved = Path(folder).expanduser().resolve()
        if out == resolved or resolved in out.parents or out in resolved.parents:
            kind = "model" if is_full_model(folder) else "adapter"
            raise UserError(f"out {out} would replace the {kind} it exports from ({folder}); choose another out")


def load_endpoint(base: str | None, folder: str | None):
    """The full weights of one side of an interpolation: a full model folder, base + adapter, or the base."""
    import torch

    from rlhf.models import load_base_model

    if folder and is_full_model(folder):
        return load_base_model(folder, dtype=torch.float32, device=torch.device("cpu")).eval()
    base = base or (adapter_config(folder).get("base_model_name_or_path") if folder else None)
    if not base:
        raise UserError(f"the base model of {folder} is not recorded; pass --model_name_or_path")
    return merged_model(base, folder)


# the stage


def export_interpolation(cfg: ExportConfig, base: str | None, start: str | None, work: Path, tokenizer) -> str:
    """Write theta = (1 - alpha) theta_start + alpha theta_tuned into ``work``; returns the format used.

    ``start``: None (the base model ``base``) or the SFT folder. LoRA adapters are written as a LoRA
    when exact: from the base, the adapter with its B matrices scaled by alpha; from an SFT LoRA, both
    low-rank products concatenated. Otherwise the two full weight sets are mixed tensor by tensor.
    """
    from rlhf.interpolate import mix_parameters

    exact, tuned, sft = False, None, None
    if not is_full_model(cfg.adapter) and (start is None or not is_full_model(start)):
        tuned = adapter_config(cfg.adapter), load_adapter_state(cfg.adapter)
        sft = None if start is None else (adapter_config(start), load_adapter_state(start))
        exact = is_exact_lora(tuned, sft)
    if cfg.interpolate_format == "adapter" and not exact:
        raise UserError("this interpolation is not exactly one LoRA adapter; use interpolate_format=merged")
    if exact and cfg.interpolate_format != "merged":
        from safetensors.torch import save_file

        try:
            new_cfg, state = lora_interpolation(cfg.alpha, tuned, sft)  # UserError when targets or ranks differ
        except UserError as exc:
            if cfg.interpolate_format == "adapter":
                raise UserError(f"{exc}; use interpolate_format=merged") from None
        else:
            new_cfg = dict(new_cfg, base_model_name_or_path=base)
            (work / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2))
            save_file({k: v.contiguous() for k, v in state.items()}, str(work / "adapter_model.safetensors"))
            tokenizer.save_pretrained(work)
            return "adapter"
    start_model = load_endpoint(base, start)
    tuned_model = load_endpoint(base, cfg.adapter)
    if shares_embeddings(start_model) != shares_embeddings(tuned_model):  # one side was untied to merge its adapter
        untie_embeddings(start_model)
        untie_embeddings(tuned_model)
    mix_parameters(tuned_model, start_model, cfg.alpha, (cfg.adapter, start or str(base)))
    del start_model
    save_merged(tuned_model, tokenizer, work)
    return "merged"


def run_export(cfg: ExportConfig) -> Path:
    from rlhf.lineage import collect_lineage, model_card
    from rlhf.models import load_tokenizer, resolve_model_path, tokenizer_source

    out = check_output_dir(cfg.out, "out").resolve()
    full = cfg.mode == "interpolate" and is_full_model(cfg.adapter)
    if full:
        base = cfg.model_name_or_path or (run_config_of(cfg.adapter) or {}).get("model_name_or_path")
    else:
        if is_full_model(cfg.adapter):
            raise UserError(f"{cfg.adapter} is a full model folder: only --mode interpolate takes one")
        acfg = adapter_config(cfg.adapter, hooked=cfg.mode == "adapter")
        base = cfg.model_name_or_path or acfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"adapter {cfg.adapter} does not record its base model; pass --model_name_or_path")
    start = interpolation_start(cfg, None if full else base) if cfg.mode == "interpolate" else None
    check_export_sources([cfg.adapter] + ([start] if start else []), out)
    check_not_input(out, {"model_name_or_path": base}, "out")  # a local base model folder is read, never replaced
    if cfg.mode == "interpolate" and start is None:
        if not base:
            raise UserError(f"--from base: {cfg.adapter} does not record its base model; pass --model_name_or_path")
        resolve_model_path(base)  # a missing base folder is an error before anything is written
    tokenizer = load_tokenizer(tokenizer_source(base or cfg.adapter, cfg.adapter))
    details: dict = {"mode": cfg.mode, "source_adapter": str(Path(cfg.adapter).resolve())}
    with staged_output(cfg.out, "out") as work:
        if cfg.mode == "adapter":
            config_file, weights_file = adapter_files(cfg.adapter)
            shutil.copy2(Path(cfg.adapter) / weights_file, work / weights_file)
            cfg_out = dict(acfg, base_model_name_or_path=base)
            (work / config_file).write_text(json.dumps(cfg_out, indent=2))
            tokenizer.save_pretrained(work)
        elif cfg.mode == "merged":
            save_merged(merged_model(base, cfg.adapter), tokenizer, work)
        else:
            details["alpha"] = cfg.alpha
            details["from"] = "sft" if start else "base"
            details["from_path"] = str(Path(start).resolve()) if start else base
            details["format"] = export_interpolation(cfg, base, start, work, tokenizer)
        lineage = collect_lineage(cfg.adapter)
        card = model_card(f"Aligned model ({cfg.mode})", base or cfg.adapter, lineage, details)
        (work / "README.md").write_text(card)
        write_json(work / "export.json", {**details, "base_model": base, "lineage": [s["path"] for s in lineage]})
    print(f"exported ({cfg.mode}) to {cfg.out}", file=sys.stderr)
    return Path(cfg.out)
