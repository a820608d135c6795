"""rlhf dpo on a tiny model: what is trained, what the reference is, what is written, how errors look."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.cli import main
from rlhf.config import build_config
from rlhf.dpo import POLICY, REFERENCE, DPOStageConfig, build_trainer
from rlhf.models import save_adapter
from rlhf.pairs import load_splits
from rlhf.testing import write_jsonl

FACTS = [
    (f"Tell me fact number {i}.", f"Fact {i} is short.", f"fact {i} goes on and on without any end") for i in range(12)
]


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA 'SFT adapter' with random, non-zero A and B: the SFT policy differs clearly from the bare base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sft")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def prefs(tmp_path):
    return str(write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in FACTS]))


def make_cfg(tiny_model_dir, prefs, tmp_path, **overrides):
    values = dict(
        model_name_or_path=tiny_model_dir, dataset_name=prefs, output_dir=str(tmp_path / "dpo"), max_steps=3,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2, eval_fraction=0.25,
        report_to="none", logging_steps=1,
    )
    values.update(overrides)
    return build_config(DPOStageConfig, values)


def trained(cfg, tmp_path):
    train, held = load_splits(cfg)
    trainer = build_trainer(cfg, tmp_path / "work", train, held)
    return trainer


def adapter_weights(model, adapter: str) -> dict:
    """{name without the adapter part: tensor copy} of one adapter's LoRA weights."""
    mark = f".{adapter}."
    return {n.replace(mark, "."): p.detach().clone() for n, p in model.named_parameters() if mark in n}


def sft_file_weights(sft_adapter: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(sft_adapter) / "adapter_model.safetensors"))


def completion_logps(model, batch) -> torch.Tensor:
    """sum_t log p(y_t | y_<t) over the response tokens (completion_mask), computed from plain logits. (2B,)"""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)       # (2B, L - 1)
    return (token * batch["completion_mask"][:, 1:]).sum(-1)


def test_policy_trains_and_reference_stays_the_sft_adapter(tiny_model_dir, sft_adapter, prefs, tmp_path):
    cfg = make_cfg(tiny_model_dir, prefs, tmp_path, sft_adapter=sft_adapter)
    trainer = trained(cfg, tmp_path)
    model = trainer.model
    assert set(model.peft_config) == {POLICY, REFERENCE}
    sft_bytes = (Path(sft_adapter) / "adapter_model.safetensors").read_bytes()
    on_disk = sft_file_weights(sft_adapter)  # keys as PEFT saves them: the parameter names without the adapter name

    def matches_sft(weights):
        return weights.keys() == on_disk.keys() and all(torch.equal(v, on_disk[k]) for k, v in weights.items())

    policy0, ref0 = adapter_weights(model, POLICY), adapter_weights(model, REFERENCE)
    assert matches_sft(policy0) and matches_sft(ref0)  # both start as the SFT LoRA
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n and "lora_" in n for n in trainable)

    trainer.train()
    policy1, ref1 = adapter_weights(model, POLICY), adapter_weights(model, REFERENCE)
    assert any(not torch.equal(policy0[k], policy1[k]) for k in policy0)      # the policy LoRA moved
    assert matches_sft(ref1)                                                   # the reference did not
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert (Path(sft_adapter) / "adapter_model.safetensors").read_bytes() == sft_bytes


def test_reference_logps_are_the_sft_policys_and_export_reloads(tiny_model_dir, sft_adapter, prefs, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from rlhf.models import load_model

    cfg = make_cfg(tiny_model_dir, prefs, tmp_path, sft_adapter=sft_adapter)
    trainer = trained(cfg, tmp_path)
    trainer.train()
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)

    sft = load_model(tiny_model_dir, sft_adapter)
    expected = completion_logps(sft, batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-4)
    bare = completion_logps(load_model(tiny_model_dir), batch)
    assert not torch.allclose(bare, expected, atol=1e-2)                       # the bare base is another policy
    assert not torch.allclose(completion_logps(model, batch), expected, atol=1e-3)  # and the policy has moved

    out = tmp_path / "adapter"
    assert save_adapter(model, POLICY, out, tiny_model_dir) == out
    assert not (out / REFERENCE).exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()   # finds the base by itself
        assert (reloaded(input_ids=ids).logits - want).abs().max() < 1e-5


def test_without_sft_adapter_the_reference_is_the_base(tiny_model_dir, prefs, tmp_path):
    from rlhf.models import load_model

    cfg = make_cfg(tiny_model_dir, prefs, tmp_path, lora_r=2)
    trainer = trained(cfg, tmp_path)
    assert set(trainer.model.peft_config) == {POLICY}
    trainer.train()
    batch = trainer.data_collator([trainer.eval_dataset[0]])
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    assert torch.allclose(ref, completion_logps(load_model(tiny_model_dir), batch), atol=1e-4)


