"""Options of ``rlhf eval``: :class:`EvalConfig`.

Kept apart from :mod:`rlhf.evaluate` (torch, transformers) so that the CLI builds its parser
without importing heavy libraries.
"""

from __future__ import annotations

import dataclasses

from rlhf.config import Optional, field, require
from rlhf.generate import SamplingConfig


@dataclasses.dataclass
class EvalConfig(SamplingConfig):
    """Options of ``rlhf eval``."""

    policy: str = field("", "aligned policy: adapter folder or full model folder")
    baseline: str = field("", "baseline policy (e.g. the SFT adapter): adapter folder, model folder, or 'base'")
    reward_model: Optional[str] = field(None, "reward model folder (from rlhf reward) that scores both")
    model_name_or_path: Optional[str] = field(None, "base model for adapters (default: recorded in adapter_config.json)")
    dataset_name: str = field("sample:prompts_test", "held-out prompts")
    max_prompts: Optional[int] = field(None, "use at most this many prompts")
    rule: Optional[str] = field(None, "also judge with a transparent rule from reward.rules (e.g. the demo's rule)")
    ppo_logs: Optional[str] = field(None, "PPO logs folder (metrics.jsonl) to plot reward and KL curves from")
    out_dir: str = field("outputs/eval", "folder for eval.json and the PNG plots")
    show_samples: int = field(3, "side-by-side samples printed")
    seed: int = field(0, "sampling seed (both policies use the same)")
    do_sample: bool = field(False, "sample (true) or greedy decoding (false)")
    samples_per_prompt: int = field(1, "responses per prompt and policy (> 1 needs do_sample: more comparisons)")
    length_tolerance: float = field(
        0.2, "length-controlled win rate: only pairs whose word counts differ by less than this fraction of the "
        "longer answer, |a - b| / max(a, b) < tolerance (in (0, 1])"
    )
    alpha_sweep: Optional[list[float]] = field(
        None, "comma-separated alphas in [0, 1] (e.g. 0,0.25,0.5,0.75,1): evaluate each interpolation theta(alpha) = "
        "(1 - alpha) * baseline + alpha * policy against the baseline (policy: a LoRA adapter; baseline: 'base' or a "
        "LoRA adapter on the same base); eval.json gets a 'sweep' list, plus alpha_sweep.png (win rate against KL)"
    )

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.policy), "config key 'policy' is required")
        require(bool(self.baseline), "config key 'baseline' is required")
        require(bool(self.reward_model or self.rule), "config key 'reward_model' (or 'rule') is required")
        require(self.samples_per_prompt >= 1, "config key 'samples_per_prompt' must be >= 1")
        require(self.do_sample or self.samples_per_prompt == 1,
                "config key 'samples_per_prompt' > 1 needs do_sample: true (greedy answers would repeat)")
        require(0 < self.length_tolerance <= 1, "config key 'length_tolerance' must be in (0, 1]")
        if self.alpha_sweep is not None:
            self.alpha_sweep = checked_alphas(self.alpha_sweep)


def checked_alphas(alphas: list[float]) -> list[float]:
    """The sweep's alphas in increasing order; none, one outside [0, 1] or one given twice is a ConfigError."""
    require(bool(alphas), "config key 'alpha_sweep' lists no alpha (give e.g. 0,0.25,0.5,0.75,1)")
    for a in alphas:
        require(0.0 <= a <= 1.0, f"config key 'alpha_sweep' must hold alphas in [0, 1] (no extrapolation), got {a:g}")
        require(alphas.count(a) == 1, f"config key 'alpha_sweep' lists alpha {a:g} more than once")
    return sorted(alphas)
