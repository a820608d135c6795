"""Bad input to every command: exit status 2, one stderr line naming the problem, nothing written.

Each case builds its inputs in ``tmp_path``, snapshots every file there (path -> content hash),
runs the command in-process through ``rlhf.cli.main`` and checks that the snapshot is unchanged:
no output folder or database appears, no existing file is moved, replaced or emptied. Every case
fails during validation, before any model is trained (a tiny model stands in where one is read).
"""

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.cli import main
from rlhf.testing import write_jsonl

PASSWORD = "a long enough password"
CLOSED_PG = "postgresql://rlhf:secret@127.0.0.1:1/labels"  # port 1: nothing listens there


# helper functions


def _binary(path: Path) -> str:
    path.write_bytes(b"\xff\xfe\x00lora_r: 8\n")
    return str(path)


def _other_sqlite(path: Path) -> str:
    """A SQLite database of another application (rollback journal, one table)."""
    import sqlite3

    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE recipes (name TEXT)")
    con.close()
    return str(path)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (except the per-test cache home) -> content hash, or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "rlhf_home" in p.relative_to(root).parts:
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _policy(c, name: str, sft_adapter, base: str | None = None) -> str:
    """A LoRA adapter whose run_config.yaml records ``sft_adapter`` (a path or None) as its start."""
    config = {"peft_type": "LORA", "base_model_name_or_path": base or c.model, "r": 2, "lora_alpha": 4,
              "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    folder = c.adapter(name, json.dumps(config))
    (Path(folder) / "run_config.yaml").write_text(json.dumps({"sft_adapter": sft_adapter, "kl_coef": 0.1}))
    return folder


def _other_lora(c, name: str, base: str | None = None) -> str:
    """A LoRA adapter with other weights than ``adapter_ok`` (and optionally another base)."""
    import torch
    from safetensors.torch import save_file

    folder = _policy(c, name, None, base)
    (Path(folder) / "run_config.yaml").unlink()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.ones(2, 32), key.format("B"): torch.ones(32, 2)},
              str(Path(folder) / "adapter_model.safetensors"))  # fmt: skip
    return folder


def _broken_model(c, name: str) -> str:
    """A copy of the tiny model, broken as ``name`` says: no_tokenizer, no_chat_template, truncated weights,
    unknown_type."""
    import shutil

    folder = c.root / name
    shutil.copytree(c.model, folder)
    if name == "no_tokenizer":
        for file in folder.glob("tokenizer*"):
            file.unlink()
    elif name == "no_chat_template":
        for file in folder.glob("chat_template*"):
            file.unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    elif name == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llamaXX"}))
    return str(folder)


def _other_base_lora(c) -> str:
    """A LoRA adapter for a model 48 wide: it does not fit the 32-wide tiny model."""
    import torch
    from safetensors.torch import save_file

    folder = _policy(c, "wide", None)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.ones(2, 48), key.format("B"): torch.ones(48, 2)},
              str(Path(folder) / "adapter_model.safetensors"))  # fmt: skip
    return folder


def GEN(c, *args):  # noqa: N802 - reads like the other command builders
    return ["generate", *args, "--dataset_name", c.prompts, "--out", c.out("g.jsonl")]


def INTERP(c, adapter, *args):  # noqa: N802 - reads like the other command builders
    return ["export", "--adapter", adapter, "--mode", "interpolate", *args, "--out", c.out("interp")]


