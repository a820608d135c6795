"""Reward-model training on the tiny model, the saved folder, standalone and attached scoring."""

import json
import random
from pathlib import Path

import pytest
import torch

from reward import RewardScorer
from reward.evaluate import evaluate_pairs
from reward.modeling import build_reward_model, read_metadata
from reward.member import build_trainer
from reward.train import RewardStageConfig, run_reward
from rlhf.errors import ConfigError, UserError
from rlhf.pairs import load_pairs, load_splits
from rlhf.testing import write_jsonl

WORDS = ["sun", "tree", "river", "cloud", "stone", "bird", "road", "city", "rain", "light"]


def easy_rows(n: int, seed: int = 0) -> list[dict]:
    """Chosen = rejected + ' thanks': the RM must learn to like the word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        rows.append(
            {
                "prompt": f"Say something about the {rng.choice(WORDS)} {i}.",
                "chosen": body + " thanks",
                "rejected": body,
            }
        )
    return rows


def rm_config(tiny_model_dir, tmp, **overrides) -> RewardStageConfig:
    values = dict(
        model_name_or_path=tiny_model_dir,
        dataset_name=str(write_jsonl(Path(tmp) / "prefs.jsonl", easy_rows(64))),
        output_dir=str(Path(tmp) / "rm"),
        max_steps=24,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        eval_fraction=0.25,
        lora_r=4,
        lora_alpha=8,
        logging_steps=8,
        report_to="none",
        stats_max_pairs=16,
    )
    values.update(overrides)
    return RewardStageConfig(**values)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    cfg = rm_config(tiny_model_dir, tmp)
    return cfg, run_reward(cfg)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA causal-LM adapter with non-zero weights, as `rlhf sft` would save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sft")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.save_pretrained(folder)
    return str(folder)


def policy_model(tiny_model_dir):
    """The policy as PPO holds it: base causal LM + a trainable LoRA adapter 'policy' (non-zero), train mode."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models import load_base_model

    base = load_base_model(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="policy"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.train()
    return model


def some_texts(n=6):
    rows = easy_rows(n, seed=7)
    return [r["prompt"] for r in rows], [r["chosen"] if i % 2 else r["rejected"] for i, r in enumerate(rows)]


# training


def test_training_raises_held_out_accuracy(trained, tiny_model_dir):
    cfg, metrics = trained
    _, held = load_splits(cfg)
    untrained = build_reward_model(tiny_model_dir, None, torch.float32, torch.device("cpu"), seed=cfg.seed)
    tokenizer = RewardScorer.from_pretrained(cfg.output_dir).tokenizer
    before = evaluate_pairs(RewardScorer.from_model(untrained, tokenizer, cfg.max_length), held)["accuracy"]
    assert metrics["eval_accuracy"] >= 0.9 > before
    assert metrics["eval_pairs"] == 16 and metrics["train_pairs"] == 48
    for key in (
        "eval_mean_margin",
        "eval_reward_mean",
        "eval_reward_std",
        "eval_length_correlation",
        "train_pairs_per_s",
        "wall_time_s",
        "train_reward_mean",
        "train_reward_std",
    ):
        assert metrics[key] is not None, key


def test_lora_trains_adapter_and_head_but_not_base(tiny_model_dir, tmp_path):
    cfg = rm_config(tiny_model_dir, tmp_path, max_steps=3)
    train, held = load_splits(cfg)
    trainer = build_trainer(cfg, tmp_path, train, held, None)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing was trained"
    assert all("lora_" in n or "score.modules_to_save" in n for n in changed), sorted(changed)[:5]
    assert any("score.modules_to_save" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_saved_folder_layout(trained):
    cfg, metrics = trained
    out = Path(cfg.output_dir)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "reward_model.json",
        "reward_stats.json",
        "run_config.yaml",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "logs" / "metrics.jsonl").is_file()
    assert not (out / "trainer").exists() and not Path(str(out) + ".incomplete").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    meta = read_metadata(out)
    assert meta["sft_merged"] is False and meta["max_length"] == cfg.max_length
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["n"] == 32 and stats["std"] > 0
    assert json.loads((out / "metrics.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]


def test_failed_run_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    from reward import trainer as trainer_module

    cfg = rm_config(tiny_model_dir, tmp_path, max_steps=2)

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainer_module.PairwiseRewardTrainer, "train", boom)
    with pytest.raises(RuntimeError):
        run_reward(cfg)
    assert not Path(cfg.output_dir).exists() and not Path(cfg.output_dir + ".incomplete").exists()


def test_config_validation(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="sft_adapter"):
        rm_config(tiny_model_dir, tmp_path, sft_adapter=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="eval_steps"):
        rm_config(tiny_model_dir, tmp_path, eval_steps=5, eval_fraction=0.0)
    with pytest.raises(ConfigError, match="lora_top_layers"):
        rm_config(tiny_model_dir, tmp_path, lora_top_layers=-1)


# scoring


def test_standalone_load_reproduces_scores(trained):
    cfg, metrics = trained
    scorer = RewardScorer.from_pretrained(cfg.output_dir)
    _, held = load_splits(cfg)
    again = evaluate_pairs(scorer, held)
    assert again["accuracy"] == metrics["eval_accuracy"]
    assert again["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-5)
    assert scorer.stats["mean"] == pytest.approx(metrics["train_reward_mean"])
    assert set(scorer.stats) >= {"mean", "std"}
    prompts, responses = some_texts()
    scores = scorer.score(prompts, responses, batch_size=4)
    assert len(scores) == 6 and all(isinstance(s, float) for s in scores)
    assert scorer.score(prompts[:1], responses[:1]) == pytest.approx(scores[:1], abs=1e-5)  # batching-independent


def test_score_tokens_left_and_right_padding_agree(trained):
    cfg, _ = trained
    scorer = RewardScorer.from_pretrained(cfg.output_dir)
    prompts, responses = some_texts(4)
    seqs, _ = scorer.encode(prompts, responses)
    width, pad = max(map(len, seqs)), scorer.tokenizer.pad_token_id
    left = torch.full((4, width), pad)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        left[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    out = scorer.score_tokens(left, mask)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert out.tolist() == pytest.approx(scorer.score(prompts, responses), abs=1e-5)


def test_attach_matches_standalone_and_shares_base(trained, tiny_model_dir):
    cfg, _ = trained
    standalone = RewardScorer.from_pretrained(cfg.output_dir)
    policy = policy_model(tiny_model_dir)
    tokenizer = standalone.tokenizer
    scorer = RewardScorer.attach(policy, tokenizer, cfg.output_dir)
    prompts, responses = some_texts()
    assert scorer.score(prompts, responses) == pytest.approx(standalone.score(prompts, responses), abs=1e-5)
    shared = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert scorer.trunk.layers[0].self_attn.q_proj.base_layer.weight.data_ptr() == shared.data_ptr()
    w, b = scorer.head_weight()
    w0, b0 = standalone.head_weight()
    assert w.shape == (1, 32) and torch.allclose(w, w0) and b is None and b0 is None
    assert scorer.stats == standalone.stats


def test_attach_restores_active_adapter_flags_and_modes(trained, tiny_model_dir):
    cfg, _ = trained
    policy = policy_model(tiny_model_dir)
    tokenizer = RewardScorer.from_pretrained(cfg.output_dir).tokenizer
    grads_before = {n: p.requires_grad for n, p in policy.named_parameters()}
    modes_before = {n: m.training for n, m in policy.named_modules()}
    scorer = RewardScorer.attach(policy, tokenizer, cfg.output_dir, adapter_name="rm")
    assert policy.active_adapters == ["policy"]
    new = {n: p.requires_grad for n, p in policy.named_parameters() if n not in grads_before}
    assert new and not any(new.values()), "the reward adapter must be frozen"
    assert {n: p.requires_grad for n, p in policy.named_parameters() if n in grads_before} == grads_before

    prompts, responses = some_texts(3)
    first = scorer.score(prompts, responses)
    assert policy.active_adapters == ["policy"]
    assert {n: p.requires_grad for n, p in policy.named_parameters() if n in grads_before} == grads_before
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".rm." in n)
    assert {n: m.training for n, m in policy.named_modules() if n in modes_before} == modes_before

    # inside disable_adapter (PPO's reference pass) the RM adapter is still used, and the context survives
    with policy.disable_adapter():
        assert scorer.score(prompts, responses) == pytest.approx(first, abs=1e-6)
    assert policy.active_adapters == ["policy"]

    # the policy adapter really is the active one again: its output differs from the bare base
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        with_adapter = policy(input_ids=ids).logits
        with policy.disable_adapter():
            bare = policy(input_ids=ids).logits
    assert not torch.allclose(with_adapter, bare)


def test_attach_with_sft_merged_reward_model(tiny_model_dir, tmp_path, sft_adapter):
    cfg = rm_config(tiny_model_dir, tmp_path, sft_adapter=sft_adapter, max_steps=4, eval_fraction=0.0)
    run_reward(cfg)
    meta = read_metadata(cfg.output_dir)
    assert meta["sft_merged"] and meta["sft_adapter"] == "sft_adapter" and meta["sft_adapter_sha256"]
    assert (Path(cfg.output_dir) / "sft_adapter" / "adapter_config.json").is_file()
    standalone = RewardScorer.from_pretrained(cfg.output_dir)
    plain = build_reward_model(tiny_model_dir, None, torch.float32, torch.device("cpu"), seed=0)
    merged = build_reward_model(tiny_model_dir, sft_adapter, torch.float32, torch.device("cpu"), seed=0)
    assert not torch.equal(plain.model.layers[0].mlp.up_proj.weight, merged.model.layers[0].mlp.up_proj.weight)

    policy = policy_model(tiny_model_dir)
    scorer = RewardScorer.attach(policy, standalone.tokenizer, cfg.output_dir)
    assert scorer.metadata["attached_adapters"] == ["reward_sft", "reward"]
    prompts, responses = some_texts()
    assert scorer.score(prompts, responses) == pytest.approx(standalone.score(prompts, responses), abs=1e-5)
    assert policy.active_adapters == ["policy"]


def test_compatibility_checks(trained, tiny_model_dir, tmp_path, sft_adapter):
    from rlhf.testing import build_tiny_model

    cfg, _ = trained
    tokenizer = RewardScorer.from_pretrained(cfg.output_dir).tokenizer
    assert RewardScorer.compatible_with(cfg.output_dir, tiny_model_dir, tokenizer)
    # a policy whose base weights already have an SFT adapter merged in: this RM was trained without it
    assert not RewardScorer.compatible_with(cfg.output_dir, tiny_model_dir, tokenizer, merged_sft_adapter=sft_adapter)
    other = str(build_tiny_model(tmp_path / "other", seed=1))
    assert "base" in RewardScorer.incompatibility(cfg.output_dir, other, tokenizer)
    tokenizer_copy = RewardScorer.from_pretrained(cfg.output_dir).tokenizer
    tokenizer_copy.chat_template = "{{ messages[0]['content'] }}"
    assert "chat template" in RewardScorer.incompatibility(cfg.output_dir, tiny_model_dir, tokenizer_copy)
    with pytest.raises(UserError, match="standalone"):
        RewardScorer.attach(policy_model(tiny_model_dir), tokenizer_copy, cfg.output_dir)
    with pytest.raises(UserError, match="not a reward model"):
        RewardScorer.from_pretrained(tiny_model_dir)


def test_lora_on_top_layers_only_trains_and_attaches(tiny_model_dir, tmp_path):
    cfg = rm_config(tiny_model_dir, tmp_path, lora_top_layers=1, max_steps=3, eval_fraction=0.0)
    run_reward(cfg)
    adapter = json.loads((Path(cfg.output_dir) / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]
    standalone = RewardScorer.from_pretrained(cfg.output_dir)
    policy = policy_model(tiny_model_dir)
    scorer = RewardScorer.attach(policy, standalone.tokenizer, cfg.output_dir)
    assert not any(".reward." in n for n, _ in policy.named_parameters() if ".layers.0." in n)
    prompts, responses = some_texts(3)
    assert scorer.score(prompts, responses) == pytest.approx(standalone.score(prompts, responses), abs=1e-5)


def test_pool_by_hand():
    from reward.pooling import pool

    values = torch.tensor([[[1.0], [2.0], [6.0], [9.0]], [[4.0], [8.0], [5.0], [7.0]]])  # (2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded
    assert pool(values, mask, "last").squeeze(-1).tolist() == [6.0, 7.0]
    # last + mean over attended positions: 6 + (1 + 2 + 6) / 3 = 9; 7 + (8 + 5 + 7) / 3 = 13.666...
    assert pool(values, mask, "last_mean").squeeze(-1).tolist() == pytest.approx([9.0, 7 + 20 / 3])
    response = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])  # last + mean over the response: 6 + 4 = 10; 7 + 6 = 13
    assert pool(values, mask, "last_response_mean", response).squeeze(-1).tolist() == pytest.approx([10.0, 13.0])
    with pytest.raises(ValueError, match="response_mask"):
        pool(values, mask, "last_response_mean")


def test_embedding_pooling_and_feature_head_by_hand():
    from reward.pooling import FeatureHead, embedding_features, feature_head_like

    class Trunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(3, 2)
            with torch.no_grad():
                self.embed.weight.copy_(torch.tensor([[2.0, 0.0], [3.0, -1.0], [1.0, -3.0]]))

        def get_input_embeddings(self):
            return self.embed

    ids = torch.tensor([[1, 2, 0], [0, 0, 1]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    # rms of the matrix: sqrt((4 + 0 + 9 + 1 + 1 + 9) / 6) = 2; row 0: mean of (3,-1), (1,-3) = (2,-2); row 1:
    # mean of (2, 0), (3, -1) = (2.5, -0.5); both over 2
    trunk = Trunk()

    def means():
        return embedding_features(trunk, ids, mask, "last_mean_embeddings").flatten().tolist()
    assert means() == pytest.approx([1.0, -1.0, 1.25, -0.25])
    with torch.no_grad():  # the rms is cached per weight; an in-place change is seen: twice the weights, same means
        trunk.embed.weight.mul_(2)
    assert means() == pytest.approx([1.0, -1.0, 1.25, -0.25])
    head = FeatureHead(2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 10.0, 100.0]]))
        head.bias.fill_(0.5)
    assert head(torch.tensor([[1.0, 1.0]])).item() == 3.5  # H wide: the state part and the bias
    assert head(torch.tensor([[1.0, 1.0, 1.0, -1.0]])).item() == 3.5 + 10 - 100
    assert head.embedding_part(torch.tensor([[1.0, 1.0]])).item() == 110.0  # no bias
    narrow = torch.nn.Linear(2, 1)
    wide = feature_head_like(narrow)
    x = torch.randn(3, 2)
    assert torch.equal(wide(x), narrow(x)) and torch.equal(wide(torch.cat([x, x], -1)), narrow(x))


def test_response_tail_mask_by_hand():
    from reward.pooling import response_tail_mask

    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])  # right, left, right padding
    # the last 2, 3 and 5 (more than the row holds: all of it) attended positions
    assert response_tail_mask(mask, [2, 3, 5]).tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]]


