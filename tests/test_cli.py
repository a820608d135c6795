import json
import subprocess
import sys

import pytest

from rlhf.cli import build_parser, main
from rlhf.testing import write_jsonl


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_top_level_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in ["sft", "generate"]:
        assert stage in out


def test_every_subcommand_has_help(capsys):
    for name, sub in subcommands().items():
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0, name
        assert "usage" in capsys.readouterr().out


def test_sft_help_shows_defaults_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    assert "--lora_r" in out and "[default: 16]" in out and "LoRA rank" in out
    assert "choices: lora, full, freeze, prompt_tuning, prefix_tuning" in out


def test_unknown_key_exits_2_with_one_line(capsys):
    assert main(["sft", "--not_a_key", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--not_a_key" in err and "\n" not in err


def test_bad_value_in_yaml_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: lots\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    assert "lora_r" in capsys.readouterr().err


def test_missing_dataset_exits_2(tmp_path, tiny_model_dir, capsys):
    code = main(["sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(tmp_path / "nope.jsonl"),
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sft_config_smoke_run_and_generate(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(8)])
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'sft'}\n"
        "max_steps: 2\nper_device_train_batch_size: 4\neval_fraction: 0.25\nreport_to: none\n"
    )
    assert main(["sft", "--config", str(cfg), "--lora_r", "2"]) == 0
    saved = (tmp_path / "sft" / "run_config.yaml").read_text()
    assert "lora_r: 2" in saved
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": [{"role": "user", "content": "yo"}]}])
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model_name_or_path", tiny_model_dir, "--adapter", str(tmp_path / "sft"),
                 "--dataset_name", str(prompts), "--out", str(out), "--max_new_tokens", "5", "--do_sample", "false"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "yo"] and all(isinstance(r["response"], str) for r in rows)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sft" in out.stdout


@pytest.mark.parametrize("argv", [["reward", "--bad_key", "value"], ["reward", "evaluate", "--bad_key", "value"]])
def test_unknown_key_named_for_stage_with_subcommand(argv, capsys):
    assert main(argv) == 2
    assert "--bad_key" in capsys.readouterr().err


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reward", "evaluate", "--help"])
    assert exc.value.code == 0 and "--reward_model" in capsys.readouterr().out


HEAVY_CHECK = """
import json, sys
from rlhf import cli
{body}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in cli.HEAVY_MODULES)))
"""


def heavy_modules_after(body: str, env: dict | None = None) -> list[str]:
    """Heavy libraries (torch, transformers, ...) a fresh interpreter has imported after running ``body``."""
    out = subprocess.run([sys.executable, "-c", HEAVY_CHECK.format(body=body)], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_heavy_library():
    body = "cli.build_parser()\nfor spec in cli.SUBSTAGES.values():\n    cli._resolve(spec[0])"
    assert heavy_modules_after(body) == []


def test_stage_help_imports_no_heavy_library():
    body = "\n".join(
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass"
        for argv in (["--help"], ["ppo", "--help"], ["eval", "--help"], ["reward", "evaluate", "--help"])
    )
    assert heavy_modules_after(body) == []


def test_label_admin_commands_import_no_heavy_library(tmp_path):
    import os

    db = str(tmp_path / "l.db")
    body = "\n".join(
        f"assert cli.main({argv!r}) == 0"
        for argv in (["label", "init", "--db", db], ["label", "user", "add", "ann", "--db", db],
                     ["label", "user", "list", "--db", db], ["label", "stats", "--db", db],
                     ["label", "export", "--db", db, "--out", str(tmp_path / "p.jsonl")])
    )  # fmt: skip
    assert heavy_modules_after(body, env={**os.environ, "RLHF_PASSWORD": "a long enough secret"}) == []


def test_the_cli_hides_only_peft_s_checkpointing_deprecation(capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([]) == 0  # no stage: the help
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`rlhf label user list | head -1`: the closed pipe ends the command with no traceback."""
    import os

    db, rlhf = str(tmp_path / "l.db"), [sys.executable, "-m", "rlhf.cli", "label"]
    env = {**os.environ, "RLHF_PASSWORD": "a long enough password"}
    for argv in (["init", "--db", db], ["user", "add", "ann", "--db", db]):
        assert subprocess.run(rlhf + argv, capture_output=True, env=env).returncode == 0
    proc = subprocess.Popen(rlhf + ["user", "list", "--db", db], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes its line
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err, err[-500:]


@pytest.mark.parametrize("argv, name", [(["generate", "--max_new_tokens", "4"], "generate"),
                                        (["reward", "evaluate"], "reward evaluate"), (["pipeline"], "pipeline"),
                                        (["label", "export"], "label")])
def test_a_one_process_command_under_a_launcher_is_refused_once(argv, name, tmp_path, monkeypatch, capsys):
    """`accelerate launch` of a command that does not train data-parallel would run it whole on each process,
    each writing the same outputs: refused before anything runs, the message printed by rank 0 alone."""
    out = tmp_path / "gen.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == ("" if rank == "1" else
                       f"error: `rlhf {name}` runs in one process; only sft, reward, dpo, ppo run on the N processes "
                       "of `accelerate launch` (`rlhf pipeline --num_processes N` launches them itself)\n")
    assert not out.exists()
