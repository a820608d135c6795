"""PPO with a LoReFT policy: only the interventions train, the reference stays the SFT interventions."""
import pytest
import torch

from rlhf.errors import UserError
from rlhf.ppo.policy import POLICY, REFERENCE
from rlhf.ppo.scorers import TokenCountScorer
from rlhf.ppo.stage import run_ppo
from tests.test_ppo_stage import REWARDED, Capture, ppo_config

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 11, 7], [8, 9, 10, 11, 12, 13, 14, 15]])


def make_loreft_sft(model_dir, folder, seed=1):
    """LoReFT interventions on the top block with random W, b (so they change the model), saved."""
    from transformers import AutoModelForCausalLM

    from rlhf.reft import attach_reft, save_reft

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = attach_reft(model, layers=[-1], rank=2)
    with torch.no_grad():
        for edit in adapter.values():
            edit.learned.weight.normal_(0, 1.0)
            edit.learned.bias.normal_(0, 1.0)
    save_reft(model, folder)
    return folder


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_loreft_policy_trains_only_its_interventions(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_model

    sft = make_loreft_sft(tiny_model_dir, tmp_path / "sft")
    cap, out = Capture(TokenCountScorer(REWARDED)), tmp_path / "run"
    metrics = run_ppo(ppo_config(tiny_model_dir, out, max_steps=2, sft_adapter=str(sft), advantage_estimator="rloo",
                                 samples_per_prompt=2), scorer=cap)
    actor = cap.actor
    assert metrics["steps"] == 2 and actor.value_head is None
    names = [n for n, _ in actor.named_trainable]
    assert names and all(n.startswith("reft_interventions.") for n in names)

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for name, p in actor.peft.named_parameters():              # the base is frozen and unchanged
        if not name.startswith("reft_interventions."):
            assert not p.requires_grad and torch.equal(p, base[name]), name

    sft_model = load_model(tiny_model_dir, adapter=str(sft))
    with actor.use(REFERENCE):
        assert (_logits(actor.peft) - _logits(sft_model)).abs().max() < 1e-6   # reference = SFT interventions
    with actor.use(POLICY):
        trained = _logits(actor.peft)
    assert (trained - _logits(sft_model)).abs().max() > 1e-4                    # the policy moved
    for edit in actor.adapter.values():                         # R keeps orthonormal rows
        r = edit.rotate.weight.detach()
        assert torch.allclose(r @ r.T, torch.eye(r.shape[0]), atol=1e-5)

    assert (out / "reft_config.json").is_file() and not (out / "adapter_config.json").exists()
    assert (_logits(load_model(tiny_model_dir, adapter=str(out))) - trained).abs().max() < 1e-5


def test_loreft_policy_needs_a_critic_free_estimator(tiny_model_dir, tmp_path):
    sft = make_loreft_sft(tiny_model_dir, tmp_path / "sft")
    with pytest.raises(UserError, match="critic-free advantage_estimator"):
        run_ppo(ppo_config(tiny_model_dir, tmp_path / "run", sft_adapter=str(sft), advantage_estimator="gae"),
                scorer=TokenCountScorer(REWARDED))
    assert not (tmp_path / "run" / "reft_config.json").exists()
