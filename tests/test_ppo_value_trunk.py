"""A value adapter on the top blocks only: the lower blocks run once per rollout, with the same values."""
import re

import pytest
import torch

from rlhf.models import block_range, lora_config, untouched_blocks
from rlhf.ppo.adapters import build_actor_critic
from rlhf.ppo.policy import VALUE
from rlhf.ppo.rollout import collect_rollout
from rlhf.ppo.scorers import TokenCountScorer
from rlhf.ppo.stage import run_ppo
from test_ppo_policy import train_tiny_reward_model
from test_ppo_stage import Capture, make_sft_adapter, ppo_config

BLOCK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _actor(tiny_model_dir, top_layers=None, sft_adapter=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    actor = build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter=sft_adapter,
                               lora=lora_config(4, 8, 0.0, ["all-linear"]))
    extra = {"layers_to_transform": top_layers} if top_layers is not None else {}
    actor.add_value_adapter(lora_config(4, 8, 0.0, BLOCK_TARGETS, **extra))
    with torch.no_grad():   # a non-zero value LoRA and head, so the check compares real outputs
        for name, p in actor.peft.named_parameters():
            if f".{VALUE}." in name:
                p.normal_(0, 0.3)
        actor.value_head.weight.normal_(0, 1.0)
    return actor


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [3, 7, 11, 13, 17, 19, 23, 29]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_untouched_blocks_counts_the_lowest_blocks_without_the_adapter(tiny_model_dir):
    assert _actor(tiny_model_dir, top_layers=[1]).value_skip == 1
    actor = _actor(tiny_model_dir)
    assert actor.value_skip == 0
    assert untouched_blocks(actor.decoder, VALUE) == 0
    assert untouched_blocks(actor.decoder, "no-such-adapter") == len(actor.decoder.layers)


def test_block_range_restores_the_decoder(tiny_model_dir):
    actor = _actor(tiny_model_dir, top_layers=[1])
    layers, norm = actor.decoder.layers, actor.decoder.norm
    with pytest.raises(RuntimeError):
        with block_range(actor.decoder, 0, 1):
            assert len(actor.decoder.layers) == 1 and isinstance(actor.decoder.norm, torch.nn.Identity)
            raise RuntimeError
    assert actor.decoder.layers is layers and actor.decoder.norm is norm


def test_split_value_pass_equals_the_full_pass(tiny_model_dir):
    actor = _actor(tiny_model_dir, top_layers=[1])
    ids, mask = _batch()
    split = actor.value_forward(ids, mask, 4)                                    # trunk computed inside
    reused = actor.value_forward(ids, mask, 4, trunk=actor.value_trunk(ids, mask))
    actor.value_skip = 0
    full = actor.value_forward(ids, mask, 4)                                     # all blocks, value adapter on
    assert split.shape == full.shape == (2, 4)
    keep = mask[:, 3:-1].bool()                                                  # positions that are real tokens
    assert full[keep].abs().max() > 1e-3
    assert torch.allclose(split[keep], full[keep], atol=1e-5)
    assert torch.equal(split, reused)


def test_bare_reference_reuses_the_trunk(tiny_model_dir):
    """Without an SFT adapter the reference is the bare base: its lower blocks are the trunk, not run again."""
    actor = _actor(tiny_model_dir, top_layers=[1])
    assert actor.reference_uses_trunk
    ids, mask = _batch()
    resp = ids[:, 4:]
    full = actor.reference_logprobs(ids, mask, resp, 0.8)
    trunk = actor.value_trunk(ids, mask)
    calls = []
    hook = actor.decoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    shared = actor.reference_logprobs(ids, mask, resp, 0.8, trunk=trunk)
    hook.remove()
    assert calls == []
    keep = mask[:, 4:].bool()
    assert torch.allclose(shared[keep], full[keep], atol=1e-5)
    assert not _actor(tiny_model_dir).reference_uses_trunk          # value LoRA on every block: no trunk


def test_sft_reference_on_every_block_ignores_the_trunk(tiny_model_dir, tmp_path):
    actor = _actor(tiny_model_dir, top_layers=[1], sft_adapter=str(make_sft_adapter(tiny_model_dir, tmp_path / "sft")))
    assert actor.value_skip == 1 and not actor.reference_uses_trunk  # the SFT LoRA adapts block 0
    ids, mask = _batch()
    resp = ids[:, 4:]
    full = actor.reference_logprobs(ids, mask, resp, 0.8)
    given = actor.reference_logprobs(ids, mask, resp, 0.8, trunk=actor.value_trunk(ids, mask))
    assert torch.equal(full, given)
    actor.reference_uses_trunk = True                                  # forcing it would be wrong: the check bites
    keep = mask[:, 4:].bool()
    assert (actor.reference_logprobs(ids, mask, resp, 0.8, trunk=actor.value_trunk(ids, mask)) - full)[keep].abs().max() > 1e-4