class Inputs(SimpleNamespace):
    """Paths of good and bad inputs inside one test's ``tmp_path``."""

    def file(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def rows(self, name: str, rows: list) -> str:
        return str(write_jsonl(self.root / name, rows))

    def adapter(self, name: str, config_text: str, weights: bytes | None = None) -> str:
        """An adapter folder with this config text and a small real LoRA weights file (or ``weights`` bytes)."""
        import torch
        from safetensors.torch import save_file

        folder = self.root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(config_text)
        if weights is None:
            key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
            save_file({key.format("A"): torch.zeros(2, 32), key.format("B"): torch.zeros(32, 2)},
                      str(folder / "adapter_model.safetensors"))  # fmt: skip
        elif weights:
            (folder / "adapter_model.safetensors").write_bytes(weights)
        return str(folder)

    def out(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, monkeypatch):
    from feedback_ui.auth import add_user
    from feedback_ui.store import init_db

    monkeypatch.chdir(tmp_path)  # anything written by mistake to a relative default lands in the snapshot
    monkeypatch.setenv("RLHF_PASSWORD", PASSWORD)
    c = Inputs(root=tmp_path, model=tiny_model_dir)
    c.sft = c.rows("sft.jsonl", [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(8)])
    c.prompts = c.rows("prompts.jsonl", [{"prompt": f"Q{i}?"} for i in range(4)])
    c.prefs = c.rows("prefs.jsonl", [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "no"} for i in range(8)])
    c.precious = c.file("precious.txt", "keep me\n")
    c.empty_dir = str(tmp_path / "empty")
    Path(c.empty_dir).mkdir()
    c.not_db = c.file("notes.db", "these are notes, not a database\n")
    c.db = str(tmp_path / "labels.db")
    store = init_db(c.db)
    add_user(store, "ann", PASSWORD, "labeler")
    store.close()
    c.missing_db = str(tmp_path / "missing.db")
    lora = {"peft_type": "LORA", "base_model_name_or_path": tiny_model_dir, "r": 2, "lora_alpha": 4,
            "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    c.adapter_ok = c.adapter("adapter_ok", json.dumps(lora))
    c.adapter_bad_json = c.adapter("adapter_bad_json", '{"peft_type": "LORA", r: 2')
    c.adapter_list = c.adapter("adapter_list", json.dumps([lora]))
    c.adapter_no_type = c.adapter("adapter_no_type", json.dumps({"r": 2}))
    c.adapter_no_weights = c.adapter("adapter_no_weights", json.dumps(lora), weights=b"")
    c.adapter_corrupt = c.adapter("adapter_corrupt", json.dumps(lora), weights=b"\x10\0\0\0\0\0\0\0{trunc")
    c.rm_bad_meta = c.adapter("rm_bad_meta", json.dumps(lora))
    c.rm = c.adapter("rm_lora", json.dumps({**lora, "task_type": "SEQ_CLS"}))  # a reward model's LoRA, as `rlhf reward`
    (Path(c.rm) / "reward_model.json").write_text("{}")
    c.notes = c.file("notes/thesis.txt", "my thesis\n")  # a folder of the user's own files
    (Path(c.rm_bad_meta) / "reward_model.json").write_text("{not json")
    c.M = ["--model_name_or_path", tiny_model_dir]
    return c


PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # tqdm's "Loading weights: 100%|####| 21/21": work done before the check


def check_refused(argv: list[str], expected: str, root: Path, capsys) -> str:
    """Run ``argv``; assert status 2, exactly one stderr line containing ``expected`` (besides progress bars of
    loading that came before it), no file changed."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not PROGRESS_BAR.search(line)]  # fmt: skip
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert expected.lower() in lines[0].lower(), lines[0]
    assert snapshot(root) == before
    return lines[0]


# config values: wrong nested types, impossible combinations, values out of range

CONFIG_CASES = [
    ("sft-dict-for-int", lambda c: ["sft", "--config", c.file("c.yaml", "lora_r: {a: 1}\n")],
     "'lora_r' must be an integer"),
    ("sft-list-of-dicts-for-names", lambda c: ["sft", "--config", c.file("c.yaml", "lora_target_modules: [{a: 1}]\n")],
     "'lora_target_modules' must be a list of strings"),
    ("sft-string-for-list", lambda c: ["sft", "--config", c.file("c.yaml", "reft_layers: [1, two]\n")],
     "'reft_layers' must be a list of integers"),
    ("sft-yaml-is-a-list", lambda c: ["sft", "--config", c.file("c.yaml", "- lora_r\n- 8\n")], "mapping"),
    ("sft-yaml-malformed", lambda c: ["sft", "--config", c.file("c.yaml", "lora_r: [1,\n")], "not valid YAML"),
    ("sft-yaml-unknown-key", lambda c: ["sft", "--config", c.file("c.yaml", "lora_rank: 8\n")], "'lora_rank'"),
    ("sft-config-is-a-folder", lambda c: ["sft", "--config", c.empty_dir], "config file not found"),
    ("sft-config-not-text", lambda c: ["sft", "--config", c.file("c.yaml", "") and _binary(c.root / "c.yaml")],
     "not UTF-8 text"),
    ("sft-zero-lora-alpha", lambda c: ["sft", *c.M, "--lora_alpha", "0"], "'lora_alpha' must be >= 1"),
    ("ppo-negative-lora-alpha", lambda c: ["ppo", *c.M, "--lora_alpha", "-5"], "'lora_alpha' must be >= 1"),
    ("generate-yaml-is-a-falsy-scalar", lambda c: ["generate", "--config", c.file("g.yaml", "0\n")], "mapping"),
    ("generate-yaml-is-an-empty-list", lambda c: ["generate", "--config", c.file("g.yaml", "[]\n")], "mapping"),
    ("sft-negative-lr", lambda c: ["sft", *c.M, "--learning_rate", "-1e-4"], "'learning_rate' must be > 0"),
    ("sft-nan-lr", lambda c: ["sft", *c.M, "--learning_rate", "nan"], "'learning_rate' must be a finite number"),
    ("sft-zero-batch", lambda c: ["sft", *c.M, "--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    ("sft-fraction-above-1", lambda c: ["sft", *c.M, "--eval_fraction", "1.5"], "'eval_fraction' must be in [0, 1)"),
    ("sft-negative-weight-decay", lambda c: ["sft", *c.M, "--weight_decay", "-0.1"], "'weight_decay'"),
    ("sft-bool-maybe", lambda c: ["sft", *c.M, "--completion_only_loss", "maybe"], "true/false"),
    ("sft-unknown-method", lambda c: ["sft", *c.M, "--method", "qlora"], "'method' must be one of"),
    ("sft-patience-without-eval", lambda c: ["sft", *c.M, "--early_stopping_patience", "2", "--eval_fraction", "0"],
     "early_stopping_patience"),
    ("ppo-split-does-not-divide", lambda c: ["ppo", *c.M, "--rollout_batch_size", "6", "--num_mini_batches", "4"],
     "divisible"),
    ("ppo-micro-batch-mismatch", lambda c: ["ppo", *c.M, "--rollout_batch_size", "8", "--per_device_train_batch_size",
                                            "3"], "must equal the mini-batch"),  # fmt: skip
    ("ppo-gamma-above-1", lambda c: ["ppo", *c.M, "--gamma", "1.5"], "'gamma' must be in (0, 1]"),
    ("ppo-negative-lam", lambda c: ["ppo", *c.M, "--lam", "-0.1"], "'lam' must be in [0, 1]"),
    ("ppo-zero-cliprange", lambda c: ["ppo", *c.M, "--cliprange", "0"], "'cliprange' must be > 0"),
    ("ppo-yaml-dict-for-float", lambda c: ["ppo", "--config", c.file("p.yaml", "kl_coef: {value: 0.1}\n")], "kl_coef"),
    ("reward-fraction-1", lambda c: ["reward", *c.M, "--eval_fraction", "1"], "'eval_fraction' must be in [0, 1)"),
    ("reward-dropout-1", lambda c: ["reward", *c.M, "--lora_dropout", "1"], "'lora_dropout' must be in [0, 1)"),
    ("reward-eval-zero-batch", lambda c: ["reward", "evaluate", "--reward_model", "rm", "--dataset_name", c.prefs,
                                          "--batch_size", "0"], "'batch_size' must be >= 1"),  # fmt: skip
    ("generate-top-p-above-1", lambda c: ["generate", *c.M, "--top_p", "1.5"], "'top_p' must be in (0, 1]"),
    ("generate-zero-temperature", lambda c: ["generate", *c.M, "--temperature", "0"], "'temperature' must be > 0"),
    ("generate-zero-prompts", lambda c: ["generate", *c.M, "--max_prompts", "0"], "'max_prompts' must be >= 1"),
    ("export-alpha-above-1", lambda c: ["export", "--adapter", c.adapter_ok, "--alpha", "2"],
     "'alpha' must be in [0, 1]"),
    ("export-unknown-mode", lambda c: ["export", "--adapter", c.adapter_ok, "--mode", "gguf"], "'mode' must be one of"),
    ("export-alpha-negative", lambda c: ["export", "--adapter", c.adapter_ok, "--mode", "interpolate", "--alpha",
                                         "-0.1"], "'alpha' must be in [0, 1]"),  # fmt: skip
    ("export-alpha-nan", lambda c: ["export", "--adapter", c.adapter_ok, "--alpha", "nan"], "'alpha' must be a finite"),
    ("export-unknown-from", lambda c: INTERP(c, c.adapter_ok, "--from", "scratch"), "must be one of"),
    ("export-from-without-interpolate", lambda c: ["export", "--adapter", c.adapter_ok, "--from", "base"],
     "used only with mode interpolate"),
    ("export-from-base-with-sft", lambda c: INTERP(c, c.adapter_ok, "--from", "base", "--sft_adapter", c.adapter_ok),
     "contradicts --from base"),
    ("eval-samples-without-sampling", lambda c: ["eval", "--policy", "p", "--baseline", "b", "--rule", "rule_score",
                                                 "--samples_per_prompt", "2"], "needs do_sample"),  # fmt: skip
    ("candidates-one-candidate", lambda c: ["label", "candidates", "--db", c.db, "--num_candidates", "1"],
     "'num_candidates' must be >= 2"),
    ("candidates-ranking-needs-3", lambda c: ["label", "candidates", "--db", c.db, "--mode", "ranking"],
     "'num_candidates' must be between 3 and 8"),
    ("candidates-ranking-above-the-app-slots", lambda c: ["label", "candidates", "--db", c.db, "--mode", "ranking",
                                                          "--num_candidates", "9"], "between 3 and 8"),
    ("candidates-gold-rate-1", lambda c: ["label", "candidates", "--db", c.db, "--gold_rate", "1"], "'gold_rate'"),
    ("candidates-budget-0", lambda c: ["label", "candidates", "--db", c.db, "--selection", "random", "--label_budget",
                                       "0"], "'label_budget' must be >= 1"),  # fmt: skip
    ("candidates-budget-negative", lambda c: ["label", "candidates", "--db", c.db, "--label_budget", "-3"],
     "'label_budget' must be >= 1"),
    ("candidates-selection-without-budget", lambda c: ["label", "candidates", "--db", c.db, "--selection", "random"],
     "selection 'random' needs config key 'label_budget'"),
    ("candidates-budget-without-selection", lambda c: ["label", "candidates", "--db", c.db, "--label_budget", "5"],
     "'label_budget' needs selection random or uncertainty"),
    ("candidates-uncertainty-without-rm", lambda c: ["label", "candidates", "--db", c.db, "--selection", "uncertainty",
                                                     "--label_budget", "5"], "needs config key 'reward_model'"),
    ("candidates-rm-with-random", lambda c: ["label", "candidates", "--db", c.db, "--selection", "random",
                                             "--label_budget", "5", "--reward_model", "rm"], "only with selection"),
    ("candidates-uncertainty-ranking", lambda c: ["label", "candidates", "--db", c.db, "--mode", "ranking",
                                                  "--num_candidates", "3", "--selection", "uncertainty",
                                                  "--label_budget", "5", "--reward_model", "rm"], "needs mode pairwise"),
    ("candidates-unknown-selection", lambda c: ["label", "candidates", "--db", c.db, "--selection", "margin",
                                                "--label_budget", "5"], "'selection' must be one of"),
    ("pipeline-section-is-a-number", lambda c: ["pipeline", "--config", c.file("d.yaml", "work_dir: wd\nsft: 5\n")],
     "'sft' must be a mapping"),
    ("pipeline-section-unknown-key", lambda c: ["pipeline", "--config",
                                                c.file("d.yaml", "work_dir: wd\nsft: {lr: 1}\n")],
     "pipeline section 'sft': unknown config key 'lr'"),
    ("pipeline-prefs-unknown-key", lambda c: ["pipeline", "--config",
                                              c.file("d.yaml", "work_dir: wd\nprefs: {x: 1}\n")],
     "pipeline section 'prefs': unknown config key 'x'"),
    ("pipeline-ppo-split", lambda c: ["pipeline", "--config", c.file(
        "d.yaml", "work_dir: wd\nppo: {rollout_batch_size: 6, num_mini_batches: 4}\n")], "section 'ppo'"),
    ("pipeline-unknown-rule", lambda c: ["pipeline", "--config", c.file("d.yaml", "work_dir: wd\nrule: vibes\n")],
     "unknown rule 'vibes'"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(inputs, capsys, build, expected):
    check_refused(build(inputs), expected, inputs.root, capsys)


# data files and folders

DATA_CASES = [
    ("sft-semicolon-csv", lambda c: ["sft", *c.M, "--dataset_name", c.file("d.csv", "prompt;completion\nQ?;A.\n"),
                                     "--output_dir", c.out("o")], "comma-separated"),  # fmt: skip
    ("sft-empty-file", lambda c: ["sft", *c.M, "--dataset_name", c.file("d.jsonl", ""), "--output_dir", c.out("o")],
     "is empty"),
    ("sft-blank-lines", lambda c: ["sft", *c.M, "--dataset_name", c.file("d.jsonl", "\n \n"),
                                   "--output_dir", c.out("o")],
     "is empty"),
    ("sft-empty-folder", lambda c: ["sft", *c.M, "--dataset_name", c.empty_dir, "--output_dir", c.out("o")],
     "not a dataset saved with save_to_disk"),
    ("sft-null-completion", lambda c: ["sft", *c.M, "--dataset_name", c.rows("d.jsonl", [
        {"prompt": "Q?", "completion": "A."}, {"prompt": "Q2?", "completion": None}]), "--output_dir", c.out("o")],
     "row 1: column 'completion'"),
    ("sft-number-as-prompt", lambda c: ["sft", *c.M, "--dataset_name", c.rows("d.jsonl", [
        {"prompt": 7, "completion": "A."}]), "--output_dir", c.out("o")], "column 'prompt'"),
    ("sft-message-without-content", lambda c: ["sft", *c.M, "--dataset_name", c.rows("d.jsonl", [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant"}]}]), "--output_dir", c.out("o")],
     "column 'messages'"),
    ("sft-bad-json-line", lambda c: ["sft", *c.M, "--dataset_name", c.file("d.jsonl", '{"prompt": "Q?"}\n{"prompt"\n'),
                                     "--output_dir", c.out("o")], "line 2 is not valid JSON"),  # fmt: skip
    ("sft-wrong-columns", lambda c: ["sft", *c.M, "--dataset_name", c.prefs, "--output_dir", c.out("o")],
     "needs columns messages or prompt/completion"),
    ("sft-missing-file", lambda c: ["sft", *c.M, "--dataset_name", c.out("nope.jsonl"), "--output_dir", c.out("o")],
     "not found"),
    ("generate-null-prompt", lambda c: ["generate", *c.M, "--dataset_name", c.rows("p.jsonl", [{"prompt": "Q?"},
                                        {"prompt": None}]), "--out", c.out("g.jsonl")], "row 1: column 'prompt'"),
    ("generate-no-prompt-column", lambda c: ["generate", *c.M, "--dataset_name", c.rows("p.jsonl", [{"text": "Q?"}]),
                                             "--out", c.out("g.jsonl")], "needs columns prompt"),  # fmt: skip
    ("generate-empty-messages", lambda c: ["generate", *c.M, "--dataset_name", c.rows("p.jsonl", [{"prompt": []}]),
                                           "--out", c.out("g.jsonl")], "empty list"),  # fmt: skip
    ("reward-sft-data", lambda c: ["reward", *c.M, "--dataset_name", c.sft, "--output_dir", c.out("rm")],
     "missing: chosen, rejected"),
    ("reward-null-rejected", lambda c: ["reward", *c.M, "--dataset_name", c.rows("p.jsonl", [
        {"prompt": "Q?", "chosen": "A.", "rejected": None}]), "--output_dir", c.out("rm")], "'rejected' is empty"),
    ("reward-text-margin", lambda c: ["reward", *c.M, "--dataset_name", c.rows("p.jsonl", [
        {"prompt": "Q?", "chosen": "A.", "rejected": "b", "margin": "big"}]), "--output_dir", c.out("rm")], "'margin'"),
    ("reward-empty-folder", lambda c: ["reward", *c.M, "--dataset_name", c.empty_dir, "--output_dir", c.out("rm")],
     "not a dataset"),
    ("ppo-empty-folder", lambda c: ["ppo", *c.M, "--dataset_name", c.empty_dir, "--reward_model", "rule",
                                    "--output_dir", c.out("ppo")], "not a dataset"),  # fmt: skip
    ("candidates-empty-folder", lambda c: ["label", "candidates", "--db", c.out("new.db"), *c.M,
                                           "--dataset_name", c.empty_dir], "not a dataset"),  # fmt: skip
    ("candidates-bad-gold-file", lambda c: ["label", "candidates", "--db", c.out("new.db"), *c.M, "--dataset_name",
                                            c.prompts, "--gold_file", c.rows("g.jsonl", [{"prompt": "Q?"}])],
     "needs string 'chosen' and 'rejected'"),  # fmt: skip
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data(inputs, capsys, build, expected):
    check_refused(build(inputs), expected, inputs.root, capsys)


# models, adapters and output paths

PATH_CASES = [
    ("sft-output-dir-is-a-file", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir", c.precious],
     "is an existing file"),
    ("sft-output-dir-under-a-file", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir",
                                               c.precious + "/run"], "is a file, not a folder"),  # fmt: skip
    ("sft-output-dir-holds-the-data", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir", str(c.root)],
     "would replace dataset_name"),
    ("generate-out-is-the-prompts", lambda c: ["generate", *c.M, "--dataset_name", c.prompts, "--out", c.prompts],
     "would replace dataset_name"),
    ("ppo-output-dir-is-the-sft-adapter", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", "rule",
                                                     "--sft_adapter", c.adapter_ok, "--output_dir", c.adapter_ok],
     "would replace sft_adapter"),  # fmt: skip
    ("sft-model-folder-without-config", lambda c: ["sft", "--model_name_or_path", c.empty_dir, "--dataset_name", c.sft,
                                                   "--output_dir", c.out("o")], "has no config.json"),  # fmt: skip
    ("generate-out-is-a-folder", lambda c: ["generate", *c.M, "--dataset_name", c.prompts, "--out", c.empty_dir],
     "is a folder"),
    ("generate-adapter-malformed-json", lambda c: ["generate", *c.M, "--adapter", c.adapter_bad_json,
                                                   "--dataset_name", c.prompts, "--out", c.out("g.jsonl")],
     "adapter_config.json is not valid JSON"),  # fmt: skip
    ("generate-adapter-config-is-a-list", lambda c: ["generate", *c.M, "--adapter", c.adapter_list, "--dataset_name",
                                                     c.prompts, "--out", c.out("g.jsonl")], "must hold a JSON object"),
    ("generate-adapter-without-peft-type", lambda c: ["generate", *c.M, "--adapter", c.adapter_no_type,
                                                      "--dataset_name", c.prompts, "--out", c.out("g.jsonl")],
     "no 'peft_type'"),  # fmt: skip
    ("generate-adapter-corrupt-weights", lambda c: ["generate", *c.M, "--adapter", c.adapter_corrupt,
                                                    "--dataset_name", c.prompts, "--out", c.out("g.jsonl")],
     "not a valid safetensors file"),  # fmt: skip
    ("generate-adapter-missing", lambda c: ["generate", *c.M, "--adapter", c.out("nope"), "--dataset_name", c.prompts,
                                            "--out", c.out("g.jsonl")], "has no adapter_config.json"),  # fmt: skip
    ("reward-output-dir-is-a-file", lambda c: ["reward", *c.M, "--dataset_name", c.prefs, "--output_dir", c.precious],
     "is an existing file"),
    ("reward-sft-adapter-malformed", lambda c: ["reward", *c.M, "--dataset_name", c.prefs, "--sft_adapter",
                                                c.adapter_bad_json, "--output_dir", c.out("rm")], "not valid JSON"),
    ("reward-eval-model-missing", lambda c: ["reward", "evaluate", "--reward_model", c.out("rm"), "--dataset_name",
                                             c.prefs], "reward model folder not found"),  # fmt: skip
    ("reward-eval-not-a-reward-model", lambda c: ["reward", "evaluate", "--reward_model", c.adapter_ok,
                                                  "--dataset_name", c.prefs], "not a reward model"),  # fmt: skip
    ("reward-eval-malformed-metadata", lambda c: ["reward", "evaluate", "--reward_model", c.rm_bad_meta,
                                                  "--dataset_name", c.prefs], "reward_model.json is not valid JSON"),
    ("reward-eval-out-is-a-folder", lambda c: ["reward", "evaluate", "--reward_model", c.rm_bad_meta, "--dataset_name",
                                               c.prefs, "--out", c.empty_dir], "is a folder"),  # fmt: skip
    ("ppo-output-dir-is-a-file", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", "rule",
                                            "--output_dir", c.precious], "is an existing file"),  # fmt: skip
    ("ppo-no-reward-model", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--output_dir", c.out("ppo")],
     "'reward_model' must be set"),
    ("ppo-reward-model-missing", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", c.out("rm"),
                                            "--output_dir", c.out("ppo")], "reward_model folder not found"),
    ("ppo-reward-model-not-one", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", c.empty_dir,
                                            "--output_dir", c.out("ppo")], "not a reward model"),  # fmt: skip
    ("ppo-sft-adapter-malformed", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", "rule",
                                             "--sft_adapter", c.adapter_bad_json, "--output_dir", c.out("ppo")],
     "sft_adapter"),  # fmt: skip
    ("ppo-sft-adapter-corrupt-weights", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", "rule",
                                                   "--sft_adapter", c.adapter_corrupt, "--output_dir", c.out("ppo")],
     "not a valid safetensors file"),  # fmt: skip
    ("export-merged-corrupt-weights", lambda c: ["export", "--adapter", c.adapter_corrupt, "--mode", "merged",
                                                 "--out", c.out("x")], "not a valid safetensors file"),  # fmt: skip
    ("export-adapter-malformed", lambda c: ["export", "--adapter", c.adapter_bad_json, "--out", c.out("x")],
     "not valid JSON"),
    ("export-adapter-without-weights", lambda c: ["export", "--adapter", c.adapter_no_weights, "--out", c.out("x")],
     "has no adapter_model.safetensors"),
    ("export-out-is-the-adapter", lambda c: ["export", "--adapter", c.adapter_ok, "--out", c.adapter_ok],
     "would replace the adapter"),
    ("export-out-is-a-file", lambda c: ["export", "--adapter", c.adapter_ok, "--out", c.precious],
     "is an existing file"),
    ("export-from-sft-folder-missing", lambda c: INTERP(c, c.adapter_ok, "--from", "sft", "--sft_adapter",
                                                        c.out("no_sft")), "sft_adapter folder not found"),
    ("export-from-sft-recorded-missing", lambda c: INTERP(c, _policy(c, "ppo", c.out("gone")), "--from", "sft"),
     "sft_adapter folder not found"),
    ("export-from-sft-none-recorded", lambda c: INTERP(c, c.adapter_ok, "--from", "sft"), "records no SFT start"),
    ("export-from-sft-not-the-start", lambda c: INTERP(c, _policy(c, "ppo", c.adapter_ok), "--from", "sft",
                                                       "--sft_adapter", _other_lora(c, "sft2")),
     "is not where"),  # fmt: skip
    ("export-from-sft-run-started-at-base", lambda c: INTERP(c, _policy(c, "ppo", None), "--sft_adapter",
                                                             c.adapter_ok), "trained from the base model"),
    ("export-from-sft-of-another-base", lambda c: INTERP(c, c.adapter_ok, "--sft_adapter",
                                                         _other_lora(c, "sft2", base=c.empty_dir)), "adapts"),
    ("export-full-model-merged", lambda c: ["export", "--adapter", c.model, "--mode", "merged", "--out", c.out("x")],
     "only --mode interpolate"),
    ("export-full-model-base-unknown", lambda c: INTERP(c, c.model, "--from", "base"),
     "does not record its base model"),
    ("eval-out-dir-is-a-file", lambda c: ["eval", "--policy", c.model, "--baseline", "base", *c.M, "--rule",
                                          "rule_score", "--out_dir", c.precious], "is an existing file"),  # fmt: skip
    ("eval-policy-missing", lambda c: ["eval", "--policy", c.out("nope"), "--baseline", "base", *c.M, "--rule",
                                       "rule_score", "--out_dir", c.out("ev")], "neither an adapter"),  # fmt: skip
    ("pipeline-work-dir-is-a-file", lambda c: ["pipeline", "--work_dir", c.precious], "is an existing file"),
    # a reward model's LoRA (task SEQ_CLS) is no policy, wherever a policy or SFT adapter is read
    ("generate-adapter-is-a-reward-model", lambda c: ["generate", *c.M, "--adapter", c.rm, "--dataset_name", c.prompts,
                                                      "--out", c.out("g.jsonl")], "SEQ_CLS adapter"),  # fmt: skip
    ("eval-policy-is-a-reward-model", lambda c: ["eval", "--policy", c.rm, "--baseline", "base", *c.M, "--rule",
                                                 "rule_score", "--out_dir", c.out("ev")], "SEQ_CLS adapter"),
    ("export-adapter-is-a-reward-model", lambda c: ["export", "--adapter", c.rm, "--out", c.out("x")], "SEQ_CLS"),
    ("export-merged-reward-model", lambda c: ["export", "--adapter", c.rm, "--mode", "merged", "--out", c.out("x")],
     "SEQ_CLS"),
    ("ppo-sft-adapter-is-a-reward-model", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", "rule",
                                                     "--sft_adapter", c.rm, "--output_dir", c.out("ppo")], "SEQ_CLS"),
    ("reward-sft-adapter-is-a-reward-model", lambda c: ["reward", *c.M, "--dataset_name", c.prefs, "--sft_adapter",
                                                        c.rm, "--output_dir", c.out("rm2")], "SEQ_CLS"),
    ("candidates-adapter-is-a-reward-model", lambda c: ["label", "candidates", "--db", c.out("new.db"), *c.M,
                                                        "--adapter", c.rm, "--dataset_name", c.prompts], "SEQ_CLS"),
    # models and adapters that do not load
    ("generate-adapter-of-another-base", lambda c: GEN(c, *c.M, "--adapter", _other_base_lora(c)),
     "trained on another base model"),
    ("export-merged-adapter-of-another-base", lambda c: ["export", "--adapter", _other_base_lora(c), "--mode", "merged",
                                                         "--out", c.out("x")], "trained on another base model"),
    ("generate-model-without-tokenizer", lambda c: GEN(c, "--model_name_or_path", _broken_model(c, "no_tokenizer")),
     "cannot load a tokenizer"),
    ("generate-model-weights-truncated", lambda c: GEN(c, "--model_name_or_path", _broken_model(c, "truncated")),
     "cannot load model"),
    ("generate-model-of-unknown-type", lambda c: GEN(c, "--model_name_or_path", _broken_model(c, "unknown_type")),
     "cannot load"),
    ("reward-model-weights-truncated", lambda c: ["reward", "--model_name_or_path", _broken_model(c, "truncated"),
                                                  "--dataset_name", c.prefs, "--output_dir", c.out("rm2")],
     "cannot load model"),  # fmt: skip
    ("sft-lora-target-not-in-the-model", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir", c.out("o"),
                                                    "--lora_target_modules", "q_proj,nonexistent_proj"],
     "no module named nonexistent_proj"),  # fmt: skip
    ("dpo-lora-target-not-in-the-model", lambda c: ["dpo", *c.M, "--dataset_name", c.prefs, "--output_dir", c.out("o"),
                                                    "--lora_target_modules", "nonexistent_proj"], "nonexistent_proj"),
    ("reward-lora-target-not-in-the-model", lambda c: ["reward", *c.M, "--dataset_name", c.prefs, "--output_dir",
                                                       c.out("o"), "--lora_target_modules", "nonexistent_proj"],
     "no module named nonexistent_proj"),  # fmt: skip
    ("ppo-lora-target-not-in-the-model", lambda c: ["ppo", *c.M, "--dataset_name", c.prompts, "--reward_model", "rule",
                                                    "--output_dir", c.out("o"), "--lora_target_modules", "nonexistent"],
     "no module named nonexistent"),  # fmt: skip
    ("sft-reft-rank-above-width", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir", c.out("o"),
                                             "--method", "loreft", "--reft_rank", "64"], "'reft_rank'"),
    ("candidates-model-without-chat-template", lambda c: ["label", "candidates", "--db", c.out("new.db"),
                                                          "--model_name_or_path", _broken_model(c, "no_chat_template"),
                                                          "--dataset_name", c.prompts], "no chat template"),
    ("candidates-model-weights-truncated", lambda c: ["label", "candidates", "--db", c.out("new.db"),
                                                      "--model_name_or_path", _broken_model(c, "truncated"),
                                                      "--dataset_name", c.prompts], "cannot load model"),
    # outputs that would destroy an input or the user's own files
    ("dpo-output-dir-is-the-sft-adapter", lambda c: ["dpo", *c.M, "--dataset_name", c.prefs, "--sft_adapter",
                                                     c.adapter_ok, "--output_dir", c.adapter_ok],
     "would replace sft_adapter"),  # fmt: skip
    ("dpo-output-dir-holds-the-data", lambda c: ["dpo", *c.M, "--dataset_name", c.prefs, "--output_dir", str(c.root)],
     "would replace dataset_name"),
    ("sft-output-dir-holds-other-files", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir",
                                                    str(Path(c.notes).parent)], "holds files no rlhf stage wrote"),
    ("sft-staging-folder-not-ours", lambda c: ["sft", *c.M, "--dataset_name", c.sft, "--output_dir", c.out("o"),
                                               "--max_steps", "1"] if c.file("o.incomplete/keep.txt", "mine\n") else [],
     "was not left by one"),  # fmt: skip
    ("export-merged-into-the-base-model", lambda c: ["export", "--adapter", c.adapter_ok, "--mode", "merged",
                                                     "--out", c.model], "would replace model_name_or_path"),
    ("reward-eval-out-is-the-dataset", lambda c: ["reward", "evaluate", "--reward_model", c.rm_bad_meta,
                                                  "--dataset_name", c.prefs, "--out", c.prefs], "would replace"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
def test_bad_models_adapters_and_paths(inputs, capsys, build, expected):
    check_refused(build(inputs), expected, inputs.root, capsys)


def test_ppo_bad_resume_leaves_the_output_folder_as_it_was(inputs, capsys):
    out = Path(inputs.out("ppo"))
    (out / "logs").mkdir(parents=True)
    (out / "run_config.yaml").write_text("seed: 1\n")
    (out / "logs" / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = ["ppo", *inputs.M, "--dataset_name", inputs.prompts, "--reward_model", "rule", "--output_dir", str(out),
            "--resume_from_checkpoint", str(out / "checkpoints" / "step-000009")]  # fmt: skip
    check_refused(argv, "resume_from_checkpoint", inputs.root, capsys)


def test_ppo_fresh_run_into_old_checkpoints_is_refused(inputs, capsys):
    step = Path(inputs.out("ppo")) / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("")
    argv = ["ppo", *inputs.M, "--dataset_name", inputs.prompts, "--reward_model", "rule", "--output_dir",
            inputs.out("ppo")]  # fmt: skip
    check_refused(argv, "already holds checkpoints", inputs.root, capsys)


# labeling: databases, accounts, app and export


def SERVE(c) -> list[str]:  # noqa: N802 - reads as part of the argv lists below
    return ["label", "serve", "--db", c.db, "--port", "0"]


def IMPORT(c, path):  # noqa: N802 - reads like the other command builders
    """``label import`` of ``path`` into a database that does not exist yet (it must not appear)."""
    return ["label", "import", "--db", c.out("new.db"), "--file", path]


GOOD_IMPORT = [{"prompt": "Q?", "response": "A.", "model": "m1"}, {"prompt": "Q?", "response": "B.", "model": "m2"}]


LABEL_CASES = [
    ("init-on-a-text-file", lambda c: ["label", "init", "--db", c.not_db], "is not a SQLite database"),
    ("init-on-a-folder", lambda c: ["label", "init", "--db", c.empty_dir], "is a folder"),
    ("init-folder-missing", lambda c: ["label", "init", "--db", c.out("no/such/labels.db")], "does not exist"),
    ("init-unsupported-url", lambda c: ["label", "init", "--db", "mysql://u@localhost/labels"], "unsupported database"),
    ("init-unparsable-postgres-url", lambda c: ["label", "init", "--db", "postgresql://u:pw@host:port/db"],
     "cannot parse"),
    ("init-on-another-sqlite-database", lambda c: ["label", "init", "--db", _other_sqlite(c.root / "other.db")],
     "SQLite database of something else"),
    ("user-add-missing-db", lambda c: ["label", "user", "add", "bob", "--db", c.missing_db], "does not exist"),
    ("user-list-missing-db", lambda c: ["label", "user", "list", "--db", c.missing_db], "does not exist"),
    ("stats-missing-db", lambda c: ["label", "stats", "--db", c.missing_db], "does not exist"),
    ("export-missing-db", lambda c: ["label", "export", "--db", c.missing_db, "--out", c.out("p.jsonl")],
     "does not exist"),
    ("serve-missing-db", lambda c: ["label", "serve", "--db", c.missing_db, "--port", "0"], "does not exist"),
    ("user-list-not-a-db", lambda c: ["label", "user", "list", "--db", c.not_db], "is not a SQLite database"),
    ("stats-not-a-db", lambda c: ["label", "stats", "--db", c.not_db], "is not a SQLite database"),
    ("export-not-a-db", lambda c: ["label", "export", "--db", c.not_db, "--out", c.out("p.jsonl")],
     "is not a SQLite database"),
    ("candidates-not-a-db", lambda c: ["label", "candidates", "--db", c.not_db, *c.M, "--dataset_name", c.prompts],
     "is not a SQLite database"),
    ("candidates-rm-missing", lambda c: ["label", "candidates", "--db", c.db, *c.M, "--dataset_name", c.prompts,
                                         "--selection", "uncertainty", "--label_budget", "4", "--reward_model",
                                         c.out("rm")], "reward model folder not found"),  # fmt: skip
    ("candidates-rm-not-one", lambda c: ["label", "candidates", "--db", c.out("new.db"), *c.M, "--dataset_name",
                                         c.prompts, "--selection", "uncertainty", "--label_budget", "4",
                                         "--reward_model", c.adapter_ok], "not a reward model"),  # fmt: skip
    ("sqlite-without-schema", lambda c: ["label", "stats", "--db", c.file("blank.db", "")], "not initialised"),
    ("unknown-role", lambda c: ["label", "user", "add", "bob", "--role", "owner", "--db", c.db], "--role"),
    ("name-with-space", lambda c: ["label", "user", "add", "bob smith", "--db", c.db], "invalid user name"),
    ("name-with-newline", lambda c: ["label", "user", "add", "bob\n", "--db", c.db], "invalid user name"),
    ("name-too-long", lambda c: ["label", "user", "add", "b" * 65, "--db", c.db], "invalid user name"),
    ("name-taken", lambda c: ["label", "user", "add", "ann", "--db", c.db], "already exists"),
    ("export-out-is-a-folder", lambda c: ["label", "export", "--db", c.db, "--out", c.empty_dir], "is a folder"),
    ("export-fraction-above-1", lambda c: ["label", "export", "--db", c.db, "--test_fraction", "1.5",
                                           "--out", c.out("p.jsonl")], "'test_fraction' must be in [0, 1)"),
    ("export-unknown-keep", lambda c: ["label", "export", "--db", c.db, "--keep", "tie,maybe",
                                       "--out", c.out("p.jsonl")],
     "'keep' takes tie and/or both_bad"),
    ("export-negative-margin", lambda c: ["label", "export", "--db", c.db, "--margin_much", "-3",
                                          "--out", c.out("p.jsonl")], "'margin_much'"),  # fmt: skip
    ("export-out-is-the-database", lambda c: ["label", "export", "--db", c.db, "--out", c.db], "would replace --db"),
    ("export-unknown-strategy", lambda c: ["label", "export", "--db", c.db, "--strategy", "random",
                                           "--out", c.out("p.jsonl")], "--strategy"),  # fmt: skip
    ("serve-port-out-of-range", lambda c: ["label", "serve", "--db", c.db, "--port", "70000"], "--port"),
    ("serve-gold-rate-1", lambda c: ["label", "serve", "--db", c.db, "--gold_rate", "1", "--port", "0"], "--gold_rate"),
    ("serve-zero-concurrency", lambda c: ["label", "serve", "--db", c.db, "--concurrency", "0", "--port", "0"],
     "--concurrency"),
    ("serve-cert-missing", lambda c: [*SERVE(c), "--ssl_certfile", c.out("none.pem"), "--ssl_keyfile", c.precious],
     "--ssl_certfile"),
    ("serve-key-missing", lambda c: [*SERVE(c), "--ssl_certfile", c.precious, "--ssl_keyfile", c.out("none.pem")],
     "--ssl_keyfile"),
    ("serve-cert-without-key", lambda c: [*SERVE(c), "--ssl_certfile", c.precious], "go together"),
    ("serve-key-without-cert", lambda c: [*SERVE(c), "--ssl_keyfile", c.precious], "go together"),
    ("serve-cert-not-pem", lambda c: [*SERVE(c), "--ssl_certfile", c.precious, "--ssl_keyfile", c.precious],
     "not a PEM certificate"),
    ("serve-cert-is-a-folder", lambda c: [*SERVE(c), "--ssl_certfile", c.empty_dir, "--ssl_keyfile", c.precious],
     "--ssl_certfile"),
    ("serve-origin-star", lambda c: [*SERVE(c), "--allowed_origins", "*"], "--allowed_origins"),
    ("serve-origin-without-scheme", lambda c: [*SERVE(c), "--allowed_origins", "labels.example.org"],
     "not an origin"),
    ("serve-origin-with-path", lambda c: [*SERVE(c), "--allowed_origins", "https://a.example,https://b.example/app"],
     "https://b.example/app"),
    ("serve-idle-zero", lambda c: [*SERVE(c), "--session_idle_minutes", "0"], "--session_idle_minutes"),
    ("serve-max-hours-nan", lambda c: [*SERVE(c), "--session_max_hours", "nan"], "--session_max_hours"),
    ("serve-negative-assignment-ttl", lambda c: [*SERVE(c), "--assignment_ttl", "-5"], "--assignment_ttl"),
    ("serve-infinite-assignment-ttl", lambda c: [*SERVE(c), "--assignment_ttl", "inf"], "--assignment_ttl"),
    ("import-missing-column", lambda c: IMPORT(c, c.rows("r.jsonl", [{"prompt": "Q?", "response": "A."}])),
     "r.jsonl:1 has no column 'model'"),
    ("import-bad-json-line", lambda c: IMPORT(c, c.file("r.jsonl", '{"prompt": "Q?", "response": "A.", "model": '
                                                  '"m"}\n{"prompt": "Q?", "response": \n')), "r.jsonl:2 is not valid JSON"),
    ("import-line-not-an-object", lambda c: IMPORT(c, c.file("r.jsonl", '["Q?", "A.", "m"]\n')), "JSON object"),
    ("import-prompt-not-messages", lambda c: IMPORT(c, c.rows("r.jsonl", [{"prompt": [{"text": "Q?"}],
                                                                          "response": "A.", "model": "m"}])),
     "r.jsonl:1: a prompt must be a string or a list of {role, content} messages"),
    ("import-empty-model", lambda c: IMPORT(c, c.rows("r.jsonl", [{"prompt": "Q?", "response": "A.", "model": " "}])),
     "'model' must be a non-empty string"),
    ("import-response-not-text", lambda c: IMPORT(c, c.rows("r.jsonl", [{"prompt": "Q?", "response": 4,
                                                                        "model": "m"}])), "'response'"),
    ("import-empty-file", lambda c: IMPORT(c, c.file("r.jsonl", "\n")), "has no rows"),
    ("import-file-missing", lambda c: IMPORT(c, c.out("none.jsonl")), "responses file not found"),
    ("import-file-is-a-folder", lambda c: IMPORT(c, c.empty_dir), "is a folder"),
    ("import-file-not-text", lambda c: IMPORT(c, _binary(c.root / "r.jsonl")), "not UTF-8"),
    ("import-zero-overlap", lambda c: [*IMPORT(c, c.rows("r.jsonl", GOOD_IMPORT)), "--overlap", "0"], "--overlap"),
    ("import-unknown-mode", lambda c: [*IMPORT(c, c.rows("r.jsonl", GOOD_IMPORT)), "--mode", "best-of"], "--mode"),
    ("import-no-file", lambda c: ["label", "import", "--db", c.db], "--file"),
    ("import-not-a-db", lambda c: ["label", "import", "--db", c.not_db, "--file", c.rows("r.jsonl", GOOD_IMPORT)],
     "is not a SQLite database"),
    ("user-disable-unknown", lambda c: ["label", "user", "disable", "bob", "--db", c.db], "no user named 'bob'"),
    ("user-enable-unknown", lambda c: ["label", "user", "enable", "bob", "--db", c.db], "no user named 'bob'"),
    ("user-disable-missing-db", lambda c: ["label", "user", "disable", "ann", "--db", c.missing_db], "does not exist"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_bad_label_input(inputs, capsys, build, expected):
    check_refused(build(inputs), expected, inputs.root, capsys)


def test_serve_on_a_port_in_use_is_refused(inputs, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        check_refused(["label", "serve", "--db", inputs.db, "--port", port], "cannot listen", inputs.root, capsys)


def test_serve_with_a_key_of_another_certificate_is_refused(inputs, capsys):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found")
    made = {}
    for name in ("one", "two"):
        cert, key = inputs.root / f"{name}.crt", inputs.root / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        made[name] = (str(cert), str(key))
    argv = [*SERVE(inputs), "--ssl_certfile", made["one"][0], "--ssl_keyfile", made["two"][1]]
    check_refused(argv, "its matching key", inputs.root, capsys)


def test_short_password_is_refused(inputs, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_PASSWORD", "short")
    check_refused(["label", "user", "add", "bob", "--db", inputs.db], "at least 8 characters", inputs.root, capsys)


@pytest.mark.parametrize("argv", [["label", "user", "list", "--db", CLOSED_PG], ["label", "init", "--db", CLOSED_PG]])
def test_unreachable_postgres_fails_fast_in_one_line(inputs, capsys, argv):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is an optional extra")
    start = time.monotonic()
    line = check_refused(argv, "127.0.0.1", inputs.root, capsys)
    assert time.monotonic() - start < 10
    assert "secret" not in line  # the password is masked


# as a user runs them: separate processes, nothing but the exit status and stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["label", "init", "--db", "notes.db"], "is not a SQLite database"),
        (["label", "user", "list", "--db", "missing.db"], "does not exist"),
        (["sft", "--config", "bad.yaml"], "'lora_r' must be an integer"),
        (["export", "--adapter", "adapter_bad_json", "--out", "x"], "not valid JSON"),
    ],
)
def test_console_command_prints_one_line_and_exits_2(inputs, argv, expected):
    inputs.file("bad.yaml", "lora_r: {a: 1}\n")
    before = snapshot(inputs.root)
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", *argv], cwd=inputs.root, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr
    assert out.stdout == ""
    assert snapshot(inputs.root) == before
