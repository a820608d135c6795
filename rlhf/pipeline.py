"""``rlhf pipeline``: every stage end to end from one config.

SFT -> candidates -> labeling app (started for real) -> simulated labelers
voting through the app's HTTP API -> export of preference pairs -> reward
model -> PPO (or DPO on the same pairs, ``align: dpo``) -> export -> eval. A
stage whose output already exists is skipped unless ``force`` is set, so an
interrupted pipeline continues where it stopped and a pipeline stopped after
candidate generation (``stop_after: candidates``) can continue once human
labelers have voted.

This module holds the pipeline's config and orders the stages (:mod:`rlhf.pipeline_steps`) into rounds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from rlhf.config import Literal, Optional, field, require
from rlhf.errors import ConfigError, UserError
from rlhf.outputs import write_json
from rlhf.pipeline_steps import (Step, candidates_step, dpo_step, eval_step, export_step, label_step, ppo_step,
                                 prefs_step, reward_step, set_labels_aside, sft_step)  # fmt: skip
from rlhf.pipeline_summary import print_summary, summarize

STAGE_NAMES = ("sft", "candidates", "label", "prefs", "reward", "ppo", "dpo", "export", "eval")


@dataclasses.dataclass
class PipelineConfig:
    """Options of ``rlhf pipeline``; per-stage sections take that stage's config keys."""

    work_dir: str = field("outputs/demo", "folder holding every stage's output")
    model_name_or_path: str = field("smollm2-135m-instruct", "base model for every stage")
    seed: int = field(42, "random seed for every stage")
    num_processes: int = field(
        1, "processes for the training stages (sft, reward, ppo, dpo): > 1 starts each with `accelerate launch`"
    )
    rounds: int = field(
        1, "RLHF rounds: round r >= 2 samples candidates from round r-1's aligned policy, labels them, retrains "
        "the reward model on all preferences so far and continues PPO from round r-1's adapter (in round-r/)"
    )
    reference: Literal["sft", "previous"] = field(
        "sft", "rounds >= 2: PPO's KL reference is the SFT policy, or the previous round's aligned policy"
    )
    round_selection: Literal["random", "uncertainty", "all"] = field(
        "random", "rounds >= 2: which comparisons of the new candidates are labelled: random, or those the previous "
        "round's reward model is least sure about (on the demo's labels 60 % of those were ties: "
        "bench/RESULTS.md, active vs random labeling)"
    )
    round_label_budget: Optional[int] = field(
        None, "rounds >= 2: comparisons labelled per round (null = as many as round 1 holds)"
    )
    round_candidates: dict = field(
        {}, "rounds >= 2: keys for `rlhf label candidates` that replace the candidates section's in the rounds after "
        "the first, e.g. temperature: 0.4 to sample the policy's answers as PPO samples them (bench/RESULTS.md, "
        "a second labelling round)"
    )
    force: bool = field(False, "re-run stages whose output already exists")
    align: Literal["ppo", "dpo"] = field(
        "ppo", "how the SFT policy is aligned: PPO against the reward model, or DPO on the preference pairs"
    )
    stop_after: Optional[
        Literal["sft", "candidates", "label", "prefs", "reward", "ppo", "dpo", "export", "eval"]
    ] = field(
        None, "stop after this stage (e.g. candidates, to let people label with `rlhf label serve`)"
    )
    simulated_labelers: int = field(
        3, "number of simulated labelers voting by `rule` through the app's API (0 = use the votes already in the db)"
    )
    rule: str = field("rule_score", "transparent rule the simulated labelers vote by (reward/rules.py)")
    rule_noise: float = field(0.0, "probability that a simulated labeler votes against the rule")
    rule_min_gap: float = field(0.1, "simulated labelers call a pair a tie when the rule scores differ by less")
    sft: dict = field({}, "keys for `rlhf sft`")
    candidates: dict = field({}, "keys for `rlhf label candidates`")
    prefs: dict = field({}, "keys for `rlhf label export`")
    reward: dict = field({}, "keys for `rlhf reward`")
    ppo: dict = field({}, "keys for `rlhf ppo` (align: ppo)")
    dpo: dict = field({}, "keys for `rlhf dpo` (align: dpo)")
    export: dict = field({}, "keys for `rlhf export`")
    eval: dict = field({}, "keys for `rlhf eval`")

    def __post_init__(self):
        require(self.simulated_labelers >= 0, "config key 'simulated_labelers' must be >= 0")
        require(0.0 <= self.rule_noise < 0.5, "config key 'rule_noise' must be in [0, 0.5)")
        require(self.rule_min_gap >= 0.0, "config key 'rule_min_gap' must be >= 0")
        require(self.num_processes >= 1, "config key 'num_processes' must be >= 1")
        require(self.rounds >= 1, "config key 'rounds' must be >= 1")
        require(self.rounds == 1 or self.align == "ppo", "config key 'rounds' > 1 needs align: ppo")
        require(self.round_label_budget is None or self.round_label_budget >= 1,
                "config key 'round_label_budget' must be >= 1 (or null)")
        fixed = sorted(set(self.round_candidates) & ROUND_SET_KEYS)
        require(not fixed, f"config key 'round_candidates' cannot set {', '.join(fixed)}: each round's database and "
                "policy come from the pipeline, what it labels from round_selection and round_label_budget")
        require(self.rounds == 1 or self.round_selection != "uncertainty"
                or self.round_candidate_keys().get("mode", "pairwise") == "pairwise",
                "config key 'round_selection' uncertainty scores pairs: it needs candidates mode pairwise "
                "(in the candidates and round_candidates sections)")
        other = "dpo" if self.align == "ppo" else "ppo"
        require(self.stop_after != other,
                f"config key 'stop_after' is {other}, a stage align: {self.align} does not run")
        from rlhf.evaluate import load_rule

        load_rule(self.rule)  # an unknown rule stops here, before any stage runs

    def path(self, name: str) -> Path:
        return Path(self.work_dir) / name

    def round_candidate_keys(self) -> dict:
        """The candidates keys of rounds r >= 2: the candidates section's, with round_candidates' over them."""
        return {**self.candidates, **self.round_candidates}


