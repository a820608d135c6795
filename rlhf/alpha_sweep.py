"""The models and the plot of ``rlhf eval --alpha_sweep``.

theta(alpha) = (1 - alpha) * theta_baseline + alpha * theta_policy, the policy a LoRA adapter and the
baseline the base model ('base') or a LoRA adapter on the same base. Each theta(alpha) is the LoRA
adapter :func:`rlhf.interpolate.lora_interpolation` builds (exact, and the same one ``rlhf export
--mode interpolate`` writes), loaded into one base model that holds the baseline too, so the base
weights load once for the whole sweep. The sweep itself (sampling, KL, judges) is
:func:`rlhf.evaluate.run_alpha_sweep`, the same code path as a plain ``rlhf eval``.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.errors import UserError
from rlhf.interpolate import lora_interpolation, same_folder, same_model_name

if TYPE_CHECKING:
    import torch

SWEEP = "sweep"  # name of the adapter that holds theta(alpha)
JUDGE_COLOURS = {"reward_model": "#4c72b0", "rule": "#55a868"}  # as in win_rate.png


# pure math


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (cost, gain) points are Pareto-optimal: no other point has cost <= and gain >=, one strictly.

    Here cost = KL to the baseline and gain = win rate: the points a user picks from. Equal points are
    both on the front.
    """
    return [
        not any(c2 <= c and g2 >= g and (c2, g2) != (c, g) for c2, g2 in points)
        for c, g in points
    ]


# the two ends of the sweep


@dataclasses.dataclass
class SweepEnds:
    """What the sweep interpolates between, read and checked before any model loads."""

    base: str  # the base model both ends adapt
    policy: tuple[dict, dict[str, torch.Tensor]]  # (adapter config, state dict) of the LoRA policy
    baseline: str | None  # the baseline's LoRA adapter folder; None for the base model
    start: tuple[dict, dict[str, torch.Tensor]] | None  # (config, state) of that adapter

    @property
    def start_kind(self) -> str:
        return "base" if self.baseline is None else "sft"


def _lora_adapter(folder: str, role: str) -> dict:
    """The adapter config of a LoRA adapter folder; anything else is a UserError naming ``role``."""
    from rlhf.export import is_full_model
    from rlhf.models import check_adapter, hooked_adapter_type, read_adapter_config

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"--alpha_sweep: the {role} folder {folder} is not found")
    if is_full_model(path):
        kind = "a full model folder"
    elif hooked_adapter_type(path) is not None:
        kind = f"a {hooked_adapter_type(path).method} adapter"
    elif (path / "adapter_config.json").is_file():
        check_adapter(folder)
        cfg = read_adapter_config(folder)
        if cfg.get("peft_type") == "LORA":
            return cfg
        kind = f"a PEFT {cfg.get('peft_type')} adapter"
    else:
        raise UserError(f"--alpha_sweep: the {role} {folder} is neither an adapter folder nor a model folder")
    raise UserError(f"--alpha_sweep interpolates LoRA adapters, but the {role} {folder} is {kind}; write single "
                    "points with rlhf export --mode interpolate and evaluate each")  # fmt: skip


def sweep_ends(policy: str, baseline: str, base_override: str | None) -> SweepEnds:
    """Check that theta(alpha) is one LoRA between ``baseline`` ('base' or an adapter) and ``policy``.

    UserError (one line) for a policy that is not a LoRA adapter, a baseline that is neither 'base' nor
    a LoRA adapter, adapters of different base models, or a pair whose interpolation is not one LoRA
    (different target modules, DoRA, per-module ranks from an SFT start).
    """
    from rlhf.export import load_adapter_state, run_config_of

    policy_cfg = _lora_adapter(policy, "policy")
    base = base_override or policy_cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"the base model of {policy} is not recorded; pass --model_name_or_path")
    tuned = (policy_cfg, load_adapter_state(policy))
    start = None
    if baseline != "base":
        start_cfg = _lora_adapter(baseline, "baseline")
        start_base = start_cfg.get("base_model_name_or_path")
        if not base_override and start_base and not same_model_name(start_base, base):
            raise UserError(f"--alpha_sweep: the baseline {baseline} adapts {start_base} but the policy {policy} "
                            f"adapts {base}; both ends must adapt one base model")  # fmt: skip
        start = (start_cfg, load_adapter_state(baseline))
    try:
        lora_interpolation(0.0, tuned, start)  # the config and checks do not depend on alpha
    except UserError as exc:
        raise UserError(f"--alpha_sweep: {policy} and {'the base model' if start is None else baseline}: {exc}; "
                        "write single points with rlhf export --mode interpolate and evaluate each") from None
    recorded = (run_config_of(policy) or {}).get("sft_adapter")
    if start is not None and recorded and Path(recorded).expanduser().is_dir() and not same_folder(recorded, baseline):
        print(f"note: {policy} started from {recorded} (its run_config.yaml), not from the baseline {baseline}; "
              "the sweep interpolates between the two given adapters", file=sys.stderr)  # fmt: skip
    return SweepEnds(base=base, policy=tuned, baseline=None if baseline == "base" else baseline, start=start)