def test_embedding_max_reads_the_response_only_by_hand():
    from reward.pooling import embedding_features, embedding_parts, needs_response_mask

    class Trunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            with torch.no_grad():  # rms of the matrix: sqrt((4 + 0 + 9 + 1 + 1 + 9 + 0 + 16) / 8) = sqrt(5)
                self.embed.weight.copy_(torch.tensor([[2.0, 0.0], [3.0, -1.0], [1.0, -3.0], [0.0, 4.0]]))

        def get_input_embeddings(self):
            return self.embed

    ids = torch.tensor([[3, 1, 2, 0], [0, 3, 2, 1]])   # prompt token 3 first, then the response
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    response = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    out = embedding_features(Trunk(), ids, mask, "last_mean_embeddings_max", response)  # (2, 4): [mean ; max]
    r = 5 ** 0.5
    # row 0: mean of (0,4), (3,-1), (1,-3) = (4/3, 0); max over (3,-1), (1,-3) = (3, -1): token 3's 4 is the prompt's
    # row 1: mean of (0,4), (1,-3), (3,-1) = (4/3, 0); max over (1,-3), (3,-1) = (3, -1)
    want = [[4 / 3 / r, 0.0, 3 / r, -1 / r]] * 2
    assert out.tolist() == [pytest.approx(w) for w in want]
    with_prompt = embedding_features(Trunk(), ids, mask, "last_mean_embeddings_max", mask)
    assert with_prompt[0, 3].item() == pytest.approx(4 / r)  # over the whole row, the prompt's token would count
    with pytest.raises(ValueError, match="response_mask"):
        embedding_features(Trunk(), ids, mask, "last_mean_embeddings_max")
    assert embedding_features(Trunk(), ids, mask, "last_mean_embeddings").shape == (2, 2)
    assert [embedding_parts(m) for m in ("last", "last_mean", "last_mean_embeddings", "last_mean_embeddings_max",
                                         "response")] == [0, 0, 1, 2, 2]
    assert needs_response_mask("last_mean_embeddings_max") and needs_response_mask("response")
    assert not needs_response_mask("last_mean_embeddings")


