import json
import math

import pytest
import torch

from rlhf.config import build_config
from rlhf.errors import DataError
from rlhf.sft import SFTStageConfig, build_trainer, run_sft
from rlhf.testing import write_jsonl

SFT_ROWS = [
    {"messages": [{"role": "user", "content": f"Say the word number {i}."}, {"role": "assistant", "content": f"Word {i}."}]}
    for i in range(24)
]


@pytest.fixture
def sft_data(tmp_path):
    return str(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS))


def make_cfg(tiny_model_dir, sft_data, tmp_path, **overrides):
    values = dict(
        model_name_or_path=tiny_model_dir,
        dataset_name=sft_data,
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        eval_fraction=0.0,
        report_to="none",
        lora_r=4,
        lora_alpha=8,
        num_virtual_tokens=4,
        freeze_trainable_layers=1,
    )
    values.update(overrides)
    return build_config(SFTStageConfig, values)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "full", "freeze", "prompt_tuning", "prefix_tuning", "loreft"])
def test_trainable_parameters_change_frozen_do_not(method, tiny_model_dir, sft_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, method=method)
    trainer = build_trainer(cfg, tmp_path / "work")
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    before = snapshot(model)
    trainer.train()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in trainable:
            assert changed, f"{method}: trainable {name} did not change"
        else:
            assert not changed, f"{method}: frozen {name} changed"
    frozen = set(before) - trainable
    if method == "full":
        assert not frozen
    elif method == "freeze":
        assert any(".layers.1." in n for n in trainable) and not any(".layers.0." in n for n in trainable)
        assert any("lm_head" in n for n in trainable) and any("embed_tokens" in n for n in frozen)
    elif method == "loreft":
        assert all(n.startswith("reft_interventions.") for n in trainable)
    else:  # adapters: every base weight is frozen
        assert all(("lora_" in n or "prompt_encoder" in n) for n in trainable)


