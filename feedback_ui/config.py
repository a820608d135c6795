"""Config dataclasses of the labeling stages (see ``rlhf.config`` for YAML + overrides)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from rlhf.config import field, require

MAX_RANK = 8  # responses in one ranking task (the app's ranking slots)


@dataclasses.dataclass
class LabelCandidatesConfig:
    """``rlhf label candidates``: K responses per prompt from a policy, then comparisons."""

    db: str = field("label.db", "database: a file path or sqlite:///FILE (SQLite, WAL) or postgresql://...")
    model_name_or_path: str = field(
        "smollm2-135m-instruct", "policy base model: HF folder, hub id, or the alias smollm2-135m-instruct"
    )
    adapter: Optional[str] = field(
        None, "optional adapter folder on top of the base model (LoRA/PEFT, LoReFT or bottleneck)"
    )
    dataset_name: str = field("sample:prompts", "prompts: a file/folder with a 'prompt' column (string or messages)")
    max_prompts: Optional[int] = field(None, "use only the first N prompts (null = all)")
    num_candidates: int = field(2, "K responses generated per prompt (K >= 2; ranking mode needs K >= 3)")
    max_new_tokens: int = field(64, "new tokens per response")
    temperature: float = field(0.8, "sampling temperature")
    top_p: float = field(1.0, "nucleus sampling probability mass")
    batch_size: int = field(8, "prompts per generation batch")
    seed: int = field(42, "random seed for sampling")
    mode: Literal["pairwise", "ranking"] = field(
        "pairwise", "pairwise: every pair of a prompt's K responses; ranking: one K-wise comparison per prompt"
    )
    overlap: int = field(1, "labelers who see each comparison (>= 2 gives agreement numbers)")
    gold_file: Optional[str] = field(None, "JSONL of hidden gold items with known answers (prompt, chosen, rejected)")
    gold_rate: float = field(0.0, "share of tasks drawn from gold items, in [0, 1); stored in the database")
    selection: Literal["all", "random", "uncertainty"] = field(
        "all", "comparisons created: all; random: label_budget of them at random (seeded); uncertainty: the "
        "label_budget the reward model is least sure about (an ensemble: where its members disagree most)"
    )
    label_budget: Optional[int] = field(
        None, "selection random|uncertainty: comparisons of this policy on these prompts (a re-run tops up to it)"
    )
    reward_model: Optional[str] = field(None, "selection uncertainty: reward model folder written by rlhf reward")

    def __post_init__(self):
        require(bool(self.db), "config key 'db' must not be empty")
        require(self.num_candidates >= 2, "config key 'num_candidates' must be >= 2")
        require(
            self.mode != "ranking" or 3 <= self.num_candidates <= MAX_RANK,
            f"config key 'num_candidates' must be between 3 and {MAX_RANK} (the app's ranking slots) when mode is "
            "'ranking'",
        )
        require(self.max_prompts is None or self.max_prompts >= 1, "config key 'max_prompts' must be >= 1 or null")
        require(self.max_new_tokens >= 1, "config key 'max_new_tokens' must be >= 1")
        require(self.temperature > 0, "config key 'temperature' must be > 0")
        require(0 < self.top_p <= 1, "config key 'top_p' must be in (0, 1]")
        require(self.batch_size >= 1, "config key 'batch_size' must be >= 1")
        require(self.overlap >= 1, "config key 'overlap' must be >= 1")
        require(0 <= self.gold_rate < 1, "config key 'gold_rate' must be in [0, 1)")
        require(self.label_budget is None or self.label_budget >= 1, "config key 'label_budget' must be >= 1")
        require(
            self.selection == "all" or self.label_budget is not None,
            f"selection '{self.selection}' needs config key 'label_budget'",
        )
        require(
            self.selection != "all" or self.label_budget is None,
            "config key 'label_budget' needs selection random or uncertainty",
        )
        require(
            self.selection != "uncertainty" or bool(self.reward_model),
            "selection 'uncertainty' needs config key 'reward_model' (a folder written by rlhf reward)",
        )
        require(
            self.selection == "uncertainty" or not self.reward_model,
            "config key 'reward_model' is used only with selection uncertainty",
        )
        require(
            self.selection != "uncertainty" or self.mode == "pairwise",
            "selection 'uncertainty' scores pairs: it needs mode pairwise",
        )


@dataclasses.dataclass
class LabelExportConfig:
    """Options of ``rlhf label export`` besides ``--db`` and ``--out`` (the pipeline's ``prefs`` section)."""

    strategy: Literal["all-pairs", "best-vs-rest"] = field(
        "all-pairs", "rankings -> pairs: every ordered pair, or the best against each of the rest"
    )
    aggregate: Literal["majority", "all"] = field(
        "majority", "several labelers on one comparison: strict-majority pairs, or every vote"
    )
    keep: list[str] = field([], "extra outcomes exported, each twice (once each way round, margin 0): tie, both_bad")
    test_fraction: float = field(0.0, "share of prompts held out (split by prompt, never by row), in [0, 1)")
    seed: int = field(0, "seed of the prompt split")
    margin_slightly: float = field(1.0, "margin of 'slightly better'")
    margin_much: float = field(3.0, "margin of 'much better'")

    def __post_init__(self):
        unknown = sorted(set(self.keep) - {"tie", "both_bad"})
        require(not unknown, f"config key 'keep' takes tie and/or both_bad, got {', '.join(unknown)}")
        require(0 <= self.test_fraction < 1, "config key 'test_fraction' must be in [0, 1)")
        for name in ("margin_slightly", "margin_much"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"config key '{name}' must be a finite number >= 0")
