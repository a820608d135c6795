"""PPO stage end to end on a tiny random Llama: learning, export, guards, CLI."""
import math
import warnings
from pathlib import Path

import pytest
import torch

from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.policy import POLICY, REFERENCE, VALUE
from rlhf.ppo.scorers import FunctionScorer, TokenCountScorer
from rlhf.ppo.stage import run_ppo
from rlhf.ppo.trainer import PPOGuardError

# LoRA on lm_head too: the tiny random model's logits are nearly flat and only
# an adapter on the output layer can make them peaked within a few steps.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
REWARDED = list(range(10, 42))   # reward = number of response tokens with an id in 10..41


def ppo_config(model_dir, out, **overrides) -> PPOStageConfig:
    values = dict(
        model_name_or_path=model_dir, dataset_name="sample:prompts", output_dir=str(out), max_steps=4,
        rollout_batch_size=4, num_mini_batches=2, ppo_epochs=2, max_new_tokens=6, temperature=1.0,
        learning_rate=3e-3, lr_scheduler_type="linear", lora_r=4, lora_alpha=8, lora_target_modules=TARGETS,
        missing_eos_penalty=None, kl_coef=0.01, report_to="none", progress=False, sample_every=0, save_steps=0,
    )
    values.update(overrides)
    return PPOStageConfig(**values)


class Capture:
    """A scorer factory that keeps the actor run_ppo builds (to inspect the trained model)."""

    def __init__(self, scorer):
        self.scorer, self.actor = scorer, None

    def __call__(self, actor, tokenizer):
        self.actor = actor
        return self.scorer


def read_jsonl(path):
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# learning


def test_programmatic_reward_rises_and_kl_stays_finite(tiny_model_dir, tmp_path):
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=24, rollout_batch_size=16, max_new_tokens=8,
                     learning_rate=5e-3, lr_scheduler_type="constant", report_to="tensorboard", sample_every=10)
    metrics = run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    rows = read_jsonl(tmp_path / "run" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 1.5, (first, last)          # out of a maximum of 8
    assert all(torch.isfinite(torch.tensor([r["kl/k1"], r["kl/k3"]])).all() for r in rows)
    assert rows[-1]["kl/k3"] >= 0
    for key in ("reward/std", "score/raw_mean", "kl/coef", "policy/entropy", "policy/clipfrac", "value/clipfrac",
                "policy/approx_kl", "value/explained_variance", "response/length_mean",
                "response/missing_eos_frac", "response/empty_frac", "time/generation_s", "time/training_s"):
        assert key in rows[-1], key
    assert metrics["reward_last_steps"] > metrics["reward_first_steps"]
    assert metrics["reward_first_steps"] == pytest.approx(first) and metrics["reward_last_steps"] == pytest.approx(last)
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_config.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents*"))
    samples = read_jsonl(out / "logs" / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 10, 20} and all("response" in s for s in samples)
    assert (out / "checkpoints" / "step-000024" / "COMPLETE").is_file()


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_critic_free_estimators_learn_without_a_value_model(tiny_model_dir, tmp_path, estimator, monkeypatch):
    from rlhf.ppo.policy import ActorCritic

    def no_value_pass(*args, **kwargs):
        raise AssertionError("a critic-free run ran a value pass")

    monkeypatch.setattr(ActorCritic, "value_forward", no_value_pass)
    monkeypatch.setattr(ActorCritic, "value_trunk", no_value_pass)
    cap = Capture(TokenCountScorer(REWARDED))
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=20, rollout_batch_size=16, samples_per_prompt=4,
                     max_new_tokens=8, learning_rate=1e-2, lr_scheduler_type="constant", advantage_estimator=estimator,
                     save_steps=8)
    metrics = run_ppo(cfg, scorer=cap)
    rows = read_jsonl(tmp_path / "run" / "logs" / "metrics.jsonl")
    first = sum(r["reward/mean"] for r in rows[:4]) / 4
    last = sum(r["reward/mean"] for r in rows[-4:]) / 4
    assert last > first + 1.0, (first, last)           # out of a maximum of 8
    assert all(math.isfinite(r["kl/k1"]) for r in rows) and "value/loss" not in rows[-1]
    actor = cap.actor
    assert actor.value_head is None and VALUE not in actor.peft.peft_config
    assert not any("value" in n for n, _ in actor.named_trainable)
    assert metrics["steps"] == 20 and (tmp_path / "run" / "checkpoints" / "step-000008" / "COMPLETE").is_file()


def test_kl_as_a_loss_term_keeps_the_policy_closer(tiny_model_dir, tmp_path):
    kls = {}
    for coef in (0.0, 1.0):
        cfg = ppo_config(tiny_model_dir, tmp_path / f"run{coef}", max_steps=6, rollout_batch_size=16,
                         samples_per_prompt=4, max_new_tokens=8, learning_rate=5e-3, lr_scheduler_type="constant",
                         advantage_estimator="rloo", kl_in="loss", kl_estimator="k3", kl_coef=coef)
        run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
        rows = read_jsonl(tmp_path / f"run{coef}" / "logs" / "metrics.jsonl")
        assert "policy/kl_loss" in rows[-1]
        kls[coef] = sum(r["kl/k3"] for r in rows[-3:])
    assert kls[1.0] < kls[0.0], kls