def test_lora_export_reload_reproduces_logits(tiny_model_dir, sft_data, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path)
    trainer = build_trainer(cfg, tmp_path / "work")
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    ids = torch.randint(0, 500, (2, 12))
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        assert (reloaded(input_ids=ids).logits - expected).abs().max() < 1e-5
        auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()  # finds the base by itself
        assert (auto(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_completion_only_masking(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "one.jsonl",
        [{"prompt": "What is two plus two?", "completion": "Four."}] * 4,
    )
    cfg = make_cfg(tiny_model_dir, str(data), tmp_path)
    trainer = build_trainer(cfg, tmp_path / "work")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokenizer = trainer.processing_class
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    full = tokenizer.decode(ids)
    assert full.startswith("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    # labels keep exactly the completion tokens (answer + end-of-turn), everything before is -100
    kept = ids[labels != -100]
    assert tokenizer.decode(kept).startswith("Four.<|im_end|>")
    first_kept = int((labels != -100).nonzero()[0])
    assert tokenizer.decode(ids[:first_kept]).endswith("<|im_start|>assistant\n")


def test_run_sft_writes_output_dir(tiny_model_dir, sft_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, eval_fraction=0.25, eval_steps=1)
    metrics = run_sft(cfg)
    out = tmp_path / "out"
    for name in ["adapter_config.json", "adapter_model.safetensors", "run_config.yaml", "metrics.json", "tokenizer.json"]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert saved["tokens_seen"] > 0 and saved["trainable_parameters"] < saved["total_parameters"]
    assert (out / "logs" / "metrics.jsonl").read_text().strip()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)
    assert not (tmp_path / "out.incomplete").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_on_a_cpu(tiny_model_dir, sft_data, tmp_path, precision):
    """transformers refuses bf16 without a GPU unless the run is marked as a CPU run: the stage marks it."""
    from safetensors.torch import load_file

    metrics = run_sft(make_cfg(tiny_model_dir, sft_data, tmp_path, precision=precision))
    assert math.isfinite(metrics["train_loss"])
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    lora_b = [t for name, t in saved.items() if "lora_B" in name]
    assert lora_b and all(t.dtype == torch.float32 for t in lora_b)     # the adapter is kept in fp32
    assert any(t.abs().sum() > 0 for t in lora_b)                       # and trained (B starts at zero)


def test_early_stopping_stops(tiny_model_dir, sft_data, tmp_path):
    cfg = make_cfg(
        tiny_model_dir, sft_data, tmp_path, max_steps=40, eval_fraction=0.25, eval_steps=1,
        early_stopping_patience=1, learning_rate=5.0,
    )
    metrics = run_sft(cfg)
    assert metrics["steps"] < 40


def test_time_budget_stops_after_the_step_that_used_it(tiny_model_dir, sft_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, max_steps=40, max_train_seconds=1e-6, train_clock="cpu")
    metrics = run_sft(cfg)
    assert metrics["steps"] == 1 and metrics["stopped_by_time_budget"] is True
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_run_that_reaches_max_steps_was_not_stopped_by_its_time_budget(tiny_model_dir, sft_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, max_steps=1, max_train_seconds=1e-6, train_clock="cpu")
    metrics = run_sft(cfg)
    assert metrics["steps"] == 1 and metrics["stopped_by_time_budget"] is False


def test_bad_dataset_leaves_nothing(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no messages here"}])
    cfg = make_cfg(tiny_model_dir, str(bad), tmp_path)
    with pytest.raises(DataError, match="messages"):
        run_sft(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_loreft_starts_as_identity_and_reloads(tiny_model_dir, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_model
    from rlhf.reft import save_reft

    ids = torch.randint(0, 500, (2, 10))
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, method="loreft", reft_layers=[0, -1], reft_rank=2)
    trainer = build_trainer(cfg, tmp_path / "work")
    with torch.no_grad():  # W = R, b = 0 at initialisation: the edit is zero
        assert (trainer.model(input_ids=ids).logits - base_logits).abs().max() < 1e-5
    trainer.train()
    with torch.no_grad():
        trained = trainer.model.eval()(input_ids=ids).logits
    assert (trained - base_logits).abs().max() > 1e-4
    save_reft(trainer.model, tmp_path / "saved")
    reloaded = load_model(tiny_model_dir, adapter=str(tmp_path / "saved"))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - trained).abs().max() < 1e-5
    metrics = run_sft(cfg)
    assert metrics["method"] == "loreft" and (tmp_path / "out" / "reft_config.json").is_file()


def test_loreft_runs_on_a_half_precision_model_with_its_edits_in_fp32(tiny_model_dir, sft_data, tmp_path):
    from rlhf.models import load_model
    from rlhf.reft import save_reft

    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, method="loreft", reft_layers=[0, -1], reft_rank=2)
    trainer = build_trainer(cfg, tmp_path / "work")
    trainer.train()
    save_reft(trainer.model, tmp_path / "saved")
    ids = torch.randint(0, 500, (2, 10))
    full = load_model(tiny_model_dir, adapter=str(tmp_path / "saved"), dtype=torch.float32)
    half = load_model(tiny_model_dir, adapter=str(tmp_path / "saved"), dtype=torch.bfloat16)
    assert {p.dtype for p in half.reft_interventions.parameters()} == {torch.float32}  # no bf16 Householder kernel
    with torch.no_grad():  # outside autocast, as generation and evaluation run
        want, got = full(input_ids=ids).logits, half(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("on", [True, False])
def test_gradient_checkpointing_reaches_the_trainer_without_a_deprecation_warning(tiny_model_dir, sft_data, tmp_path,
                                                                                  on):
    import warnings

    from trl import SFTConfig

    from rlhf.hf_trainer import trainer_kwargs

    cfg = make_cfg(tiny_model_dir, sft_data, tmp_path, gradient_checkpointing=on)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTConfig(**trainer_kwargs(cfg, str(tmp_path / "trainer"), has_eval=False))
    assert args.gradient_checkpointing is on  # the name TRL and transformers' Trainer read


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_freeze_trains_the_top_blocks_the_final_norm_and_the_head_whatever_their_names(family):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from rlhf.sft import freeze_lower_layers

    if family == "gpt2":  # blocks transformer.h, final norm transformer.ln_f
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
        final, top, low = model.transformer.ln_f, model.transformer.h[-1], model.transformer.h[0]
    else:  # blocks model.layers, final norm model.norm
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
        final, top, low = model.model.norm, model.model.layers[-1], model.model.layers[0]
    freeze_lower_layers(model, 1)
    assert all(p.requires_grad for m in (final, top, model.get_output_embeddings()) for p in m.parameters())
    assert not any(p.requires_grad for p in low.parameters())
