"""Bottleneck adapters (`rlhf sft --method bottleneck_adapter`): the module, placement, training, reload, refusals."""

import json

import pytest
import torch

from rlhf.bottleneck import Bottleneck, attach_bottleneck
from rlhf.config import build_config
from rlhf.errors import ConfigError, UserError
from rlhf.sft import SFTStageConfig, build_trainer, run_sft
from rlhf.testing import write_jsonl

SFT_ROWS = [
    {"messages": [{"role": "user", "content": f"Say the word number {i}."}, {"role": "assistant", "content": f"Word {i}."}]}
    for i in range(16)
]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61], [11, 12, 13, 14, 15, 16, 17, 18]])


def sft_cfg(tiny_model_dir, tmp_path, **overrides):
    values = dict(
        model_name_or_path=str(tiny_model_dir),
        dataset_name=str(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)),
        output_dir=str(tmp_path / "out"),
        method="bottleneck_adapter",
        adapter_reduction_factor=8,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        eval_fraction=0.0,
        report_to="none",
    )
    values.update(overrides)
    return build_config(SFTStageConfig, values)


def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """(rlhf sft output folder, logits of the trained model in memory)."""
    from rlhf.hooked import attached_adapter

    tmp = tmp_path_factory.mktemp("bottleneck")
    cfg = sft_cfg(tiny_model_dir, tmp)
    trainer = build_trainer(cfg, tmp / "work")
    trainer.train()
    attached_adapter(trainer.model).save(tmp / "saved")
    return tmp / "saved", logits(trainer.model.eval())


def test_bottleneck_forward_by_hand():
    adapter = Bottleneck(4, 4 // 2, "relu")  # d = 4, reduction 2: m = 2
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(adapter(h), h)  # W_up = 0, b_up = 0: the identity at initialisation
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        adapter.down.bias.copy_(torch.tensor([0.0, -1.0]))
        adapter.up.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]))
        adapter.up.bias.copy_(torch.tensor([0.5, 0.0, 0.0, -1.0]))
    # row 1: down h + b = (1 - 3, 2 + 4 - 1) = (-2, 5); relu -> (0, 5); up -> (0, 10, 5, 0) + b_up = (0.5, 10, 5, -1)
    # row 2: down h + b = (0, -1); relu -> (0, 0); up -> b_up = (0.5, 0, 0, -1)
    expected = torch.tensor([[1.5, 12.0, 8.0, 3.0], [0.5, 0.0, 0.0, -1.0]])
    assert torch.equal(adapter(h), expected)


@pytest.mark.parametrize("placement, sublayers", [("attention", ["self_attn"]), ("mlp", ["mlp"]),
                                                  ("both", ["self_attn", "mlp"])])  # fmt: skip
def test_placement_puts_one_adapter_per_block_and_sublayer(placement, sublayers, tiny_model_dir):
    model = base_model(tiny_model_dir)
    adapters = attach_bottleneck(model, 16, placement, "gelu")  # hidden 32 / 16: width 2
    blocks = model.model.layers
    assert len(adapters) == len(blocks) * len(sublayers) == sum(
        len(getattr(block, name)._forward_hooks) for block in blocks for name in ("self_attn", "mlp")
    )
    for block in blocks:
        assert all(len(getattr(block, name)._forward_hooks) == (name in sublayers) for name in ("self_attn", "mlp"))
        assert not block._forward_hooks
    per_adapter = 32 * 2 + 2 + 2 * 32 + 32  # W_down, b_down, W_up, b_up
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == len(adapters) * per_adapter
    assert all(n.startswith("bottleneck_adapters.") for n in trainable)
    assert isinstance(adapters["0_" + ("attention" if placement == "attention" else "mlp")].act, torch.nn.GELU)


def test_reduction_factor_wider_than_the_model_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="'adapter_reduction_factor' is 64"):
        attach_bottleneck(base_model(tiny_model_dir), 64, "mlp", "relu")
    with pytest.raises(ConfigError, match="'adapter_reduction_factor' must be >= 1"):
        build_config(SFTStageConfig, {"method": "bottleneck_adapter", "adapter_reduction_factor": 0})