def test_empty_responses_get_their_penalty(tiny_model_dir, tmp_path, monkeypatch):
    """The step marks the responses that are empty and adds empty_response_penalty to their scores."""
    from rlhf.ppo import trainer

    seen = []

    def every_other_row_empty(responses):
        seen.append(list(responses))
        return torch.tensor([i % 2 == 0 for i in range(len(responses))])

    monkeypatch.setattr(trainer, "empty_responses", every_other_row_empty)
    rewards = {}
    for penalty in (None, -0.75):
        out = tmp_path / f"run_{penalty}"
        run_ppo(ppo_config(tiny_model_dir, out, max_steps=1, reward_normalization="none",
                           empty_response_penalty=penalty), scorer=TokenCountScorer(REWARDED))
        rewards[penalty] = read_jsonl(out / "logs" / "metrics.jsonl")[0]["reward/mean"]
    assert len(seen) == 2 and all(len(r) == 4 for r in seen)     # the step's 4 decoded responses
    assert seen[0] == seen[1]                                     # same seed: the same rollouts
    assert rewards[-0.75] == pytest.approx(rewards[None] - 0.75 / 2)  # half the rows, -0.75 each


def test_shared_value_head_runs(tiny_model_dir, tmp_path):
    cap = Capture(TokenCountScorer(REWARDED))
    run_ppo(ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, value_model="shared"), scorer=cap)
    assert not any(".value." in n for n, _ in cap.actor.named_trainable)
    assert cap.actor.value_head.weight.abs().sum() > 0   # trained from zero


def test_entropy_bonus_has_a_gradient_and_raises_entropy(tiny_model_dir, tmp_path):
    """The same run with and without an entropy bonus: the updates differ and the bonus raises the policy's
    entropy (measured on one fixed batch after training)."""
    from rlhf.models import load_tokenizer
    from rlhf.generation import encode_prompts

    entropies, weights = {}, {}
    for coef in (0.0, 1.0):
        cap = Capture(TokenCountScorer(REWARDED))
        run_ppo(ppo_config(tiny_model_dir, tmp_path / f"run{coef}", max_steps=3, entropy_coef=coef), scorer=cap)
        actor = cap.actor
        weights[coef] = torch.cat([p.detach().flatten() for n, p in actor.named_trainable if ".policy." in n])
        tok = load_tokenizer(tiny_model_dir, padding_side="left")
        enc = encode_prompts(tok, ["Name a colour.", "Count to three."], torch.device("cpu"))
        ids = torch.cat([enc["input_ids"], torch.full((2, 5), 7)], dim=1)
        mask = torch.cat([enc["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
        with torch.no_grad():
            out = actor.policy_forward(ids, mask, ids[:, -5:], 1.0, with_entropy=True)
        entropies[coef] = float(out["entropy"].mean())
    assert not torch.allclose(weights[0.0], weights[1.0])
    assert entropies[1.0] > entropies[0.0], entropies


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_recomputed_logprobs_are_the_training_passes(tiny_model_dir, tmp_path, value_model):
    """A learning rate too small to move the weights: every ratio is pi(now) / pi(rollout) of the same
    weights and must be 1 (the rollout's log-probs are recomputed at the sampling temperature, not taken
    from the merged-LoRA sampling pass)."""
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, learning_rate=1e-30, temperature=0.8,
                     value_model=value_model)
    run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    rows = read_jsonl(tmp_path / "run" / "logs" / "metrics.jsonl")
    assert all(abs(r["policy/ratio_max"] - 1.0) <= 1e-6 for r in rows), rows
    assert all(r["policy/clipfrac"] == 0 for r in rows)


# export


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _check_export(model_dir, out, actor, sft_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 11, 7], [8, 9, 10, 11, 12, 13, 14, 15]])
    with actor.use(POLICY):
        trained = _logits(actor.peft, ids)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    assert (trained - _logits(exported, ids)).abs().max() < 1e-5
    plain = _logits(AutoModelForCausalLM.from_pretrained(model_dir), ids)
    assert (trained - plain).abs().max() > 1e-3          # the policy did move away from the base
    if sft_dir:                                          # the reference is still exactly the SFT model
        with actor.use(REFERENCE):
            ref = _logits(actor.peft, ids)
        sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(sft_dir)).eval()
        assert (ref - _logits(sft, ids)).abs().max() < 1e-6
        assert (trained - ref).abs().max() > 1e-4


