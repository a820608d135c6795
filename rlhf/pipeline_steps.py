"""The stages of ``rlhf pipeline`` as steps: each builds its stage config from the pipeline config (derived paths,
then the section's keys), knows when its output exists, and runs the stage (in this process or launched on
several). Used by :mod:`rlhf.pipeline`, which orders them into rounds; with it and ``rlhf.cli`` the only place in
``rlhf`` that imports ``reward`` and ``feedback_ui``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rlhf.config import build_config, config_to_dict
from rlhf.errors import ConfigError, UserError
from rlhf.outputs import write_json
from rlhf.pipeline_summary import stage_output

if TYPE_CHECKING:
    from rlhf.pipeline import PipelineConfig

SIMULATED = "sim-labeler-"  # the simulated labelers' account names: sim-labeler-1, ...


def stage_config(cls, pipeline: PipelineConfig, section: str, derived: dict):
    """Build a stage config: derived paths and shared keys first, then the section's own keys."""
    values = dict(derived)
    values.update(getattr(pipeline, section))
    try:
        return build_config(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"pipeline section '{section}': {exc}") from None


@dataclasses.dataclass
class Step:
    name: str
    done: Callable[[], bool]
    run: Callable[[], object]


def launched(cfg: PipelineConfig, name: str, stage, run: Callable[[], object]) -> Callable[[], object]:
    """``run`` in this process, or, with ``num_processes`` > 1, ``rlhf NAME`` on that many processes started
    by ``accelerate launch`` (GPUs when there are, else gloo on CPU) with the stage's config written to
    ``work_dir/launch/NAME.yaml``."""
    if cfg.num_processes == 1:
        return run

    def run_launched():
        import socket
        import subprocess

        from rlhf.config import save_config

        config = cfg.path("launch") / f"{name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        save_config(stage, config)
        with socket.socket() as sock:  # a free port for the process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", str(cfg.num_processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(port),
               "-m", "rlhf.cli", name, "--config", str(config)]
        status = subprocess.run(cmd).returncode
        if status:
            raise UserError(f"stage {name} failed on {cfg.num_processes} processes (exit status {status}); "
                            f"its config: {config}")

    return run_launched


# the stages


def _exists(folder: Path, marker: str = "metrics.json") -> Callable[[], bool]:
    return lambda: (folder / marker).is_file()


def _training_keys(cfg: PipelineConfig, out: Path) -> dict:
    """What every training stage takes from the pipeline: its base model, seed and output folder."""
    return {"model_name_or_path": cfg.model_name_or_path, "seed": cfg.seed, "output_dir": str(out)}


def _preference_files(cfg: PipelineConfig) -> dict:
    """The exported pairs, and the pairs held out by prompt at export time when there are any."""
    files = {"dataset_name": str(cfg.path("prefs.jsonl"))}
    if prefs_options(cfg)["test_fraction"] > 0:
        files["eval_dataset_name"] = str(cfg.path("prefs.test.jsonl"))
    return files


def sft_step(cfg: PipelineConfig) -> Step:
    from rlhf.sft import SFTStageConfig, run_sft

    out = cfg.path("sft")
    stage = stage_config(SFTStageConfig, cfg, "sft", _training_keys(cfg, out))

    return Step("sft", _exists(out), launched(cfg, "sft", stage, lambda: run_sft(stage)))


def reward_step(cfg: PipelineConfig) -> Step:
    from reward.train import RewardStageConfig, run_reward

    out = cfg.path("reward")
    stage = stage_config(RewardStageConfig, cfg, "reward", {**_training_keys(cfg, out), **_preference_files(cfg)})

    return Step("reward", _exists(out), launched(cfg, "reward", stage, lambda: run_reward(stage)))


def ppo_step(cfg: PipelineConfig) -> Step:
    from rlhf.ppo.config import PPOStageConfig
    from rlhf.ppo.stage import run_ppo

    out = cfg.path("ppo")
    derived = {**_training_keys(cfg, out), "sft_adapter": str(cfg.path("sft")), "reward_model": str(cfg.path("reward")),
               "overwrite_output_dir": True}  # fmt: skip
    previous = getattr(cfg, "previous", None)
    if previous is not None:  # continue from the previous round's policy
        derived["policy_init"] = str(previous.path("ppo"))
        if cfg.reference == "previous":
            derived["sft_adapter"] = derived.pop("policy_init")
    stage = stage_config(PPOStageConfig, cfg, "ppo", derived)
    run = launched(cfg, "ppo", stage, lambda: run_ppo(stage))

    def resumed():
        """A stage stopped midway (checkpoints, no metrics.json) continues from its last checkpoint, unless forced."""
        from rlhf.ppo.checkpoint import latest_checkpoint

        if not cfg.force and latest_checkpoint(out / "checkpoints") is not None:
            stage.resume_from_checkpoint, stage.overwrite_output_dir = "latest", False
            print(f"[pipeline] ppo: continuing from the last checkpoint in {out / 'checkpoints'}", file=sys.stderr)
        return run()

    return Step("ppo", _exists(out), resumed)