def test_every_preference_layout_gives_the_same_training_rows(tiny_model_dir, sft_adapter, tmp_path):
    explicit = [{"prompt": p, "chosen": c, "rejected": r, "annotator": "x"} for p, c, r in FACTS]
    hh = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
          for p, c, r in FACTS]
    uf = [{"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
           "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, c, r in FACTS]
    rows = []
    for name, data in [("explicit", explicit), ("hh", hh), ("uf", uf)]:
        path = str(write_jsonl(tmp_path / f"{name}.jsonl", data))
        cfg = make_cfg(tiny_model_dir, path, tmp_path, sft_adapter=sft_adapter, eval_fraction=0.0)
        ds = trained(cfg, tmp_path).train_dataset
        rows.append([(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds])
    assert len(rows[0]) == len(FACTS) and rows[0] == rows[1] == rows[2]


def test_rlhf_dpo_writes_a_stage_folder(tiny_model_dir, sft_adapter, prefs, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                                      "eval_fraction": 0.25, "logging_steps": 1, "loss_type": "ipo", "beta": 0.5}))
    out = tmp_path / "dpo"
    code = main(["dpo", "--config", str(config), "--model_name_or_path", tiny_model_dir, "--sft_adapter", sft_adapter,
                 "--dataset_name", prefs, "--output_dir", str(out), "--precompute_ref_log_probs", "true"])
    assert code == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "metrics.json",
            "run_config.yaml", "logs"} <= {p.name for p in out.iterdir()}
    assert not (out / REFERENCE).exists() and not (out / "trainer").exists()
    assert not out.with_name("dpo.incomplete").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["loss_type"] == "ipo" and metrics["reference"] == "sft_adapter"
    assert metrics["train_pairs"] + metrics["eval_pairs"] == len(FACTS) and metrics["eval_pairs"] == 3
    for key in ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "wall_time_s"):
        assert isinstance(metrics[key], float), key
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["beta"] == 0.5 and run_config["sft_adapter"] == sft_adapter
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in row for row in logged)
    assert any(p.name.startswith("events.") for p in (out / "logs").iterdir())  # TensorBoard
    AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert "reference = SFT adapter" in capsys.readouterr().err


def test_bad_keys_fail_with_one_line_and_write_nothing(tiny_model_dir, sft_adapter, prefs, tmp_path, capsys):
    out = tmp_path / "dpo"
    base = ["dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", prefs, "--output_dir", str(out)]
    cases = [
        (["--no_such_key", "1"], "no_such_key"),
        (["--loss_type", "kto"], "loss_type"),
        (["--beta", "0"], "beta"),
        (["--loss_type", "exo_pair"], "label_smoothing"),
        (["--sft_adapter", str(tmp_path / "missing")], "sft_adapter"),
        (["--sft_adapter", str(tmp_path)], "no adapter_config.json"),
        (["--dataset_name", str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "a"}]))],
         "missing: chosen, rejected"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
        assert not out.exists() and not out.with_name("dpo.incomplete").exists()
    reward_like = tmp_path / "rm"
    reward_like.mkdir()
    (reward_like / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    assert main(base + ["--sft_adapter", str(reward_like)]) == 2
    assert "SEQ_CLS" in capsys.readouterr().err and not out.exists()


def test_shipped_config_parses():
    from rlhf.config import parse_config

    cfg = parse_config(DPOStageConfig, ["--config", str(Path(__file__).parents[1] / "configs" / "dpo.yaml")])
    assert cfg.loss_type == "sigmoid" and cfg.sft_adapter == "outputs/sft" and cfg.beta > 0


def test_config_module_imports_no_heavy_library():
    heavy = "('torch', 'transformers', 'trl', 'peft', 'datasets')"
    code = f"import sys, rlhf.dpo; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_pipeline_aligns_with_dpo(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me fact number {i}."} for i in range(12)])
    cfg = {
        "work_dir": str(tmp_path / "run"),
        "model_name_or_path": tiny_model_dir,
        "align": "dpo",
        "simulated_labelers": 1,
        "rule_min_gap": 0.0,
        "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "report_to": "none", "lora_r": 4},
        "candidates": {"dataset_name": str(prompts), "num_candidates": 3, "max_new_tokens": 12},
        "prefs": {"test_fraction": 0.25},
        "reward": {"max_steps": 2, "per_device_train_batch_size": 4, "lora_r": 4, "report_to": "none"},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 4, "report_to": "none"},
        "eval": {"dataset_name": str(prompts), "max_prompts": 4, "max_new_tokens": 8},
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(path)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    stages = ["sft", "candidates", "label", "prefs", "reward", "dpo", "export", "eval"]
    assert [r["stage"] for r in summary["stages"]] == stages
    assert not (run / "ppo").exists()
    dpo_metrics = json.loads((run / "dpo" / "metrics.json").read_text())
    assert dpo_metrics["sft_adapter"] == str(run / "sft") and dpo_metrics["eval_pairs"] > 0
    assert summary["dpo_heldout_reward_accuracy"] == dpo_metrics["eval_rewards/accuracies"]
    exported = (run / "export" / "adapter_model.safetensors").read_bytes()
    assert exported == (run / "dpo" / "adapter_model.safetensors").read_bytes()   # export took the DPO policy
    assert summary["win_rate_vs_sft_rule"] is not None
    assert "DPO held-out reward accuracy" in capsys.readouterr().out

    # a stop_after naming the stage the other align runs is refused before anything runs
    assert main(["pipeline", "--config", str(path), "--stop_after", "ppo"]) == 2
    assert "stop_after" in capsys.readouterr().err