def make_sft_adapter(model_dir, folder, seed=1):
    """A LoRA 'SFT' adapter with random B weights (so it changes the model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return folder


def test_export_reproduces_policy_logits(tiny_model_dir, tmp_path):
    cap = Capture(TokenCountScorer(REWARDED))
    out = tmp_path / "run"
    run_ppo(ppo_config(tiny_model_dir, out, max_steps=2), scorer=cap)
    _check_export(tiny_model_dir, out, cap.actor)


def test_export_stacked_on_sft_adapter(tiny_model_dir, tmp_path):
    import json

    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    cap = Capture(TokenCountScorer(REWARDED))
    out = tmp_path / "run"
    run_ppo(ppo_config(tiny_model_dir, out, max_steps=2, sft_adapter=str(sft)), scorer=cap)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(["q_proj", "v_proj", "down_proj", "lm_head"])
    assert Path(config["base_model_name_or_path"]) == Path(tiny_model_dir).resolve()
    _check_export(tiny_model_dir, out, cap.actor, sft_dir=sft)


def test_policy_starts_as_exact_copy_of_sft(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models import lora_config
    from rlhf.ppo.adapters import build_actor_critic

    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    actor = build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter=str(sft),
                               lora=lora_config(4, 8, 0.0, ["all-linear"]))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with actor.use(POLICY):
        pol = _logits(actor.peft, ids)
    with actor.use(REFERENCE):
        ref = _logits(actor.peft, ids)
    assert torch.equal(pol, ref)
    assert all(p.requires_grad for _, p in actor.named_trainable)
    assert not any(p.requires_grad for n, p in actor.peft.named_parameters() if ".reference." in n)


# guards


def test_nan_reward_stops_with_message(tiny_model_dir, tmp_path):
    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 3 else 1.0] * len(responses)

    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=5, save_steps=2)
    with pytest.raises(PPOGuardError) as err:
        run_ppo(cfg, scorer=FunctionScorer(flaky))
    msg = str(err.value)
    assert "step 3" in msg and "reward scorer returned NaN" in msg and "step-000002" in msg
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_nan_reward_before_any_checkpoint(tiny_model_dir, tmp_path):
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2)
    with pytest.raises(PPOGuardError, match="NaN/inf for 4 of 4 .* no checkpoint was written yet"):
        run_ppo(cfg, scorer=FunctionScorer(lambda p, r: [float("inf")] * len(r)))


def test_exploding_ratio_stops(tiny_model_dir, tmp_path):
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, learning_rate=0.5, max_ratio=1.01)
    with pytest.raises(PPOGuardError, match="exploding probability ratio"):
        run_ppo(cfg, scorer=TokenCountScorer(REWARDED))


# config and CLI


def test_config_rejects_indivisible_batches():
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="'rollout_batch_size'.*'num_mini_batches'"):
        PPOStageConfig(rollout_batch_size=6, num_mini_batches=4)
    with pytest.raises(ConfigError, match="'gradient_accumulation_steps'"):
        PPOStageConfig(rollout_batch_size=8, num_mini_batches=2, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="'per_device_train_batch_size'"):
        PPOStageConfig(rollout_batch_size=8, per_device_train_batch_size=3)
    cfg = PPOStageConfig(rollout_batch_size=8, num_mini_batches=2, gradient_accumulation_steps=2)
    assert cfg.per_device_train_batch_size == 2 and cfg.mini_batch_size == 4
    with pytest.raises(ConfigError, match="'kl_coef'"):
        PPOStageConfig(kl_controller="adaptive", kl_coef=0.0)


def test_shipped_config_parses():
    from rlhf.config import parse_config

    root = Path(__file__).resolve().parents[1]
    cfg = parse_config(PPOStageConfig, ["--config", str(root / "configs" / "ppo.yaml"), "--max_steps", "3"])
    assert cfg.max_steps == 3 and cfg.rollout_batch_size % cfg.num_mini_batches == 0


def test_cli_unknown_key_and_missing_reward_model(tiny_model_dir, tmp_path, capsys):
    from rlhf.cli import main

    assert main(["ppo", "--no_such_key", "1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    rc = main(["ppo", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"),
               "--max_steps", "1", "--report_to", "none"])
    assert rc == 2 and "reward_model" in capsys.readouterr().err


def test_refuses_to_mix_into_existing_checkpoints(tiny_model_dir, tmp_path):
    from rlhf.errors import UserError

    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=1)
    run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    cfg.overwrite_output_dir = True
    assert run_ppo(cfg, scorer=TokenCountScorer(REWARDED))["steps"] == 1


def test_gradient_checkpointing_and_logging_steps(tiny_model_dir, tmp_path):
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=5, gradient_checkpointing=True, logging_steps=2,
                     gradient_accumulation_steps=2)
    assert cfg.per_device_train_batch_size == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_ppo(cfg, scorer=TokenCountScorer(REWARDED))["steps"] == 5
    assert not [w for w in caught if "checkpointing_enable" in str(w.message)]  # transformers' current name
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "logs" / "metrics.jsonl")] == [1, 2, 4, 5]


@pytest.mark.parametrize("steps, k", [(1, 1), (3, 1), (4, 2), (9, 4), (24, 5)])
def test_the_first_and_last_steps_of_the_summary_never_overlap(steps, k):
    from rlhf.ppo.trainer import first_and_last

    rows = [{"reward/mean": float(i)} for i in range(steps)]  # step i+1 has reward i
    first, last = first_and_last(rows, "reward/mean")
    assert first == pytest.approx(sum(range(k)) / k) and last == pytest.approx(sum(range(steps - k, steps)) / k)