# candidates keys the pipeline sets for each round r >= 2 itself (round_candidates may not)
ROUND_SET_KEYS = {"db", "model_name_or_path", "adapter", "selection", "reward_model", "label_budget"}

SHARED = ("sft", "labels.db", ".sim-passwords", "launch", "summary.json")  # one for all rounds


class Round:
    """Round ``number``'s view of the pipeline config: round 1 writes into ``work_dir`` (as a 1-round
    pipeline does), round r >= 2 into ``work_dir/round-r/``; the SFT adapter and the labels database
    (so the preferences of every round so far) are shared."""

    def __init__(self, cfg: PipelineConfig, number: int):
        self.cfg, self.number = cfg, number

    def __getattr__(self, name):
        return getattr(self.cfg, name)

    def path(self, name: str) -> Path:
        if self.number == 1 or name in SHARED:
            return self.cfg.path(name)
        folder = self.cfg.path(f"round-{self.number}")
        return folder / name if name else folder

    @property
    def previous(self) -> "Round | None":
        return Round(self.cfg, self.number - 1) if self.number > 1 else None


def run_steps(steps: list[Step], force: bool, stop_after: str | None, last: bool = True) -> list[dict]:
    """Run each step unless its output exists; returns one summary row per step. Stops after the step
    named ``stop_after`` if it ran (or, in the ``last`` round, in any case)."""
    rows = []
    for step in steps:
        if step.done() and not force:
            print(f"[pipeline] {step.name}: output exists, skipped", file=sys.stderr)
            rows.append({"stage": step.name, "status": "skipped", "seconds": 0.0})
        else:
            print(f"[pipeline] {step.name} ...", file=sys.stderr)
            start = time.perf_counter()
            step.run()
            rows.append({"stage": step.name, "status": "ran", "seconds": round(time.perf_counter() - start, 1)})
        if step.name == stop_after and (last or rows[-1]["status"] == "ran"):
            break
    return rows


def check_section_datasets(cfg: PipelineConfig) -> None:
    """Every dataset a section names (``dataset_name``, ``eval_dataset_name``, ...) must exist before the first stage
    runs, not only when its stage is reached (a file inside ``work_dir`` may be an earlier stage's output)."""
    from rlhf.data import check_dataset_source

    work = Path(cfg.work_dir).expanduser().resolve()
    for section in (*STAGE_NAMES, "round_candidates"):
        for key, value in (getattr(cfg, section, None) or {}).items():
            inside = isinstance(value, str) and work in Path(value).expanduser().resolve().parents
            if key.endswith("dataset_name") and isinstance(value, str) and not inside:
                try:
                    check_dataset_source(value)
                except UserError as exc:
                    raise ConfigError(f"pipeline section '{section}': {key}: {exc}") from None


def run_pipeline(cfg: PipelineConfig) -> dict:
    from rlhf.outputs import check_output_dir

    align_step = dpo_step if cfg.align == "dpo" else ppo_step
    builders = [sft_step, candidates_step, label_step, prefs_step, reward_step, align_step, export_step, eval_step]
    rounds = [Round(cfg, r) for r in range(1, cfg.rounds + 1)]
    plans = [[build(view) for build in (builders if view.number == 1 else builders[1:])] for view in rounds]
    if getattr(cfg, "dpo" if cfg.align == "ppo" else "ppo"):  # the section align does not run is checked too
        (ppo_step if cfg.align == "dpo" else dpo_step)(cfg)
    if cfg.rounds == 1 and cfg.round_candidates:  # and round_candidates, kept for a later --rounds 2
        candidates_step(Round(cfg, 2))
    check_section_datasets(cfg)
    # every config is validated before anything runs
    check_output_dir(cfg.work_dir, "work_dir").mkdir(parents=True, exist_ok=True)
    if cfg.force:
        set_labels_aside(cfg)
    per_round = []
    for i, (view, steps) in enumerate(zip(rounds, plans)):
        if view.number > 1:
            print(f"[pipeline] round {view.number} of {cfg.rounds}", file=sys.stderr)
            view.path("").mkdir(exist_ok=True)
        # the last round that runs stop_after (sft runs in round 1 only) stops there even when it is skipped
        last = not any(step.name == cfg.stop_after for later in plans[i + 1 :] for step in later)
        rows = run_steps(steps, cfg.force, cfg.stop_after, last=last)
        per_round.append(summarize(view, rows))
        if rows and rows[-1]["stage"] == cfg.stop_after and (rows[-1]["status"] == "ran" or last):
            break
    summary = dict(per_round[-1])
    if len(per_round) > 1:  # the stage rows and their total are the last round's; every round's below them
        summary["rounds"] = [{"round": i + 1, **{k: v for k, v in r.items() if k != "plots"}}
                             for i, r in enumerate(per_round)]
        summary["all_rounds_seconds"] = round(sum(r["total_seconds"] for r in per_round), 1)
    write_json(cfg.path("summary.json"), summary)
    print_summary(summary)
    if cfg.stop_after == "candidates":
        print(f"\nCandidates are in {cfg.path('labels.db')}. Let people label with\n"
              f"  rlhf label user add NAME --role labeler --db {cfg.path('labels.db')}\n"
              f"  rlhf label serve --db {cfg.path('labels.db')}\n"
              "then continue with the same pipeline command and simulated_labelers: 0.")
    return summary
