"""The whole pipeline on a tiny model: SFT -> candidates -> app + simulated labelers -> prefs -> RM -> PPO -> export -> eval."""

import json
import re
import shutil

import pytest
import sqlalchemy as sa
import yaml

from feedback_ui.config import LabelCandidatesConfig
from rlhf.cli import main
from rlhf.testing import write_jsonl


@pytest.fixture
def pipeline_yaml(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me fact number {i}."} for i in range(12)])
    cfg = {
        "work_dir": str(tmp_path / "run"),
        "model_name_or_path": tiny_model_dir,
        "simulated_labelers": 2,
        "rule": "rule_score",
        "rule_min_gap": 0.0,  # a random tiny model writes gibberish: its rule scores are close
        "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "report_to": "none", "lora_r": 4},
        "candidates": {"dataset_name": str(prompts), "num_candidates": 3, "max_new_tokens": 12, "overlap": 2},
        "prefs": {"test_fraction": 0.25},
        "reward": {"max_steps": 3, "per_device_train_batch_size": 4, "lora_r": 4, "report_to": "none"},
        "ppo": {"dataset_name": str(prompts), "max_steps": 2, "rollout_batch_size": 4, "max_new_tokens": 8,
                "lora_r": 4, "report_to": "none", "save_steps": 1, "progress": False},
        "eval": {"dataset_name": str(prompts), "max_prompts": 4, "max_new_tokens": 8},
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_end_to_end_then_skips(pipeline_yaml, tmp_path, capsys):
    cfg = yaml.safe_load(pipeline_yaml.read_text())  # round_candidates: for round 2 only (checked below)
    pipeline_yaml.write_text(yaml.safe_dump({**cfg, "round_candidates": {"temperature": 0.5}}))
    assert main(["pipeline", "--config", str(pipeline_yaml)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["sft", "candidates", "label", "prefs", "reward", "ppo", "export", "eval"]
    assert all(r["status"] == "ran" for r in summary["stages"])
    # the simulated labelers voted through the app: every comparison got 2 votes (overlap 2)
    engine = sa.create_engine(f"sqlite:///{run / 'labels.db'}")
    with engine.connect() as conn:
        n_votes = conn.execute(sa.text("select count(*) from votes")).scalar()
        n_comparisons = conn.execute(sa.text("select count(*) from comparisons")).scalar()
        voters = {r[0] for r in conn.execute(sa.text("select u.name from votes v join users u on u.id = v.user_id"))}
    assert n_comparisons == 12 * 3 and n_votes == 2 * n_comparisons  # C(3, 2) pairs per prompt
    assert voters == {"sim-labeler-1", "sim-labeler-2"}
    engine.dispose()
    wal = run / "labels.db-wal"  # every connection closed: the votes are in labels.db itself (a copy of it has them)
    assert not wal.exists() or wal.stat().st_size == 0
    label = json.loads((run / "label.json").read_text())
    assert sum(label["votes"].values()) == n_votes
    assert (run / "prefs.jsonl").read_text() and (run / "prefs.test.jsonl").is_file()
    assert (run / "export" / "adapter_config.json").is_file() and (run / "export" / "README.md").is_file()
    assert summary["rm_heldout_accuracy"] is not None and summary["win_rate_vs_sft_rule"] is not None
    assert (run / "eval" / "win_rate.png").is_file()
    out = capsys.readouterr().out
    assert "win rate vs SFT under the RM" in out
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert summary["answers_unchanged"] == ev["unchanged"] and summary["answers_judged"] == len(ev["samples"])
    assert re.search(rf"answers word for word SFT's +{ev['unchanged']} of {len(ev['samples'])}\n", out)

    # a second run skips every finished stage
    assert main(["pipeline", "--config", str(pipeline_yaml)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert all(r["status"] == "skipped" for r in again["stages"])

    # a PPO stage stopped after its step-1 checkpoint continues from it, not from the start
    shutil.rmtree(run / "ppo" / "checkpoints" / "step-000002")
    (run / "ppo" / "metrics.json").unlink()
    capsys.readouterr()
    assert main(["pipeline", "--config", str(pipeline_yaml), "--stop_after", "ppo"]) == 0
    assert "resumed from" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run / "ppo" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (run / "ppo" / "metrics.json").is_file()

    # a second round on top: round 1's policy answers (sampled as round_candidates says), its RM picks 10
    # comparisons, PPO continues from round 1
    args = ["pipeline", "--config", str(pipeline_yaml), "--rounds", "2", "--round_label_budget", "10",
            "--round_selection", "uncertainty"]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["status"] == "skipped" for r in summary["rounds"][0]["stages"])
    assert [r["stage"] for r in summary["rounds"][1]["stages"]] == [
        "candidates", "label", "prefs", "reward", "ppo", "export", "eval"]
    assert all(r["status"] == "ran" for r in summary["rounds"][1]["stages"])
    round2 = run / "round-2"
    candidates = json.loads((round2 / "candidates.json").read_text())
    assert str(run / "ppo") in candidates["policy"] and candidates["new_comparisons"] == 10
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from comparisons")).scalar() == n_comparisons + 10
        rows = conn.execute(sa.text("select policy, settings from responses where source = 'policy'")).all()

    def sampled(adapter, key):
        return {json.loads(settings)[key] for policy, settings in rows if policy.endswith(str(run / adapter))}

    # round 2's answers: round_candidates' temperature, the rest of the candidates section; round 1's as before
    assert sampled("ppo", "temperature") == {0.5}
    assert sampled("sft", "temperature") == {LabelCandidatesConfig.temperature}
    assert sampled("ppo", "max_new_tokens") == sampled("sft", "max_new_tokens") == {cfg["candidates"]["max_new_tokens"]}
    ppo_config = yaml.safe_load((round2 / "ppo" / "run_config.yaml").read_text())
    assert ppo_config["policy_init"] == str(run / "ppo") and ppo_config["sft_adapter"] == str(run / "sft")
    first, second = (len((d / "prefs.jsonl").read_text().splitlines()) for d in (run, round2))
    assert second > first  # the reward model of round 2 trains on both rounds' preferences
    assert summary["aligned_adapter"] == str(round2 / "export")
    assert "round  RM held-out acc" in capsys.readouterr().out
    assert main(args) == 0  # and an interrupted or finished run continues where it stopped
    again = json.loads((run / "summary.json").read_text())
    assert all(r["status"] == "skipped" for rnd in again["rounds"] for r in rnd["stages"])


def test_force_samples_and_votes_afresh_and_a_later_round_labels_as_many_as_round_one(pipeline_yaml, tmp_path):
    run = tmp_path / "run"
    assert main(["pipeline", "--config", str(pipeline_yaml), "--stop_after", "label"]) == 0
    first = json.loads((run / "candidates.json").read_text())
    assert first["comparisons"] == first["new_comparisons"] == 12 * 3
    # force: the earlier labels are set aside, every candidate is sampled and every vote cast again
    assert main(["pipeline", "--config", str(pipeline_yaml), "--stop_after", "label", "--force", "true"]) == 0
    assert len(list(run.glob("labels.db.*.bak"))) == 1
    again = json.loads((run / "candidates.json").read_text())
    assert again["responses_sampled"] == 12 * 3 and again["comparisons"] == 12 * 3
    assert sum(json.loads((run / "label.json").read_text())["votes"].values()) == 2 * 12 * 3
    # stop_after sft stops in round 1 even when its sft is skipped (later rounds have no sft stage); forced, it
    # leaves the labels alone (no labelling stage runs)
    assert main(["pipeline", "--config", str(pipeline_yaml), "--rounds", "2", "--stop_after", "sft"]) == 0
    assert not (run / "round-2").exists()
    assert main(["pipeline", "--config", str(pipeline_yaml), "--stop_after", "sft", "--force", "true"]) == 0
    assert len(list(run.glob("labels.db.*.bak"))) == 1
    # votes of people are never set aside
    engine = sa.create_engine(f"sqlite:///{run / 'labels.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("update users set name = 'alice' where name = 'sim-labeler-1'"))
    engine.dispose()
    assert main(["pipeline", "--config", str(pipeline_yaml), "--stop_after", "candidates", "--force", "true"]) == 0
    assert len(list(run.glob("labels.db.*.bak"))) == 1


@pytest.mark.parametrize("section", ["candidates", "round_candidates"])
def test_round_selection_by_uncertainty_needs_pairwise_candidates(pipeline_yaml, tmp_path, capsys, section):
    cfg = yaml.safe_load(pipeline_yaml.read_text())
    cfg[section] = {**cfg.get(section, {}), "mode": "ranking"}
    pipeline_yaml.write_text(yaml.safe_dump(cfg))
    argv = ["pipeline", "--config", str(pipeline_yaml), "--rounds", "2", "--round_selection", "uncertainty"]
    assert main(argv) == 2
    assert "'round_selection' uncertainty scores pairs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_round_candidates_are_checked_before_anything_runs(pipeline_yaml, tmp_path, capsys):
    cfg = yaml.safe_load(pipeline_yaml.read_text())
    pipeline_yaml.write_text(yaml.safe_dump({**cfg, "round_candidates": {"dataset_name": str(tmp_path / "no.jsonl")}}))
    assert main(["pipeline", "--config", str(pipeline_yaml), "--rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert "pipeline section 'round_candidates': dataset_name" in err and "no.jsonl" in err
    for rounds in ("2", "1"):  # also in a 1-round run, which keeps the section for a later --rounds 2
        pipeline_yaml.write_text(yaml.safe_dump({**cfg, "round_candidates": {"temperature": 0}}))
        assert main(["pipeline", "--config", str(pipeline_yaml), "--rounds", rounds]) == 2
        assert "pipeline section 'round_candidates': config key 'temperature' must be > 0" in capsys.readouterr().err
    # what the pipeline sets for each round itself
    pipeline_yaml.write_text(yaml.safe_dump({**cfg, "round_candidates": {"adapter": "x", "label_budget": 3}}))
    assert main(["pipeline", "--config", str(pipeline_yaml), "--rounds", "2"]) == 2
    assert "config key 'round_candidates' cannot set adapter, label_budget:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pipeline_stops_after_candidates_for_human_labelers(pipeline_yaml, tmp_path, capsys):
    assert main(["pipeline", "--config", str(pipeline_yaml), "--stop_after", "candidates"]) == 0
    run = tmp_path / "run"
    assert (run / "labels.db").is_file() and not (run / "prefs.jsonl").exists()
    assert "rlhf label serve --db" in capsys.readouterr().out
    # nobody voted: continuing without simulated labelers stops with a clear message
    assert main(["pipeline", "--config", str(pipeline_yaml), "--simulated_labelers", "0"]) == 2
    assert "from 0 answered comparisons" in capsys.readouterr().err


@pytest.mark.parametrize("section, key, value, expected", [
    ("ppo", "not_a_key", 1, "not_a_key"),
    ("dpo", "bta", 0.1, "bta"),  # a typo in the section of the aligner that align: ppo does not run
    ("eval", "dataset_name", "no_such_prompts.jsonl", "dataset file not found"),  # a later stage's data
])  # fmt: skip
def test_a_bad_section_is_named_before_anything_runs(pipeline_yaml, tmp_path, capsys, section, key, value, expected):
    cfg = yaml.safe_load(pipeline_yaml.read_text())
    assert cfg.get("align", "ppo") == "ppo"
    cfg.setdefault(section, {})[key] = str(tmp_path / value) if key.endswith("dataset_name") else value
    pipeline_yaml.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(pipeline_yaml)]) == 2
    err = capsys.readouterr().err
    assert f"section '{section}'" in err and expected in err
    assert not (tmp_path / "run" / "sft").exists()


def test_unknown_rule_is_named_before_anything_runs(pipeline_yaml, tmp_path, capsys):
    assert main(["pipeline", "--config", str(pipeline_yaml), "--rule", "no_such_rule"]) == 2
    assert "unknown rule 'no_such_rule'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
