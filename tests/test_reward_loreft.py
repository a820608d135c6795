"""`rlhf reward --method loreft` on the tiny model: training, what trains, R orthonormal, the saved folder, reloads,
`rlhf reward evaluate`, PPO (standalone), a LoReFT SFT starting point, and the one-line refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_reward_model import rm_config, some_texts
from transformers import TrainerCallback

from reward import RewardScorer
from reward.evaluate import evaluate_pairs
from reward.member import build_trainer
from reward.modeling import build_reward_model, read_metadata
from reward.reft import STANDALONE_REASON, attach_reward_interventions, load_reward_interventions
from reward.reft import save_reward_interventions
from reward.train import run_reward
from rlhf.errors import ConfigError, UserError
from rlhf.pairs import load_splits
from rlhf.testing import write_jsonl

CPU = dict(dtype=torch.float32, device=torch.device("cpu"))


def loreft_config(tiny_model_dir, tmp, **overrides):
    values = dict(method="loreft", reft_rank=4, reft_layers=[])
    values.update(overrides)
    return rm_config(tiny_model_dir, tmp, **values)


def rotations(model) -> list[torch.Tensor]:
    """R (r, d) of every intervention on ``model`` itself (not those of an SFT adapter under it)."""
    return [edit.rotate.weight.detach().clone() for edit in model.reft_interventions.values()]


def max_orthonormality_error(model) -> float:
    """max |R R^T - I| over the interventions."""
    return max(float((r @ r.T - torch.eye(r.shape[0])).abs().max()) for r in rotations(model))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm_loreft")
    cfg = loreft_config(tiny_model_dir, tmp)
    return cfg, run_reward(cfg)


@pytest.fixture(scope="module")
def sft_loreft(tiny_model_dir, tmp_path_factory):
    """A LoReFT SFT folder as `rlhf sft --method loreft` saves it, with W and b moved away from the identity."""
    from rlhf.models import load_base_model
    from rlhf.reft import attach_reft, save_reft

    folder = tmp_path_factory.mktemp("sft_loreft")
    model = load_base_model(tiny_model_dir, **CPU)
    torch.manual_seed(3)
    attach_reft(model, [0, 1], rank=2)
    with torch.no_grad():
        for edit in model.reft_interventions.values():
            edit.learned.weight.normal_(std=0.5)
            edit.learned.bias.normal_(std=0.5)
    save_reft(model, folder)
    return str(folder)


@pytest.fixture(scope="module")
def sft_bottleneck(tiny_model_dir, tmp_path_factory):
    """A bottleneck-adapter SFT folder with non-zero up-projections."""
    from rlhf.bottleneck import attach_bottleneck
    from rlhf.models import load_base_model

    folder = tmp_path_factory.mktemp("sft_bottleneck")
    model = load_base_model(tiny_model_dir, **CPU)
    torch.manual_seed(4)
    adapter = attach_bottleneck(model, reduction_factor=4, placement="both", non_linearity="relu")
    with torch.no_grad():
        for edit in adapter.values():
            edit.up.weight.normal_(std=0.5)
    adapter.save(folder)
    return str(folder)


# training


def test_training_separates_the_pairs(trained, tiny_model_dir):
    cfg, metrics = trained
    _, held = load_splits(cfg)
    untrained = build_reward_model(tiny_model_dir, None, seed=cfg.seed, **CPU)
    attach_reward_interventions(untrained, [], cfg.reft_rank)
    tokenizer = RewardScorer.from_pretrained(cfg.output_dir).tokenizer
    before = evaluate_pairs(RewardScorer.from_model(untrained, tokenizer, cfg.max_length), held)["accuracy"]
    assert metrics["eval_accuracy"] >= 0.9 > before
    assert metrics["method"] == "loreft" and metrics["train_loss"] < math.log(2)
    # 2 blocks x (R, W: 4 x 32; b: 4) + the score head (32)
    assert metrics["trainable_parameters"] == 2 * (2 * 4 * 32 + 4) + 32


def test_only_interventions_and_head_change_base_identical_R_orthonormal(tiny_model_dir, tmp_path):
    cfg = loreft_config(tiny_model_dir, tmp_path, max_steps=6, reft_layers=[0, -1])
    train, held = load_splits(cfg)
    trainer = build_trainer(cfg, tmp_path, train, held, None)
    model = trainer.model
    errors = []

    class Orthonormality(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            errors.append(max_orthonormality_error(model))

    trainer.add_callback(Orthonormality())
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    r_before = rotations(model)
    trainer.train()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("reft_interventions.") or n.startswith("score.") for n in changed), changed
    assert "score.weight" in changed and any(".learned." in n for n in changed) and any(".rotate." in n for n in changed)
    base = [n for n in before if not n.startswith(("reft_interventions.", "score."))]
    assert base and all(torch.equal(before[n], after[n]) for n in base)  # the base bit for bit
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("reft_interventions.", "score.")) for n in trainable)
    # R moved, and stayed orthonormal after every optimizer step
    assert len(errors) == 6 and max(errors) < 1e-5, errors
    assert not all(torch.equal(a, b) for a, b in zip(r_before, rotations(model)))

    # saved and loaded onto a fresh model (another seed: another random head), the scores are the same numbers
    prompts, responses = some_texts()
    scores = RewardScorer.from_model(model, trainer.processing_class, cfg.max_length).score(prompts, responses)
    save_reward_interventions(model, tmp_path / "saved")
    fresh = load_reward_interventions(build_reward_model(tiny_model_dir, None, seed=99, **CPU), tmp_path / "saved")
    again = RewardScorer.from_model(fresh, trainer.processing_class, cfg.max_length).score(prompts, responses)
    assert again == scores


# the saved folder, scoring it


def test_saved_folder_and_standalone_scoring(trained, tmp_path, capsys):
    from rlhf.cli import main

    cfg, metrics = trained
    out = Path(cfg.output_dir)
    for name in ("reft_config.json", "reft_interventions.safetensors", "score_head.safetensors", "reward_model.json",
                 "reward_stats.json", "tokenizer.json", "run_config.yaml", "metrics.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists() and not (out / "trainer").exists()
    meta = read_metadata(out)
    assert meta["method"] == "loreft" and meta["sft_adapter"] is None
    assert json.loads((out / "reft_config.json").read_text())["layers"] == [0, 1]

    scorer = RewardScorer.from_pretrained(out)
    _, held = load_splits(cfg)
    assert evaluate_pairs(scorer, held)["accuracy"] == metrics["eval_accuracy"]
    prompts, responses = some_texts()
    assert RewardScorer.from_pretrained(out).score(prompts, responses) == scorer.score(prompts, responses)

    held_file = write_jsonl(tmp_path / "held.jsonl", [{"prompt": p.prompt_messages, "chosen": p.chosen,
                                                        "rejected": p.rejected} for p in held])  # fmt: skip
    assert main(["reward", "evaluate", "--reward_model", str(out), "--dataset_name", str(held_file),
                 "--out", str(tmp_path / "eval.json")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["accuracy"] == metrics["eval_accuracy"] and result["n"] == len(held)


def test_ppo_loads_it_standalone_and_runs(trained, tiny_model_dir, tmp_path, capsys):
    from test_ppo_stage import ppo_config

    from rlhf.ppo import wiring
    from rlhf.ppo.scorers import TextScorer
    from rlhf.ppo.stage import run_ppo

    cfg_rm, _ = trained
    tokenizer = RewardScorer.from_pretrained(cfg_rm.output_dir).tokenizer
    assert RewardScorer.incompatibility(cfg_rm.output_dir, tiny_model_dir, tokenizer) == STANDALONE_REASON
    cfg = ppo_config(tiny_model_dir, tmp_path / "ppo", reward_model=cfg_rm.output_dir, max_steps=1,
                     rollout_batch_size=4, ppo_epochs=1, max_new_tokens=4)  # fmt: skip
    tokenizer, actor, base_path = wiring.load_actor(cfg)
    with pytest.raises(UserError, match="LoReFT interventions"):
        RewardScorer.attach(actor.peft, tokenizer, cfg_rm.output_dir)
    scorer = wiring.load_reward_scorer(cfg, actor, tokenizer, base_path)
    assert isinstance(scorer, TextScorer) and "loaded separately" in capsys.readouterr().err
    prompts, responses = some_texts()
    assert scorer.rm.score(prompts, responses) == RewardScorer.from_pretrained(cfg_rm.output_dir).score(
        prompts, responses)
    assert "reward" not in actor.peft.peft_config  # nothing was put on the policy's base
    metrics = run_ppo(cfg)
    assert metrics["steps"] == 1 and math.isfinite(metrics["reward_last_steps"])


# a LoReFT SFT adapter as the starting point


@pytest.mark.parametrize("kind", ["loreft", "bottleneck_adapter"])
def test_hooked_sft_adapter_sits_under_the_reward_interventions(kind, sft_loreft, sft_bottleneck, tiny_model_dir):
    from rlhf.models import load_model

    sft = sft_loreft if kind == "loreft" else sft_bottleneck
    # fresh reward interventions are the identity: the trunk then computes the SFT policy's hidden states
    model = build_reward_model(tiny_model_dir, sft, seed=0, **CPU)
    attach_reward_interventions(model, [], rank=2)
    policy = load_model(tiny_model_dir, adapter=sft, **CPU)
    ids = torch.tensor([[5, 9, 23, 42, 7]])
    with torch.no_grad():
        want = policy.model(input_ids=ids).last_hidden_state
        bare = build_reward_model(tiny_model_dir, None, seed=0, **CPU).model(input_ids=ids).last_hidden_state
        got = model.model(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(bare, want, atol=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("reft_interventions.", "score.")) for n in trainable)  # the SFT frozen


def test_reward_model_trained_on_a_loreft_sft_adapter(sft_loreft, tiny_model_dir, tmp_path):
    # (length_debias applies to any backbone: the length head sits on the pooled features)
    cfg = loreft_config(tiny_model_dir, tmp_path, sft_adapter=sft_loreft, max_steps=4, eval_fraction=0.0,
                        length_debias="length_head")  # fmt: skip
    metrics = run_reward(cfg)
    out = Path(cfg.output_dir)
    meta = read_metadata(out)
    assert meta["sft_method"] == "loreft" and meta["sft_merged"] is False and meta["sft_adapter"] == "sft_adapter"
    assert metrics["length_debias"] == "length_head" and (out / "length_head.safetensors").is_file()
    copied = out / "sft_adapter" / "reft_interventions.safetensors"
    assert copied.read_bytes() == (Path(sft_loreft) / "reft_interventions.safetensors").read_bytes()  # frozen
    scorer = RewardScorer.from_pretrained(out)
    assert len(scorer.trunk.reft_interventions) == 2  # the SFT interventions, under the reward ones
    prompts, responses = some_texts()
    assert RewardScorer.from_pretrained(out).score(prompts, responses) == scorer.score(prompts, responses)


# what does not apply


def one_line_error(argv, capsys) -> str:
    from rlhf.cli import main

    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_refusals_are_one_line(trained, sft_loreft, tiny_model_dir, tmp_path, capsys):
    cfg, _ = trained
    common = ["reward", "--model_name_or_path", tiny_model_dir, "--dataset_name", cfg.dataset_name,
              "--output_dir", str(tmp_path / "rm"), "--max_steps", "1"]  # fmt: skip
    assert "'ensemble' needs method lora" in one_line_error(common + ["--method", "loreft", "--ensemble", "2"], capsys)
    err = one_line_error(common + ["--method", "loreft", "--lora_top_layers", "1"], capsys)
    assert "'lora_top_layers'" in err and "reft_layers" in err
    assert "'reft_layers' must index the model's 2 blocks" in one_line_error(
        common + ["--method", "loreft", "--reft_layers", "0,2"], capsys)
    assert "'reft_rank' must be >= 1" in one_line_error(common + ["--method", "loreft", "--reft_rank", "0"], capsys)
    err = one_line_error(common + ["--sft_adapter", sft_loreft], capsys)  # a LoRA reward model on a LoReFT SFT
    assert "loreft adapter" in err and "--method loreft" in err
    assert not (tmp_path / "rm").exists()
    with pytest.raises(ConfigError, match="'ensemble' needs method lora"):
        loreft_config(tiny_model_dir, tmp_path, ensemble=3)


def test_a_folder_without_its_head_is_refused(trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained[0].output_dir, broken)
    (broken / "score_head.safetensors").unlink()
    with pytest.raises(UserError, match="LoReFT reward model without score_head.safetensors"):
        RewardScorer.from_pretrained(broken)