def test_sft_trains_only_the_adapters_and_reload_reproduces_logits(tiny_model_dir, trained, tmp_path):
    from rlhf.models import load_model

    base = base_model(tiny_model_dir)
    base_logits = logits(base)
    trainer = build_trainer(sft_cfg(tiny_model_dir, tmp_path), tmp_path / "work")
    model = trainer.model
    assert torch.equal(logits(model.eval()), base_logits)  # up = 0: the untrained adapters change nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("bottleneck_adapters.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param.detach()) != (name in trainable), name
    for name, param in base.named_parameters():  # the base stays byte-identical to the saved model
        assert torch.equal(param, model.get_parameter(name)), name
    after = logits(model.eval())
    assert (after - base_logits).abs().max() > 1e-3  # the trained adapters change the outputs
    folder, trained_logits = trained
    reloaded = load_model(str(tiny_model_dir), adapter=str(folder), dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(logits(reloaded), trained_logits)


def test_run_sft_folder_is_loaded_by_generate_eval_and_export(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf import evaluate
    from rlhf.evaluate import EvalConfig, run_eval
    from rlhf.export import ExportConfig, run_export
    from rlhf.generate import GenerateConfig, run_generate
    from rlhf.models import load_model

    metrics = run_sft(sft_cfg(tiny_model_dir, tmp_path, adapter_placement="both", adapter_non_linearity="silu"))
    out = tmp_path / "out"
    assert metrics["method"] == "bottleneck_adapter" and metrics["trainable_parameters"] == 2 * 2 * (32 * 4 * 2 + 4 + 32)
    assert {p.name for p in out.iterdir()} >= {"bottleneck_config.json", "bottleneck_adapter.safetensors",
                                               "tokenizer.json", "run_config.yaml", "metrics.json"}  # fmt: skip
    assert not (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    config = json.loads((out / "bottleneck_config.json").read_text())
    assert config == {"adapter_type": "bottleneck_adapter", "reduction_factor": 8, "placement": "both",
                      "non_linearity": "silu", "hidden_size": 32, "bottleneck_size": 4, "num_layers": 2,
                      "base_model_name_or_path": str(tiny_model_dir)}  # fmt: skip

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "Say the word number 3."}])
    rows = run_generate(build_config(GenerateConfig, {
        "model_name_or_path": str(tiny_model_dir), "adapter": str(out), "dataset_name": str(prompts),
        "out": str(tmp_path / "gen.jsonl"), "max_new_tokens": 4, "do_sample": False}))  # fmt: skip
    assert len(rows) == 2
    monkeypatch.setattr(evaluate, "load_rule", lambda name: lambda prompt, response: 0.0)
    result = run_eval(build_config(EvalConfig, {
        "policy": str(out), "baseline": "base", "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(prompts), "rule": "x", "out_dir": str(tmp_path / "eval"), "max_new_tokens": 4}))  # fmt: skip
    assert result["kl_policy_to_baseline"] > 0  # the policy is the base with the trained adapters on

    run_export(build_config(ExportConfig, {"adapter": str(out), "mode": "adapter", "out": str(tmp_path / "exp")}))
    exported = json.loads((tmp_path / "exp" / "bottleneck_config.json").read_text())
    assert exported == config and (tmp_path / "exp" / "README.md").is_file()
    cpu = dict(dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(logits(load_model(str(tiny_model_dir), str(tmp_path / "exp"), **cpu)),
                       logits(load_model(str(tiny_model_dir), str(out), **cpu)))  # fmt: skip


def test_a_base_of_another_shape_is_refused(trained, tmp_path):
    from rlhf.models import load_model
    from rlhf.testing import build_tiny_model

    other = build_tiny_model(tmp_path / "wide", hidden_size=64)
    with pytest.raises(UserError, match="made for a base with hidden size 32 and 2 blocks, this base has 64 and 2"):
        load_model(str(other), adapter=str(trained[0]))


def unsupported_commands(folder, tiny_model_dir, tmp_path):
    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}]))
    prefs = str(write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 4))
    common = ["--model_name_or_path", str(tiny_model_dir)]
    return {
        "ppo": ["ppo", *common, "--sft_adapter", folder, "--reward_model", "rule", "--dataset_name", prompts,
                "--output_dir", str(tmp_path / "ppo")],
        "reward": ["reward", *common, "--sft_adapter", folder, "--dataset_name", prefs,
                   "--output_dir", str(tmp_path / "rm")],
        "dpo": ["dpo", *common, "--sft_adapter", folder, "--dataset_name", prefs, "--output_dir", str(tmp_path / "dpo")],
        "export merged": ["export", "--adapter", folder, "--mode", "merged", "--out", str(tmp_path / "m")],
        "export interpolate": ["export", "--adapter", folder, "--mode", "interpolate", "--from", "base",
                               "--out", str(tmp_path / "i")],
    }  # fmt: skip


def test_unsupported_uses_are_one_line_errors(trained, tiny_model_dir, tmp_path, capsys):
    from rlhf.cli import main
    from rlhf.models import load_model

    folder = str(trained[0])
    for name, argv in unsupported_commands(folder, tiny_model_dir, tmp_path).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (name, err)
        assert "bottleneck_adapter" in err, (name, err)
        assert ("--mode adapter" if name.startswith("export") else "--method lora") in err, (name, err)
    with pytest.raises(UserError, match="bottleneck_adapter adapter: it cannot be merged"):
        load_model(str(tiny_model_dir), adapter=folder, merge=True)