@pytest.mark.parametrize("pooling", ["last_mean_embeddings_max", "response"])
def test_training_reads_the_response_positions_the_scorer_reads(tiny_model_dir, tmp_path, pooling):
    """Poolings that read the response's positions: the training loss's rewards (the positions made from the
    collator's lengths) are the scorer's on the same texts, with every part of the head, the max's too, non-zero."""
    from reward.modeling import head_linear, trunk_and_head

    cfg = rm_config(tiny_model_dir, tmp_path, pooling=pooling, max_steps=1)
    train, held = load_splits(cfg)
    trainer = build_trainer(cfg, tmp_path, train, held, None)
    trainer.model.eval()
    head = head_linear(trunk_and_head(trainer.model)[1])
    torch.manual_seed(0)
    with torch.no_grad():
        head.weight.normal_()
    rows = [trainer.train_dataset[i] for i in range(4)]
    scorer = RewardScorer.from_model(trainer.model, trainer.processing_class, cfg.max_length, pool=cfg.pooling)
    prompts = [p.prompt_messages for p in train[:4]]
    assert [r["chosen_ids"] for r in rows] == scorer.encode(prompts, [p.chosen for p in train[:4]])[0]
    with torch.no_grad():
        _, out = trainer.compute_loss(trainer.model, trainer.data_collator(rows), return_outputs=True)
    chosen, rejected = out["logits"].T.tolist()
    assert chosen == pytest.approx(scorer.score(prompts, [p.chosen for p in train[:4]]), abs=1e-4)
    assert rejected == pytest.approx(scorer.score(prompts, [p.rejected for p in train[:4]]), abs=1e-4)
    from reward.modeling import pad_right

    ids, mask = pad_right([r["chosen_ids"] for r in rows], scorer.tokenizer.pad_token_id)
    whole_row = scorer.score_tokens(ids, mask, response_mask=mask).tolist()  # the max over the prompt too
    assert max(abs(a - b) for a, b in zip(whole_row, chosen)) > 1e-2


