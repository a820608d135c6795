import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from rlhf.config import build_config
from rlhf.errors import UserError
from rlhf.export import ExportConfig, run_export
from rlhf.interpolate import interpolate_lora

IDS = torch.tensor([[5, 17, 42, 99, 3, 7], [11, 12, 13, 14, 15, 16]])


def make_adapter(base_dir, folder, seed, rank=4, alpha=8, init_from=None):
    """A LoRA adapter with random (non-zero) A and B, optionally starting from another adapter."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if init_from:
        model = PeftModel.from_pretrained(base, init_from, is_trainable=True)
    else:
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return str(folder)


def logits_of(base_dir, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture
def adapters(tiny_model_dir, tmp_path):
    sft = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    aligned = make_adapter(tiny_model_dir, tmp_path / "ppo", seed=2, init_from=sft)
    (tmp_path / "sft" / "run_config.yaml").write_text(
        yaml.safe_dump({"model_name_or_path": tiny_model_dir, "dataset_name": "sample:sft", "method": "lora", "lora_r": 4})
    )
    (tmp_path / "sft" / "metrics.json").write_text(json.dumps({"eval_loss": 1.25}))
    (tmp_path / "ppo" / "run_config.yaml").write_text(
        yaml.safe_dump({"model_name_or_path": tiny_model_dir, "sft_adapter": sft, "reward_model": "", "kl_coef": 0.05,
                        "dataset_name": "sample:prompts"})
    )
    (tmp_path / "ppo" / "metrics.json").write_text(json.dumps({"reward_last_steps": 0.5, "kl_last": 0.1}))
    return sft, aligned


def export(tmp_path, name, **kw):
    cfg = build_config(ExportConfig, {"out": str(tmp_path / name), **kw})
    return run_export(cfg)


def test_adapter_export_reloads_with_plain_peft(adapters, tiny_model_dir, tmp_path):
    _, aligned = adapters
    out = export(tmp_path, "a", adapter=aligned, mode="adapter")
    assert torch.allclose(logits_of(tiny_model_dir, str(out)), logits_of(tiny_model_dir, aligned), atol=1e-6)
    card = (out / "README.md").read_text()
    assert tiny_model_dir in card and "sample:sft" in card and "sample:prompts" in card
    assert "eval_loss: 1.25" in card and "kl_last: 0.1" in card and "mode: `adapter`" in card


def test_merged_export_matches_base_plus_adapter(adapters, tiny_model_dir, tmp_path):
    _, aligned = adapters
    out = export(tmp_path, "m", mode="merged", adapter=aligned)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()
    diff = (logits_of(str(out)) - logits_of(tiny_model_dir, aligned)).abs().max()
    assert diff <= 1e-4


@pytest.mark.parametrize("fmt", ["adapter", "merged"])
def test_interpolation_endpoints(adapters, tiny_model_dir, tmp_path, fmt):
    sft, aligned = adapters
    for alpha, expected in [(0.0, logits_of(tiny_model_dir, sft)), (1.0, logits_of(tiny_model_dir, aligned))]:
        out = export(tmp_path, f"i{alpha}{fmt}", adapter=aligned, mode="interpolate", alpha=alpha, interpolate_format=fmt)
        got = logits_of(tiny_model_dir, str(out)) if fmt == "adapter" else logits_of(str(out))
        assert (got - expected).abs().max() <= 1e-4, (alpha, fmt)
        assert json.loads((out / "export.json").read_text())["format"] == fmt


def test_interpolated_adapter_equals_merged_interpolation(adapters, tiny_model_dir, tmp_path):
    _, aligned = adapters
    as_adapter = export(tmp_path, "ia", adapter=aligned, mode="interpolate", alpha=0.3)
    as_merged = export(tmp_path, "im", adapter=aligned, mode="interpolate", alpha=0.3, interpolate_format="merged")
    assert json.loads((as_adapter / "export.json").read_text())["format"] == "adapter"
    assert (logits_of(tiny_model_dir, str(as_adapter)) - logits_of(str(as_merged))).abs().max() <= 1e-4


def test_interpolate_lora_hand_computed():
    # DeltaW_1 = s1 * B1 @ A1 with r=1, alpha=2 -> s1 = 2; DeltaW_2 = s2 * B2 @ A2 with r=1, alpha=1 -> s2 = 1
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [2.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0], [1.0]])
    k = "m.lora_A.weight", "m.lora_B.weight"
    state, rank = interpolate_lora([
        (0.25, {k[0]: a1, k[1]: b1}, {"lora_alpha": 2}),
        (0.75, {k[0]: a2, k[1]: b2}, {"lora_alpha": 1}),
    ])
    # 0.25 * 2 * [[1,0],[2,0]] + 0.75 * 1 * [[0,3],[0,1]] = [[0.5, 2.25], [1.0, 0.75]]
    assert rank == 2
    assert torch.allclose(state[k[1]] @ state[k[0]], torch.tensor([[0.5, 2.25], [1.0, 0.75]]))


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        export(tmp_path, "x", adapter=str(tmp_path))
    assert not (tmp_path / "x").exists()
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="alpha"):
        build_config(ExportConfig, {"adapter": "a", "alpha": 1.5})


# WiSE-FT: --from base|sft, adapters and full models


def hand_mixed_logits(start_model, tuned_model, alpha):
    """Logits of (1 - alpha) * start + alpha * tuned, mixed here parameter by parameter."""
    start = dict(start_model.named_parameters())
    with torch.no_grad():
        for name, p in tuned_model.named_parameters():
            p.copy_((1 - alpha) * start[name] + alpha * p)
        return tuned_model.eval()(input_ids=IDS).logits


def merged(base_dir, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload() if adapter else model


def test_from_base_scales_the_lora_exactly(adapters, tiny_model_dir, tmp_path):
    _, aligned = adapters
    for alpha, expected in [(0.0, logits_of(tiny_model_dir)), (1.0, logits_of(tiny_model_dir, aligned)),
                            (0.5, hand_mixed_logits(merged(tiny_model_dir), merged(tiny_model_dir, aligned), 0.5))]:
        out = export(tmp_path, f"b{alpha}", adapter=aligned, mode="interpolate", alpha=alpha, from_="base")
        info = json.loads((out / "export.json").read_text())
        assert info["format"] == "adapter" and info["from"] == "base" and info["alpha"] == alpha
        # same rank and config as the source adapter: only the B matrices are scaled
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
        assert (logits_of(tiny_model_dir, str(out)) - expected).abs().max() <= 1e-5, alpha
    assert "from: `base`" in (out / "README.md").read_text()


def test_from_sft_half_matches_hand_mixed_weights(adapters, tiny_model_dir, tmp_path):
    sft, aligned = adapters
    expected = hand_mixed_logits(merged(tiny_model_dir, sft), merged(tiny_model_dir, aligned), 0.5)
    out = export(tmp_path, "s", adapter=aligned, mode="interpolate", alpha=0.5, from_="sft", sft_adapter=sft)
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "adapter" and info["from"] == "sft"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # r_sft + r_policy
    assert (logits_of(tiny_model_dir, str(out)) - expected).abs().max() <= 1e-5


def test_from_sft_with_other_targets_is_written_merged(tiny_model_dir, tmp_path):
    sft = make_adapter(tiny_model_dir, tmp_path / "sft", seed=3, rank=2)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(4)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg).save_pretrained(tmp_path / "other")
    expected = hand_mixed_logits(merged(tiny_model_dir, sft), merged(tiny_model_dir, str(tmp_path / "other")), 0.25)
    out = export(tmp_path, "o", adapter=str(tmp_path / "other"), mode="interpolate", alpha=0.25, from_="sft",
                 sft_adapter=sft)
    assert json.loads((out / "export.json").read_text())["format"] == "merged"
    assert (logits_of(str(out)) - expected).abs().max() <= 1e-4


@pytest.fixture
def full_model(tiny_model_dir, tmp_path):
    """A full fine-tuned model folder (every weight moved), recording its base like `rlhf sft --method full`."""
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "full"
    model.save_pretrained(folder)
    (folder / "run_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": tiny_model_dir, "method": "full"}))
    return str(folder)


def test_full_model_interpolation_mixes_every_tensor(full_model, tiny_model_dir, tmp_path):
    base_model, tuned_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir), merged(full_model)
    for alpha, expected in [(0.0, logits_of(tiny_model_dir)), (1.0, logits_of(full_model))]:
        out = export(tmp_path, f"f{alpha}", adapter=full_model, mode="interpolate", alpha=alpha, from_="base")
        assert (logits_of(str(out)) - expected).abs().max() <= 1e-5, alpha
    out = export(tmp_path, "fh", adapter=full_model, mode="interpolate", alpha=0.5)  # base is the default start
    assert json.loads((out / "export.json").read_text())["format"] == "merged"
    got = dict(AutoModelForCausalLM.from_pretrained(str(out)).named_parameters())
    base = dict(base_model.named_parameters())
    for name, p in tuned_model.named_parameters():
        assert torch.allclose(got[name], 0.5 * base[name] + 0.5 * p, atol=1e-6), name
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()


def test_full_model_from_sft_adapter_and_other_architecture(full_model, adapters, tiny_model_dir, tmp_path):
    sft, _ = adapters
    expected = hand_mixed_logits(merged(tiny_model_dir, sft), merged(full_model), 0.5)
    out = export(tmp_path, "fs", adapter=full_model, mode="interpolate", alpha=0.5, from_="sft", sft_adapter=sft)
    assert (logits_of(str(out)) - expected).abs().max() <= 1e-4
    from rlhf.testing import build_tiny_model

    other = str(build_tiny_model(tmp_path / "wide", hidden_size=48))
    with pytest.raises(UserError, match="not the model .* was fine-tuned from"):
        export(tmp_path, "fx", adapter=full_model, mode="interpolate", from_="sft", sft_adapter=other)
    assert not (tmp_path / "fx").exists()


def test_from_base_keeps_rslora_and_alpha_patterns(tiny_model_dir, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"v_proj": 2}, rank_pattern={"q_proj": 2},
                     target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # fmt: skip
    torch.manual_seed(6)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg).save_pretrained(tmp_path / "pat")
    adapter = str(tmp_path / "pat")
    expected = hand_mixed_logits(merged(tiny_model_dir), merged(tiny_model_dir, adapter), 0.3)
    out = export(tmp_path, "p", adapter=adapter, mode="interpolate", alpha=0.3, from_="base")
    written = json.loads((out / "adapter_config.json").read_text())
    assert json.loads((out / "export.json").read_text())["format"] == "adapter"
    assert written["use_rslora"] and written["alpha_pattern"] == {"v_proj": 2}
    assert (logits_of(tiny_model_dir, str(out)) - expected).abs().max() <= 1e-5


def test_cli_spells_it_from(adapters, tiny_model_dir, tmp_path):
    from rlhf.cli import main

    _, aligned = adapters
    out = tmp_path / "cli"
    assert main(["export", "--adapter", aligned, "--mode", "interpolate", "--from", "base", "--alpha", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "export.json").read_text())["from"] == "base"
    assert (logits_of(tiny_model_dir, str(out)) - logits_of(tiny_model_dir)).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["merged", "interpolate"])
def test_a_lora_on_a_tied_output_projection_merges_without_changing_the_input_embeddings(tiny_model_dir, tmp_path,
                                                                                        mode):  # fmt: skip
    import shutil

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)  # the tokenizer; the weights follow, with one matrix for both ends
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    source.config.tie_word_embeddings = True
    source.lm_head.weight = source.model.embed_tokens.weight
    source.save_pretrained(tied)
    base = AutoModelForCausalLM.from_pretrained(tied)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                            init_lora_weights=False))  # fmt: skip
    model.save_pretrained(tmp_path / "adapter")
    extra = {"from_": "base", "alpha": 1.0, "interpolate_format": "merged"} if mode == "interpolate" else {}
    export(tmp_path, mode, adapter=str(tmp_path / "adapter"), mode=mode, **extra)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / mode)
    assert torch.equal(merged.model.embed_tokens.weight, AutoModelForCausalLM.from_pretrained(tied).lm_head.weight)
    got, want = logits_of(str(tmp_path / mode)), logits_of(str(tied), str(tmp_path / "adapter"))
    assert (got - want).abs().max() < 1e-4


def test_the_model_card_names_each_stage_by_what_wrote_it(tmp_path):
    from reward.train import RewardStageConfig
    from rlhf.config import save_config
    from rlhf.dpo import DPOStageConfig
    from rlhf.lineage import read_stage, stage_name
    from rlhf.ppo.config import PPOStageConfig
    from rlhf.sft import SFTStageConfig

    names = {}
    for folder, cfg in {"s": SFTStageConfig(), "r": RewardStageConfig(), "p": PPOStageConfig(),
                        "d": DPOStageConfig()}.items():  # fmt: skip
        (tmp_path / folder).mkdir()
        save_config(cfg, tmp_path / folder / "run_config.yaml")
        names[folder] = stage_name(read_stage(tmp_path / folder))
    assert names == {"s": "SFT", "r": "Reward model", "p": "PPO", "d": "DPO"}