class SweepModel:
    """One base model holding the baseline and theta(alpha): ``baseline()`` and ``at(alpha)`` give it, switched.

    The baseline is the base with every adapter disabled, or its LoRA adapter ("default"); theta(alpha)
    is the adapter "sweep", whose weights :meth:`at` replaces by those of
    :func:`~rlhf.interpolate.lora_interpolation` for each alpha.
    """

    def __init__(self, ends: SweepEnds, device: torch.device):
        import torch
        from peft import LoraConfig, PeftModel

        from rlhf.models import load_model

        self.ends = ends
        model = load_model(ends.base, ends.baseline, dtype=torch.float32, device=device)
        cfg, _ = lora_interpolation(0.0, ends.policy, ends.start)
        known = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"peft_type", "inference_mode"}
        config = LoraConfig(**{k: v for k, v in cfg.items() if k in known}, inference_mode=True)
        if ends.baseline is None:
            model = PeftModel(model, config, adapter_name=SWEEP)
        else:
            model.add_adapter(SWEEP, config)
        self.model = model.eval()

    @contextmanager
    def baseline(self):
        """The model as the baseline (inside the block)."""
        if self.ends.baseline is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter("default")
            yield self.model

    @contextmanager
    def at(self, alpha: float):
        """The model as theta(alpha) (inside the block)."""
        from peft import set_peft_model_state_dict

        _, state = lora_interpolation(alpha, self.ends.policy, self.ends.start)
        loaded = set_peft_model_state_dict(self.model, state, adapter_name=SWEEP)
        if loaded.unexpected_keys:
            raise RuntimeError(f"interpolated weights with no place in the model: {loaded.unexpected_keys[:3]}")
        self.model.set_adapter(SWEEP)
        self.model.eval()
        yield self.model


# plot


def plot_alpha_sweep(points: list[dict], path: Path) -> str:
    """Win rate (95% Wilson CI) against KL to the baseline, one series per judge, each point labelled by alpha.

    ``points``: the ``sweep`` entries of eval.json (``alpha``, ``kl_policy_to_baseline`` and a win-rate
    block per judge, with its ``pareto`` flag): points on the Pareto front are filled, the others hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = [j for j in JUDGE_COLOURS if j in points[0]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    kls = [p["kl_policy_to_baseline"] for p in points]
    for judge in judges:
        colour = JUDGE_COLOURS[judge]
        rates = [p[judge]["win_rate"] for p in points]
        errs = [[r - p[judge]["ci_low"] for r, p in zip(rates, points)],
                [p[judge]["ci_high"] - r for r, p in zip(rates, points)]]  # fmt: skip
        ax.errorbar(kls, rates, yerr=errs, color=colour, capsize=4, linewidth=1, label=judge)
        for kl, rate, p in zip(kls, rates, points):
            face = colour if p[judge].get("pareto") else "white"
            ax.plot([kl], [rate], "o", color=colour, markerfacecolor=face, markersize=7, zorder=3)
            ax.annotate(f"α={p['alpha']:g}", (kl, rate), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("KL(θ(α) || baseline) per response")
    ax.set_ylabel("win rate vs baseline")
    ax.set_title("α sweep: win rate (95% Wilson CI) against KL\nfilled: Pareto front", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
