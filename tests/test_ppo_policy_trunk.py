"""PPO's ``lora_top_layers``: the policy trains its top blocks only, and its frozen lower blocks (equal to
the reference's) run once per rollout for the log-prob, reference and training passes."""
import re

import pytest
import torch

from rlhf.models import lora_config
from rlhf.ppo.adapters import build_actor_critic
from rlhf.ppo.policy import POLICY, REFERENCE
from rlhf.ppo.rollout import collect_rollout
from rlhf.ppo.scorers import TokenCountScorer
from rlhf.ppo.stage import run_ppo
from test_ppo_stage import Capture, make_sft_adapter, ppo_config

BLOCK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _block(name: str) -> int | None:
    found = re.search(r"layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _actor(tiny_model_dir, sft_adapter=None, top_layers=1):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = len(base.model.layers)
    actor = build_actor_critic(base, sft_adapter=sft_adapter, value_model="none",
                               lora=lora_config(4, 8, 0.0, ["all-linear"], top_layers=top_layers, num_layers=n))
    with torch.no_grad():   # a policy that differs from the reference in the trained blocks
        for name, p in actor.peft.named_parameters():
            if f".{POLICY}." in name and "lora_B" in name and _block(name) == n - 1:
                p.normal_(0, 0.3)
    actor.freeze_policy_below(top_layers)
    return actor


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [3, 7, 11, 13, 17, 19, 23, 29]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("with_sft", [True, False])
def test_split_passes_equal_the_full_passes_and_skip_the_lower_blocks(tiny_model_dir, tmp_path, with_sft):
    sft = str(make_sft_adapter(tiny_model_dir, tmp_path / "sft")) if with_sft else None
    actor = _actor(tiny_model_dir, sft_adapter=sft)
    assert actor.policy_skip == 1
    ids, mask = _batch()
    resp = ids[:, 4:]
    full = actor.policy_forward(ids, mask, resp, 0.8)["logprobs"]
    ref_full = actor.reference_logprobs(ids, mask, resp, 0.8)
    trunk = actor.policy_trunk(ids, mask)
    calls = []
    hook = actor.decoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    split = actor.policy_forward(ids, mask, resp, 0.8, trunk=trunk)["logprobs"]
    ref_split = actor.reference_logprobs(ids, mask, resp, 0.8, policy_trunk=trunk)
    hook.remove()
    assert calls == []                                    # block 0 ran once, for the trunk
    keep = mask[:, 4:].bool()
    assert (full - ref_full)[keep].abs().max() > 1e-3     # policy and reference differ (top block)
    assert torch.allclose(split[keep], full[keep], atol=1e-5)
    assert torch.allclose(ref_split[keep], ref_full[keep], atol=1e-5)


def test_lower_policy_weights_are_not_trainable(tiny_model_dir, tmp_path):
    actor = _actor(tiny_model_dir, sft_adapter=str(make_sft_adapter(tiny_model_dir, tmp_path / "sft")))
    blocks = {_block(n) for n, _ in actor.named_trainable}
    assert 0 not in blocks and 1 in blocks
    frozen = [p for n, p in actor.peft.named_parameters() if f".{POLICY}." in n and _block(n) == 0]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_a_policy_whose_lower_blocks_differ_from_the_reference_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.errors import UserError

    actor = build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), value_model="none",
                               sft_adapter=str(make_sft_adapter(tiny_model_dir, tmp_path / "sft")), lora=None)
    with torch.no_grad():
        next(p for n, p in actor.peft.named_parameters() if f".{POLICY}." in n and _block(n) == 0).add_(1.0)
    with pytest.raises(UserError, match="lora_top_layers"):
        actor.freeze_policy_below(1)


def test_ppo_with_top_layers_changes_only_the_top_block_and_reloads(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, sft_adapter=str(sft), lora_top_layers=1,
                     advantage_estimator="rloo", samples_per_prompt=2)
    capture = Capture(TokenCountScorer(list(range(10, 42))))
    metrics = run_ppo(cfg, scorer=capture)
    actor = capture.actor
    assert metrics["steps"] == 2 and actor.policy_skip == 1
    params = dict(actor.peft.named_parameters())
    changed = {_block(n) for n, p in params.items() if f".{POLICY}." in n
               and not torch.equal(p, params[n.replace(f".{POLICY}.", f".{REFERENCE}.")])}
    assert changed == {1, None}            # block 0 stays the SFT LoRA; block 1 and the LM head's LoRA learnt

    # the exported adapter holds both blocks (block 0 = SFT's) and reproduces the policy's logits
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    sft_saved = load_file(str(sft / "adapter_model.safetensors"))
    block0 = [k for k in saved if _block(k) == 0]
    assert block0 and all(torch.equal(saved[k], sft_saved[k]) for k in block0)
    ids, mask = _batch()
    with actor.use(POLICY), torch.no_grad():
        expected = actor.peft(input_ids=ids, attention_mask=mask).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "run"))
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_rollout_keeps_the_policy_trunk_for_training(tiny_model_dir):
    from rlhf.models import load_tokenizer

    actor = _actor(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    prompts = [[{"role": "user", "content": t}] for t in ("Hi", "What is the capital of France?", "Name a color.")]
    torch.manual_seed(0)
    r = collect_rollout(actor, tokenizer, TokenCountScorer([5]), prompts, temperature=1.0,
                        generate_kwargs={"do_sample": True, "max_new_tokens": 5, "temperature": 1.0, "top_k": 0},
                        max_prompt_length=64, chunk=2, timings={})
    assert r.policy_trunk.shape[:2] == r.input_ids.shape and r.value_trunk is None
    r.advantages = r.returns = torch.zeros_like(r.logprobs)
    d = r.select(torch.tensor([0, 2]))
    P = d["input_ids"].shape[1] - d["response_ids"].shape[1]
    again = actor.policy_forward(d["input_ids"], d["attention_mask"], d["response_ids"], 1.0,
                                 trunk=d["policy_trunk"])["logprobs"]
    m = d["response_mask"].bool()
    assert P > 0 and torch.allclose(again[m], r.logprobs[[0, 2]][:, : m.shape[1]][m], atol=1e-5)
    again.sum().backward()                                # gradients reach the top block's LoRA only
    grads = {_block(n) for n, p in actor.peft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {1}


def test_lora_top_layers_larger_than_the_model_is_named(tiny_model_dir, tmp_path):
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_top_layers"):
        run_ppo(ppo_config(tiny_model_dir, tmp_path / "run", max_steps=1, lora_top_layers=3),
                scorer=TokenCountScorer([5]))


def test_gae_with_a_value_model_and_top_layer_policy_trains(tiny_model_dir, tmp_path):
    """Both trunks at once: the value model's (bare base) and the policy's (under the SFT reference)."""
    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, sft_adapter=str(sft), lora_top_layers=1,
                     value_lora_top_layers=1)
    capture = Capture(TokenCountScorer(list(range(10, 42))))
    metrics = run_ppo(cfg, scorer=capture)
    actor = capture.actor
    assert metrics["steps"] == 2 and actor.policy_skip == 1 and actor.value_skip == 1
    params = dict(actor.peft.named_parameters())
    lower = [n for n in params if f".{POLICY}." in n and _block(n) == 0]
    assert lower and all(torch.equal(params[n], params[n.replace(f".{POLICY}.", f".{REFERENCE}.")]) for n in lower)