def dpo_step(cfg: PipelineConfig) -> Step:
    from rlhf.dpo import DPOStageConfig, run_dpo

    out = cfg.path("dpo")
    derived = {**_training_keys(cfg, out), "sft_adapter": str(cfg.path("sft")), **_preference_files(cfg)}
    stage = stage_config(DPOStageConfig, cfg, "dpo", derived)

    return Step("dpo", _exists(out), launched(cfg, "dpo", stage, lambda: run_dpo(stage)))


def export_step(cfg: PipelineConfig) -> Step:
    from rlhf.export import ExportConfig, run_export

    out = cfg.path("export")
    derived = {"adapter": str(cfg.path(cfg.align)), "mode": "adapter", "out": str(out)}
    stage = stage_config(ExportConfig, cfg, "export", derived)
    return Step("export", _exists(out, "README.md"), lambda: run_export(stage))


def eval_step(cfg: PipelineConfig) -> Step:
    from rlhf.evaluate import EvalConfig, run_eval

    out = cfg.path("eval")
    derived = {
        "policy": str(cfg.path(cfg.align)),
        "baseline": str(cfg.path("sft")),
        "reward_model": str(cfg.path("reward")),
        "rule": cfg.rule,
        "ppo_logs": str(cfg.path("ppo") / "logs") if cfg.align == "ppo" else None,
        "out_dir": str(out),
        "seed": cfg.seed,
    }
    stage = stage_config(EvalConfig, cfg, "eval", derived)

    return Step("eval", _exists(out, "eval.json"), lambda: run_eval(stage))


def candidates_step(cfg: PipelineConfig) -> Step:
    from feedback_ui.candidates import run_label_candidates
    from feedback_ui.config import LabelCandidatesConfig

    derived = {
        "db": str(cfg.path("labels.db")),
        "model_name_or_path": cfg.model_name_or_path,
        "adapter": str(cfg.path("sft")),
        "seed": cfg.seed,
    }
    previous = getattr(cfg, "previous", None)
    section = "candidates"
    if previous is not None:  # the previous round's policy answers (new samples); its reward model picks what to label
        derived["adapter"] = str(previous.path(cfg.align))
        derived["seed"] = cfg.seed + previous.number
        if cfg.round_candidates:  # its own keys over the candidates section's
            derived, section = {**derived, **cfg.candidates}, "round_candidates"
    stage = stage_config(LabelCandidatesConfig, cfg, section, derived)

    def run():
        chosen = stage
        if previous is not None:  # round r's selection, checked as `rlhf label candidates` checks its own
            budget = None
            if cfg.round_selection != "all":
                first = stage_output(cfg.cfg.path("candidates.json"))  # round 1's
                budget = cfg.round_label_budget or first.get("comparisons", first.get("new_comparisons"))
                if not budget:
                    raise ConfigError("round_label_budget is null and round 1's candidates.json holds no comparison "
                                      "count; set round_label_budget")  # fmt: skip
            reward = str(previous.path("reward")) if cfg.round_selection == "uncertainty" else None
            try:
                chosen = dataclasses.replace(stage, selection=cfg.round_selection, reward_model=reward,
                                             label_budget=budget)  # fmt: skip
            except ConfigError as exc:
                raise ConfigError(f"round {cfg.number}: {exc}") from None
        write_json(cfg.path("candidates.json"), run_label_candidates(chosen))

    return Step("candidates", _exists(cfg.path(""), "candidates.json"), run)