@pytest.mark.parametrize("pooling", ["last", "last_mean", "last_mean_embeddings", "last_mean_embeddings_max",
                                     "response"])
def test_trunk_layers_scores_from_a_lower_block_standalone_and_attached(tiny_model_dir, tmp_path, pooling):
    cfg = rm_config(tiny_model_dir, tmp_path, trunk_layers=1, lora_top_layers=1, max_steps=3, eval_fraction=0.25,
                    pooling=pooling)
    metrics = run_reward(cfg)
    assert json.loads((Path(cfg.output_dir) / "adapter_config.json").read_text())["layers_to_transform"] == [0]
    if pooling.startswith("last_mean_embeddings") or pooling == "response":  # the embedding part starts at 0, trains
        from reward.attach import lora_weights
        from reward.pooling import embedding_parts

        head = next(w for k, w in lora_weights(cfg.output_dir).items() if "score" in k and k.endswith("weight"))
        hidden = head.shape[1] // (1 + embedding_parts(pooling))
        assert head.shape[0] == 1 and head[:, hidden:2 * hidden].abs().min() > 0  # the mean differs in every pair
        if embedding_parts(pooling) == 2:  # the max: chosen = rejected + " thanks", so a dimension where no pair's
            top = head[0, 2 * hidden:]  # " thanks" tops the body's max is equal on both sides, gets no gradient
            assert top.shape[0] == hidden and (top != 0).float().mean() > 0.5
    assert read_metadata(cfg.output_dir)["trunk_layers"] == 1
    assert read_metadata(cfg.output_dir).get("pool", "last") == pooling
    standalone = RewardScorer.from_pretrained(cfg.output_dir)
    assert len(standalone.trunk.layers) == 1
    _, held = load_splits(cfg)  # the scores measured right after training are the saved model's
    assert evaluate_pairs(standalone, held)["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-5)
    from reward.modeling import pad_right, trunk_and_head
    from reward.pooling import pooled_through

    from reward.pooling import response_tail_mask

    prompts, responses = some_texts(3)  # the training loss's rewards (pooled through the model) are the scorer's
    seqs, lengths = standalone.encode(prompts, responses)
    ids, mask = pad_right(seqs, standalone.tokenizer.pad_token_id)
    response = response_tail_mask(mask, [n + 1 for n in lengths])
    owner = standalone._owner
    with torch.no_grad():
        _, through = pooled_through(owner, trunk_and_head(owner)[1], ids, mask, pooling, trunk_and_head(owner)[0],
                                    response)
    assert through.tolist() == pytest.approx(standalone.score_tokens(ids, mask, response_mask=response).tolist(),
                                             abs=1e-5)
    assert through.tolist() == pytest.approx(standalone.score(prompts, responses), abs=1e-5)
    policy = policy_model(tiny_model_dir)
    assert len(policy.get_base_model().model.layers) == 2
    scorer = RewardScorer.attach(policy, standalone.tokenizer, cfg.output_dir)
    attached = scorer.score(prompts, responses)
    assert attached == pytest.approx(standalone.score(prompts, responses), abs=1e-5)
    with torch.no_grad():  # the block above the RM's trunk is not run: changing it changes nothing
        for p in policy.get_base_model().model.layers[1].parameters():
            p.add_(0.5)
    assert scorer.score(prompts, responses) == pytest.approx(attached, abs=1e-6)
    with pytest.raises(ConfigError, match="lora_top_layers"):
        rm_config(tiny_model_dir, tmp_path, trunk_layers=1, lora_top_layers=2)


def test_margin_column_is_used(tiny_model_dir, tmp_path):
    rows = [dict(r, margin=1.0) for r in easy_rows(24)]
    data = write_jsonl(tmp_path / "margin.jsonl", rows)
    cfg = rm_config(tiny_model_dir, tmp_path, dataset_name=str(data), max_steps=2, eval_fraction=0.0)
    assert run_reward(cfg)["margin_used"] is True
    assert [p.margin for p in load_pairs(str(data))][:2] == [1.0, 1.0]
    cfg = rm_config(tiny_model_dir, tmp_path, dataset_name=str(data), max_steps=2, eval_fraction=0.0, use_margin=False)
    assert run_reward(cfg)["margin_used"] is False


def test_trl_reward_trainer_computes_the_same_loss(tiny_model_dir, tmp_path):
    """On sequences that end in a non-pad token TRL's pooling and ours agree, so must the losses."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    from reward.losses import bradley_terry_loss
    from reward.trainer import PairwiseRewardTrainer
    from rlhf.models import load_tokenizer

    model = build_reward_model(tiny_model_dir, None, torch.float32, torch.device("cpu"), seed=0)
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = {
        "chosen_ids": [[5, 6, 7, 8], [9, 10, 11]],
        "rejected_ids": [[5, 6, 12], [9, 13, 14, 15, 16]],
        "margin": [0.5, -1.0],
    }
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", max_length=None, use_cpu=True)
    for with_margin in (False, True):
        data = datasets.Dataset.from_dict(rows if with_margin else {k: v for k, v in rows.items() if k != "margin"})
        trl_trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        ours = PairwiseRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        batch = trl_trainer.data_collator([data[i] for i in range(2)])
        with torch.no_grad():
            trl_loss = trl_trainer.compute_loss(model, dict(batch))
            our_loss = ours.compute_loss(model, dict(ours.data_collator([data[i] for i in range(2)])))
            chosen, rejected = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).chunk(2)
            )
        expected = bradley_terry_loss(chosen, rejected, torch.tensor(rows["margin"]) if with_margin else None)
        assert trl_loss.item() == pytest.approx(expected.item(), abs=1e-6)
        assert our_loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_shared_responses_are_scored_once_with_the_same_loss(tiny_model_dir, tmp_path):
    """Three comparisons among three responses of one prompt: TRL's collator builds 6 rows, ours 3 distinct
    ones, and the Bradley-Terry loss is the same."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    from reward.trainer import PairwiseRewardTrainer
    from rlhf.models import load_tokenizer

    model = build_reward_model(tiny_model_dir, None, torch.float32, torch.device("cpu"), seed=0)
    tokenizer = load_tokenizer(tiny_model_dir)
    a, b, c = [5, 6, 7, 8], [5, 6, 9], [5, 6, 10, 11, 12]
    data = datasets.Dataset.from_dict({"chosen_ids": [a, a, b], "rejected_ids": [b, c, c]})
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", max_length=None, use_cpu=True)
    trl_trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    ours = PairwiseRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    rows = [data[i] for i in range(3)]
    full, unique = trl_trainer.data_collator(rows), ours.data_collator(rows)
    assert full["input_ids"].shape[0] == 6 and unique["input_ids"].shape[0] == 3
    assert unique["pair_index"].tolist() == [[0, 1], [0, 2], [1, 2]]
    with torch.no_grad():
        assert ours.compute_loss(model, dict(unique)).item() == pytest.approx(
            trl_trainer.compute_loss(model, dict(full)).item(), abs=1e-6)


def test_grouped_sampler_keeps_each_prompt_together_and_reshuffles():
    from reward.trainer import GroupedSampler

    groups = ["p", "q", "p", "r", "q", "p"]
    sampler = GroupedSampler(groups, seed=3)
    epochs = [list(sampler) for _ in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(6))
        keys = [groups[i] for i in order]
        runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert sorted(runs) == ["p", "q", "r"]            # each prompt's pairs come together, once
    assert len({tuple(o) for o in epochs}) > 1            # a new order every epoch
    assert list(GroupedSampler(groups, seed=3)) == epochs[0]  # seeded


def test_unique_rows_by_hand():
    from reward.losses import unique_rows

    seqs, index = unique_rows([[1, 2], [3]], [[3], [4]])
    assert seqs == [[1, 2], [3], [4]] and index == [(0, 1), (1, 2)]


def test_bf16_reward_model_on_cpu_uses_eager_attention(tiny_model_dir):
    """As the policy's base (``rlhf.models.attention_choice``): plain attention products for half precision on a
    CPU, the model's default in fp32."""
    cpu = torch.device("cpu")
    half = build_reward_model(tiny_model_dir, None, torch.bfloat16, cpu, seed=0)
    full = build_reward_model(tiny_model_dir, None, torch.float32, cpu, seed=0)
    assert half.config._attn_implementation == "eager"
    assert full.config._attn_implementation != "eager"
