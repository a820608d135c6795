"""Slow: converts the embedded SmolLM2-135M-Instruct and trains 2 SFT steps on it (`pytest -m slow`)."""

import json

import pytest

from rlhf.config import build_config
from rlhf.models import load_tokenizer, resolve_model_path
from rlhf.sft import SFTStageConfig, run_sft

pytestmark = pytest.mark.slow


def test_embedded_model_converts_and_trains(tmp_path):
    path = resolve_model_path("smollm2-135m-instruct")
    assert (tmp_path / "rlhf_home" / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert resolve_model_path("smollm2-135m-instruct") == path  # cached
    tok = load_tokenizer(path)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    cfg = build_config(
        SFTStageConfig,
        {"output_dir": str(tmp_path / "sft"), "max_steps": 2, "per_device_train_batch_size": 2,
         "max_train_samples": 4, "eval_fraction": 0.0, "max_length": 128, "report_to": "none"},
    )
    metrics = run_sft(cfg)
    assert metrics["steps"] == 2
    adapter = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == path
