"""``rlhf reward`` and ``rlhf reward evaluate`` through the real command-line entry point."""

import json
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.testing import write_jsonl


def easy_rows(n: int) -> list[dict]:
    """Chosen = rejected + ' thanks' (as in test_reward_model)."""
    words = ["sun", "tree", "river", "cloud", "stone", "bird"]
    return [
        {
            "prompt": f"Say something about the {words[i % 6]} {i}.",
            "chosen": f"{words[i % 5]} {words[i % 3]} thanks",
            "rejected": f"{words[i % 5]} {words[i % 3]}",
        }
        for i in range(n)
    ]


def test_reward_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reward", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("--sft_adapter", "--eval_fraction", "--lora_r", "--max_length", "--dataset_name", "evaluate"):
        assert key in out


def test_reward_evaluate_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reward", "evaluate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--reward_model" in out and "--dataset_name" in out and "--out" in out


def test_reward_train_then_evaluate(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", [dict(r, annotator="a1") for r in easy_rows(40)])
    config = tmp_path / "reward.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny_model_dir,
                "dataset_name": str(data),
                "output_dir": str(tmp_path / "rm"),
                "max_steps": 16,
                "learning_rate": 5e-3,
                "lora_r": 4,
                "lora_alpha": 8,
                "eval_fraction": 0.25,
                "report_to": "none",
            }
        )
    )
    assert main(["reward", "--config", str(config), "--stats_max_pairs", "8"]) == 0
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.8
    assert yaml.safe_load((tmp_path / "rm" / "run_config.yaml").read_text())["stats_max_pairs"] == 8

    # evaluate on the same pairs written as HH-style dialogues
    hh = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
                "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}",
            }
            for r in easy_rows(40)
        ],
    )
    out = tmp_path / "eval" / "rm_eval.json"
    capsys.readouterr()
    assert (
        main(
            ["reward", "evaluate", "--reward_model", str(tmp_path / "rm"), "--dataset_name", str(hh), "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n"] == 40 and result["accuracy"] >= 0.8 and result["mean_margin"] > 0
    assert "accuracy" in printed and "mean margin" in printed


def test_reward_cli_errors_exit_2(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "a"}])
    code = main(
        [
            "reward",
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_name",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "missing: chosen, rejected" in err and "Traceback" not in err
    assert not Path(tmp_path / "o").exists()
    assert main(["reward", "--no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["reward", "evaluate", "--no_such_key", "1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["reward", "evaluate", "--reward_model", str(tmp_path), "--dataset_name", str(bad)]) == 2
    assert main(["reward", "evaluate", "--dataset_name", str(bad)]) == 2
    assert "reward_model" in capsys.readouterr().err