def label_step(cfg: PipelineConfig) -> Step:
    """Start the labeling app on loopback and let the simulated labelers vote through its API."""

    def run():
        import secrets

        from feedback_ui.auth import add_user, get_user
        from feedback_ui.server import Server
        from feedback_ui.simulate import run_simulated_labelers
        from feedback_ui.store import open_store
        from rlhf.evaluate import load_rule

        if cfg.simulated_labelers == 0:
            print("[pipeline] label: simulated_labelers is 0, using the votes already in the database", file=sys.stderr)
            return
        store = open_store(str(cfg.path("labels.db")))
        accounts = []
        for i in range(1, cfg.simulated_labelers + 1):
            name = f"{SIMULATED}{i}"
            if get_user(store, name) is None:
                password = secrets.token_urlsafe(12)
                add_user(store, name, password, "labeler")
                (cfg.path(".sim-passwords")).mkdir(exist_ok=True)
                (cfg.path(".sim-passwords") / name).write_text(password)
            accounts.append((name, (cfg.path(".sim-passwords") / name).read_text()))
        server = Server(store).start()
        print(f"[pipeline] labeling app started on {server.url}; {len(accounts)} simulated labelers voting by rule "
              f"'{cfg.rule}'", file=sys.stderr)
        try:
            votes = run_simulated_labelers(server.url, accounts, load_rule(cfg.rule), min_gap=cfg.rule_min_gap,
                                           noise=cfg.rule_noise, seed=cfg.seed)
        finally:
            server.stop()
            store.close()  # the last connection: SQLite moves the votes from its -wal journal into labels.db
        write_json(cfg.path("label.json"), {"votes": votes, "rule": cfg.rule, "url": server.url})

    return Step("label", lambda: cfg.path("label.json").is_file(), run)


def prefs_options(cfg: PipelineConfig) -> dict:
    """Keyword arguments of ``export_preferences``: a held-out split by prompt unless configured otherwise."""
    from feedback_ui.config import LabelExportConfig

    return config_to_dict(stage_config(LabelExportConfig, cfg, "prefs", {"test_fraction": 0.15, "seed": cfg.seed}))


def prefs_step(cfg: PipelineConfig) -> Step:
    prefs_options(cfg)  # the section's keys are checked before any stage runs

    def run():
        from feedback_ui.export import export_preferences
        from feedback_ui.store import open_store

        try:
            with open_store(str(cfg.path("labels.db"))) as store:
                counts = export_preferences(store, str(cfg.path("prefs.jsonl")), **prefs_options(cfg))
        except TypeError as exc:
            raise ConfigError(f"pipeline section 'prefs': {exc}") from None
        if counts["rows"] == 0:
            raise ConfigError(
                f"no preference pairs to export from {counts['comparisons']} answered comparisons "
                "(ties and 'both bad' are left out; with none answered, nobody has voted yet: see `rlhf label serve`)"
            )
        print(f"[pipeline] exported {counts['rows']} preference pairs ({counts.get('test_rows', 0)} held out)",
              file=sys.stderr)

    return Step("prefs", lambda: cfg.path("prefs.jsonl").is_file(), run)


def set_labels_aside(cfg: PipelineConfig) -> None:
    """``force``: the labels database (candidates and votes of the earlier run) is renamed to ``labels.db.TIME.bak``,
    so that every candidate is sampled and every vote cast again under the current config; kept as it is when no
    labelling stage will run (``stop_after: sft``), when the votes are to come from people
    (``simulated_labelers: 0``) or when it holds a vote of anyone but the simulated labelers."""
    db = cfg.path("labels.db")
    if not db.exists() or cfg.stop_after == "sft":
        return
    if cfg.simulated_labelers == 0 or people_voted(db):
        print(f"[pipeline] force: {db} is kept as it is (it holds people's votes, or simulated_labelers is 0)",
              file=sys.stderr)  # fmt: skip
        return
    stamp, n = time.strftime("%Y%m%dT%H%M%S"), 0
    while db.with_name(f"{db.name}.{stamp}{'-' + str(n) if n else ''}.bak").exists():
        n += 1
    backup = f"{db.name}.{stamp}{'-' + str(n) if n else ''}.bak"
    for suffix in ("", "-wal", "-shm"):  # SQLite's journal files go with it, renamed alike
        part = db.with_name(db.name + suffix)
        if part.exists():
            part.rename(db.with_name(backup + suffix))
    print(f"[pipeline] force: the earlier labels are kept in {backup}; candidates and votes start afresh",
          file=sys.stderr)  # fmt: skip


def people_voted(db: Path) -> bool:
    """Whether any vote in the labels database ``db`` is by an account other than the simulated labelers'."""
    import sqlalchemy as sa

    from feedback_ui.store import User, Vote, open_store

    store = open_store(str(db))
    try:
        with store.read() as s:
            return bool(s.execute(sa.select(sa.func.count()).select_from(Vote).join(User, User.id == Vote.user_id)
                                  .where(~User.name.startswith(SIMULATED))).scalar())  # fmt: skip
    finally:
        store.close()
