"""Where a trained artefact came from, read from the folders the stages write.

Every stage saves ``run_config.yaml`` and ``metrics.json`` in its output
folder; config keys that point at other stage folders (``sft_adapter``,
``reward_model``, ``adapter``, ...) are followed to build the chain from the
base model to the artefact. ``model_card`` turns that chain into a README.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlhf.data import fingerprint

LINK_KEYS = ("sft_adapter", "reward_model", "adapter", "policy", "baseline")
# metrics worth showing per stage, in order
HEADLINE = (
    "eval_loss", "train_loss", "accuracy", "eval_accuracy", "eval_mean_margin", "eval_length_correlation",
    "reward_first_steps", "reward_last_steps", "score_first_steps", "score_last_steps", "kl_last",
    "steps", "wall_time_s",
)


def read_stage(folder: str | Path) -> dict | None:
    """``{"path", "config", "metrics"}`` for a stage folder, or None when it has no run_config.yaml."""
    folder = Path(folder)
    cfg_path = folder / "run_config.yaml"
    if not cfg_path.is_file():
        return None
    config = yaml.safe_load(cfg_path.read_text()) or {}
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {"path": str(folder.resolve()), "config": config, "metrics": metrics}


def collect_lineage(folder: str | Path, _seen: set | None = None) -> list[dict]:
    """Stages behind ``folder``, earliest first (each folder once)."""
    seen = _seen if _seen is not None else set()
    stage = read_stage(folder)
    if stage is None or stage["path"] in seen:
        return []
    seen.add(stage["path"])
    chain: list[dict] = []
    for key in LINK_KEYS:
        target = stage["config"].get(key)
        if isinstance(target, str) and target and Path(target).is_dir():
            chain.extend(collect_lineage(target, seen))
    chain.append(stage)
    return chain


def stage_name(stage: dict) -> str:
    """The stage that wrote the folder, told by the keys only its config has (or a reward model's metadata file)."""
    cfg, folder = stage["config"], Path(stage["path"])
    if (folder / "reward_model.json").is_file() or "center_rewards_coefficient" in cfg:
        return "Reward model"
    if "reward_model" in cfg and "kl_coef" in cfg:
        return "PPO"
    if "beta" in cfg and "loss_type" in cfg:
        return "DPO"
    if "method" in cfg and "completion_only_loss" in cfg:
        return "SFT"
    return folder.name


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(title: str, base_model: str, lineage: list[dict], export: dict) -> str:
    """A README.md naming the base model, every stage's config and headline metrics, and the export."""
    lines = [f"# {title}", "", "Produced with the `rlhf` alignment toolkit.", "", "## Base model", "", f"`{base_model}`", ""]
    lines += ["## Export", ""] + [f"- {k}: `{_fmt(v)}`" for k, v in export.items()] + [""]
    lines += ["## Lineage", ""]
    if not lineage:
        lines += ["No stage records (run_config.yaml) were found next to the exported weights.", ""]
    for stage in lineage:
        cfg, metrics = stage["config"], stage["metrics"]
        lines += [f"### {stage_name(stage)}", "", f"- folder: `{stage['path']}`"]
        if cfg.get("dataset_name"):
            try:
                fp = fingerprint(cfg["dataset_name"])
            except OSError:
                fp = "unavailable"
            lines.append(f"- dataset: `{cfg['dataset_name']}` (fingerprint `{metrics.get('dataset_fingerprint', fp)}`)")
        shown = [(k, metrics[k]) for k in HEADLINE if k in metrics]
        lines += [f"- {k}: {_fmt(v)}" for k, v in shown]
        lines += ["", "<details><summary>config</summary>", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "", "</details>", ""]
    return "\n".join(lines)