def test_training_value_pass_skips_the_lower_blocks_and_gets_gradients(tiny_model_dir):
    actor = _actor(tiny_model_dir, top_layers=[1])
    ids, mask = _batch()
    trunk = actor.value_trunk(ids, mask)
    assert not trunk.requires_grad
    calls = []
    hook = actor.decoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    values = actor.value_forward(ids, mask, 4, trunk=trunk)
    hook.remove()
    assert calls == []                                   # block 0 was not run again
    values.sum().backward()
    grads = {n: p.grad for n, p in actor.peft.named_parameters() if f".{VALUE}." in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert actor.value_head.weight.grad.abs().sum() > 0


def test_rollout_keeps_the_trunk_and_ppo_trains_with_it(tiny_model_dir, tmp_path):
    actor = _actor(tiny_model_dir, top_layers=[1])
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    prompts = [[{"role": "user", "content": t}] for t in ("Hi", "What is the capital of France?", "Name a color.")]
    torch.manual_seed(0)
    r = collect_rollout(actor, tokenizer, TokenCountScorer([5]), prompts, temperature=1.0,
                        generate_kwargs={"do_sample": True, "max_new_tokens": 5, "temperature": 1.0, "top_k": 0},
                        max_prompt_length=64, chunk=2, timings={})
    assert r.value_trunk.shape[:2] == r.input_ids.shape
    r.advantages = r.returns = torch.zeros_like(r.values)
    d = r.select(torch.tensor([0, 2]))
    assert d["value_trunk"].shape[:2] == d["input_ids"].shape
    P = d["input_ids"].shape[1] - d["response_ids"].shape[1]
    again = actor.value_forward(d["input_ids"], d["attention_mask"], P, trunk=d["value_trunk"])
    m = d["response_mask"].bool()
    assert torch.allclose(again[m], r.values[[0, 2]][:, : m.shape[1]][m], atol=1e-5)

    # the stage end to end with a fresh value LoRA on the top block only (reward from a token count)
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, value_lora_top_layers=1)
    capture = Capture(TokenCountScorer(list(range(10, 42))))
    metrics = run_ppo(cfg, scorer=capture)
    assert capture.actor.value_skip == 1 and metrics["steps"] == 2
    layers = {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n, _ in capture.actor.decoder.named_parameters()
              if f".{VALUE}." in n}
    assert layers == {1}                                 # the value LoRA sits on the top block only


def test_value_lora_top_layers_larger_than_the_model_is_named(tiny_model_dir, tmp_path):
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="value_lora_top_layers"):
        run_ppo(ppo_config(tiny_model_dir, tmp_path / "run", max_steps=1, value_lora_top_layers=3),
                scorer=TokenCountScorer([5]))


@pytest.fixture(scope="module")
def top_reward_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model with LoRA on the top block only (``lora_top_layers: 1``)."""
    return train_tiny_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm_top"), lora_top_layers=1)


def test_value_copied_from_a_top_layer_rm_and_the_rm_share_the_trunk(tiny_model_dir, tmp_path, top_reward_dir):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer
    from rlhf.ppo import wiring
    from rlhf.ppo.scorers import ScoreInput

    cfg = ppo_config(tiny_model_dir, tmp_path / "run", reward_model=str(top_reward_dir))
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    base_path = str(Path(tiny_model_dir).resolve())
    actor = build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter=None,
                               lora=lora_config(4, 8, 0.0, ["all-linear"]), base_name_or_path=base_path)
    scorer = wiring.load_reward_scorer(cfg, actor, tokenizer, base_path)
    wiring.init_value_model(cfg, actor, scorer)
    assert actor.value_skip == 1 and scorer.rm.untouched_blocks() == 1

    ids, mask = _batch()
    ids[0, 6] = ids[1, 7] = tokenizer.eos_token_id      # both responses finished (end with EOS)
    resp = ids[:, 4:]
    trunk = actor.value_trunk(ids, mask)
    calls = []
    hook = actor.decoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    shared = scorer.score_batch(ScoreInput([], [], ids, mask, resp, mask[:, 4:], 4, trunk=trunk, trunk_blocks=1))
    assert calls == []                                   # the RM ran only the block above the trunk
    full = scorer.score_batch(ScoreInput([], [], ids, mask, resp, mask[:, 4:], 4))
    assert calls == [1]
    assert torch.allclose(shared, full, atol=1e-5)
    cut = ids.clone()
    cut[1, 7] = 29                                       # cut off: scored with an EOS appended, so every block runs
    scorer.score_batch(ScoreInput([], [], cut, mask, cut[:, 4:], mask[:, 4:], 4, trunk=trunk, trunk_blocks=1))
    hook.remove()
    assert calls == [1, 1]
    # a trunk deeper than the RM leaves untouched is not used: the full pass runs
    deeper = scorer.rm.score_tokens(ids, mask, lower=(trunk, 2))
    assert torch.allclose(deeper, full, atol=1e-5)
