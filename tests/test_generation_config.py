"""Sampling uses only the settings the caller passes (not the penalties in a model's generation_config), and samples
prompt-learning adapters from the model they train."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.generation import SamplingSettings, encode_prompts, plain_generation_config, sample_batch
from rlhf.models import load_tokenizer, lora_config
from rlhf.ppo.adapters import build_actor_critic

PROMPTS = ["Name a colour.", "Count to three, please."]


def _greedy_by_hand(model, ids, mask, steps):
    """argmax of the model's own logits, one token at a time (no cache, no processors)."""
    out = ids
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=out, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        out, mask = torch.cat([out, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return out[:, ids.shape[1]:]


def _penalised(model):
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 6
    return model


def test_sample_batch_ignores_the_models_generation_penalties(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    model = _penalised(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    enc = encode_prompts(tok, PROMPTS, torch.device("cpu"))
    with torch.no_grad():
        expected = _greedy_by_hand(model, enc["input_ids"], enc["attention_mask"], 6)
        # the model's own config changes what plain generate returns (the test would not see a leak otherwise)
        leaked = model.generate(**enc, do_sample=False, max_new_tokens=6, eos_token_id=-1,
                                pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    assert not torch.equal(leaked, expected)
    model.generation_config.eos_token_id = None  # no early stop: compare all 6 tokens
    _, _, got = sample_batch(model, tok, PROMPTS, SamplingSettings(max_new_tokens=6, do_sample=False))
    assert torch.equal(got, expected)
    assert model.generation_config.repetition_penalty == 50.0  # restored afterwards


def test_rollout_sampling_ignores_the_models_generation_penalties(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    base = _penalised(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    actor = build_actor_critic(base, sft_adapter=None, lora=lora_config(4, 8, 0.0, ["all-linear"]))
    enc = encode_prompts(tok, PROMPTS, torch.device("cpu"))
    with torch.no_grad(), actor.use("policy"):
        expected = _greedy_by_hand(actor.peft, enc["input_ids"], enc["attention_mask"], 6)
    got = actor.generate(enc["input_ids"], enc["attention_mask"], {"do_sample": False, "max_new_tokens": 6},
                         pad_token_id=tok.pad_token_id, eos_token_id=-1)
    assert torch.equal(got, expected)
    assert base.generation_config.no_repeat_ngram_size == 1


def test_plain_config_keeps_only_special_token_ids(tiny_model_dir):
    model = _penalised(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    eos = model.generation_config.eos_token_id
    with plain_generation_config(model):
        cfg = model.generation_config
        assert cfg.repetition_penalty is None and cfg.no_repeat_ngram_size is None and cfg.min_new_tokens is None
        assert cfg.eos_token_id == eos
    assert model.generation_config.min_new_tokens == 6


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_adapters_are_sampled_from_the_model_they_train(tiny_model_dir, method):
    """PEFT 0.21's generate left the virtual tokens out of its cached steps (0.22 does not); sample_batch decodes
    by whole passes with any version. The check: each greedy token is the argmax of one plain forward pass over that
    prompt alone and the answer so far, the pass training makes."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from rlhf.generation import response_log_dists

    kind = PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           kind(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # virtual tokens far from their initialisation
    prompt_ids, prompt_mask, got = sample_batch(model, tok, PROMPTS, SamplingSettings(6, do_sample=False))
    assert prompt_mask[0].sum() < prompt_mask.shape[1]  # the shorter prompt is left-padded in the batch
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            alone = encode_prompts(tok, [prompt], torch.device("cpu"))["input_ids"]
            answer = got[row : row + 1]
            answer = answer[:, : int((answer != tok.pad_token_id).sum())]  # up to its end
            logits = model(input_ids=torch.cat([alone, answer], dim=1)).logits[0, -answer.shape[1] - 1 : -1]
            assert torch.equal(logits.argmax(-1), answer[0])
        dists = response_log_dists(model, prompt_ids, prompt_mask, got, torch.ones_like(got))
    assert dists.shape == (*got.shape, model.get_output_embeddings().weight.shape[0])
