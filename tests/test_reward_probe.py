"""The linear-probe start of the reward head (head_init: probe): the math by hand, the wiring on the tiny model."""

import math

import pytest
import torch

from reward.pooling import AUTO_CANDIDATES
from reward.probe import (L2_GRID, choose_l2, choose_pooling, cv_accuracy, fit_bradley_terry, folds_by_group,
                          probe_feature_set, probe_weights)


def test_one_pair_optimum_by_hand():
    # softplus(-v) + 0.5 v^2 is minimal where its derivative -1/(1 + e^v) + v is 0: v (1 + e^v) = 1.
    # Newton's method on that equation by hand from v = 0.4: v = 0.401058...
    v = fit_bradley_terry(torch.tensor([[1.0]]), l2=0.5)
    assert v.item() == pytest.approx(0.401058, abs=1e-5)
    assert v.item() * (1 + math.exp(v.item())) == pytest.approx(1.0, abs=1e-6)


def test_opposite_pairs_cancel_and_l2_shrinks():
    # two pairs that disagree: the gradient at 0 is -(1/2)(1/2) + (1/2)(1/2) = 0, so v = 0
    assert fit_bradley_terry(torch.tensor([[1.0], [-1.0]]), l2=0.1).abs().item() < 1e-8
    # a stronger penalty gives a smaller weight on the same pair
    weak, strong = (fit_bradley_terry(torch.tensor([[2.0, 0.0]]), l2).norm().item() for l2 in (0.01, 1.0))
    assert weak > strong > 0
    with pytest.raises(ValueError):
        fit_bradley_terry(torch.tensor([[1.0]]), l2=0.0)


def test_folds_keep_each_group_together():
    assert folds_by_group(["a", "a", "b", "c", "b", "d"], 2) == [0, 0, 1, 0, 1, 1]
    assert folds_by_group(["x", "y", "z"], 5) == [0, 1, 2]


def test_choose_l2_prefers_the_larger_penalty_on_ties_and_needs_two_groups():
    # every pair says feature 0 wins: every l2 ranks every held-out fold right, so the largest is chosen
    diffs = torch.tensor([[1.0, 0.3], [2.0, -0.5], [1.5, 0.1], [0.5, -0.2]])
    l2, scores = choose_l2(diffs, ["p", "q", "r", "s"], grid=(0.01, 1.0), k=2)
    assert scores == {0.01: 1.0, 1.0: 1.0} and l2 == 1.0
    assert choose_l2(diffs, ["p"] * 4) == (max(L2_GRID), {})


def test_cv_accuracy_by_hand():
    # folds: a, c -> 0; b, d -> 1. Fold 0 held out: trained on rows 1, 3 (both +1) -> v > 0: row 0 right, row 2
    # (-1) wrong. Fold 1 held out: trained on rows 0, 2 (+1, -1) -> v = 0 exactly: rows 1, 3 score 0, not > 0.
    diffs = torch.tensor([[1.0], [1.0], [-1.0], [1.0]])
    assert cv_accuracy(diffs, folds_by_group(["a", "b", "c", "d"], 2), l2=0.1) == 0.25


def test_probe_weights_read_raw_features():
    # scaling a feature by 10 scales its standardised difference by 1: the raw weight shrinks by 10
    chosen = torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.0, 2.0], [2.5, 1.5]])
    rejected = torch.tensor([[1.0, 1.5], [2.0, 0.5], [0.5, 2.0], [1.0, 1.0]])
    groups = ["a", "b", "c", "d"]
    w, summary = probe_weights(chosen, rejected, groups, grid=(0.1,), k=2)
    scaled = torch.tensor([10.0, 1.0])
    w10, _ = probe_weights(chosen * scaled, rejected * scaled, groups, grid=(0.1,), k=2)
    assert torch.allclose(w10 * scaled, w, atol=1e-8)
    assert summary["l2"] == 0.1 and summary["train_accuracy"] == 1.0
    assert ((chosen.double() - rejected.double()) @ w > 0).all()


def test_feature_set_keeps_the_extra_features_only_where_they_earn_it():
    signs = torch.tensor([1.0, -1.0] * 10)
    groups = [f"p{i}" for i in range(20)]
    # feature 0 decides every pair, feature 1 is noise: the narrow set is kept, the extra weight is exactly 0
    chosen, rejected = torch.stack([torch.ones(20), signs], 1), torch.zeros(20, 2)
    w, summary = probe_feature_set(chosen, rejected, groups, narrow=1, grid=(0.1,), k=5)
    assert summary["features"] == "narrow" and summary["cv_accuracy_narrow"] == 1.0 and w[1] == 0 and w[0] > 0
    # feature 0 is noise, feature 1 decides every pair: all features
    chosen = torch.stack([signs, torch.ones(20)], 1)
    w, summary = probe_feature_set(chosen, rejected, groups, narrow=1, grid=(0.1,), k=5)
    assert summary["features"] == "all" and summary["cv_accuracy_all"] == 1.0 and w[1] > 0


@pytest.mark.parametrize("wider_cv, kept", [(0.85, "narrow"), (0.9, "all")])
def test_feature_set_one_standard_error_by_hand(monkeypatch, wider_cv, kept):
    import reward.probe as probe

    # 12 pairs, narrow cross-validated accuracy 0.75: one standard error is sqrt(0.75 * 0.25 / 12) = 0.125, so
    # 0.85 (+0.10) keeps the narrow set and 0.90 (+0.15) takes all features
    def fake(chosen, rejected, groups, grid, k):
        return torch.zeros(chosen.shape[1]), {"l2": 1.0, "cv_accuracy": 0.75 if chosen.shape[1] == 1 else wider_cv}

    monkeypatch.setattr(probe, "probe_weights", fake)
    _, summary = probe.probe_feature_set(torch.zeros(12, 3), torch.zeros(12, 3), list(range(12)), narrow=1)
    assert summary["features"] == kept


def test_choose_pooling_keeps_the_incumbent_unless_another_earns_it():
    signs = torch.tensor([1.0, -1.0] * 10)
    groups = [f"p{i}" for i in range(20)]
    rejected = torch.zeros(20, 2)
    decides = (torch.stack([torch.ones(20), torch.zeros(20)], 1), rejected)  # feature 0 > 0 on every chosen side
    noise = (torch.stack([signs, torch.zeros(20)], 1), rejected)
    # both rank every pair: the incumbent (first) stays
    name, _, summary = choose_pooling({"a": decides, "b": decides}, groups, narrow=1, grid=(0.1,), k=5)
    assert name == "a" and summary["pooling"] == "a" and summary["cv_accuracy_by_pooling"] == {"a": 1.0, "b": 1.0}
    # the incumbent's features are noise, the other's rank every pair: the other, with its own probe's weights
    name, w, summary = choose_pooling({"a": noise, "b": decides}, groups, narrow=1, grid=(0.1,), k=5)
    assert name == "b" and summary["cv_accuracy_by_pooling"]["b"] == 1.0
    assert summary["cv_accuracy_by_pooling"]["a"] < 0.5
    assert torch.equal(w, probe_feature_set(*decides, groups, narrow=1, grid=(0.1,), k=5)[0])


@pytest.mark.parametrize("challengers, kept", [((0.85,), "a"), ((0.9,), "b"), ((0.9, 0.95), "c"), ((0.95, 0.9), "b"),
                                               ((0.85, 0.8), "a")])
def test_choose_pooling_one_standard_error_by_hand(monkeypatch, challengers, kept):
    import reward.probe as probe

    # 12 pairs, the incumbent's cross-validated accuracy 0.75: one standard error is sqrt(0.75 * 0.25 / 12) = 0.125,
    # so a challenger needs more than 0.875; of several that do, the best. Candidate i's features are all i.
    accuracy = (0.75, *challengers)

    def fake(chosen, rejected, groups, narrow, grid, k):
        return torch.zeros(chosen.shape[1]), {"cv_accuracy": accuracy[int(chosen[0, 0])]}

    monkeypatch.setattr(probe, "probe_feature_set", fake)
    names = "abc"[: len(accuracy)]
    candidates = {name: (torch.full((12, 2), float(i)), torch.zeros(12, 2)) for i, name in enumerate(names)}
    name, _, summary = probe.choose_pooling(candidates, list(range(12)), narrow=1)
    assert name == kept == summary["pooling"]
    assert list(summary["cv_accuracy_by_pooling"].values()) == list(accuracy)


def test_pooling_auto_needs_the_probe(tiny_model_dir, tmp_path):
    from rlhf.errors import ConfigError

    from tests.test_reward_model import rm_config

    with pytest.raises(ConfigError, match="pooling.: auto is chosen by the head probe"):
        rm_config(tiny_model_dir, tmp_path, pooling="auto", head_init="random")


def test_pooling_auto_with_pairs_of_one_prompt_keeps_the_incumbent(tiny_model_dir, tmp_path):
    """With one training prompt there is nothing to cross-validate on: the first candidate stays, and the run
    reports that instead of failing."""
    from reward.train import run_reward
    from rlhf.testing import write_jsonl

    from tests.test_reward_model import easy_rows, rm_config

    rows = [dict(r, prompt="Say something.") for r in easy_rows(12)]
    held = write_jsonl(tmp_path / "held.jsonl", easy_rows(8, seed=1))
    cfg = rm_config(tiny_model_dir, tmp_path, pooling="auto", head_init="probe", max_steps=2,
                    dataset_name=str(write_jsonl(tmp_path / "one_prompt.jsonl", rows)), eval_dataset_name=str(held))
    metrics = run_reward(cfg)
    assert metrics["pooling"] == AUTO_CANDIDATES[0]
    assert metrics["head_probe"]["cv_accuracy_by_pooling"] == {m: None for m in AUTO_CANDIDATES}


@pytest.mark.parametrize("forced", AUTO_CANDIDATES)
def test_pooling_auto_trains_scores_and_saves_the_pooling_the_probe_chose(tiny_model_dir, tmp_path, monkeypatch,
                                                                          forced):
    """An ensemble of 2 under pooling auto: member 0's probe chooses (here forced to each candidate by leaving it
    alone among them), member 1 trains with that pooling, reward_model.json names it, and the saved model scores
    the held-out pairs as training measured them."""
    import json

    import reward.probe as probe
    from reward.evaluate import evaluate_pairs
    from reward.scorer import RewardScorer
    from reward.train import run_reward
    from rlhf.pairs import load_splits

    from tests.test_reward_model import rm_config

    real = probe.choose_pooling
    seen = []

    def only_forced(candidates, *args, **kwargs):
        seen.append(tuple(candidates))
        return real({forced: candidates[forced]}, *args, **kwargs)

    monkeypatch.setattr(probe, "choose_pooling", only_forced)
    cfg = rm_config(tiny_model_dir, tmp_path, pooling="auto", head_init="probe", max_steps=3, ensemble=2,
                    ensemble_bootstrap=False)
    metrics = run_reward(cfg)
    assert seen == [AUTO_CANDIDATES]  # member 0 chose among both; member 1 did not choose again
    assert metrics["pooling"] == forced and metrics["members"][0]["head_probe"]["pooling"] == forced
    assert "pooling" not in metrics["members"][1]["head_probe"]
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["pool"] == forced
    scorer = RewardScorer.from_pretrained(cfg.output_dir)
    _, held = load_splits(cfg)
    assert evaluate_pairs(scorer, held)["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert evaluate_pairs(scorer, held)["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-4)


@pytest.mark.parametrize("pooling", ["last_mean", "last_mean_embeddings", "last_mean_embeddings_max"])
def test_probe_head_sets_the_head_the_scorer_reads(tiny_model_dir, tmp_path, pooling):
    from reward.evaluate import evaluate_pairs
    from reward.member import build_trainer, probe_head
    from reward.modeling import head_linear, trunk_and_head
    from reward.scorer import RewardScorer
    from rlhf.pairs import load_splits

    from tests.test_reward_model import rm_config

    cfg = rm_config(tiny_model_dir, tmp_path, pooling=pooling, head_init="probe")
    train, held = load_splits(cfg)
    trainer = build_trainer(cfg, tmp_path, train, held, None)
    head = head_linear(trunk_and_head(trainer.model)[1])
    before = head.weight.detach().clone()
    summary = probe_head(trainer, cfg, train)
    assert not torch.equal(before, head.weight)
    assert summary["l2"] in L2_GRID and 0.0 <= summary["cv_accuracy"] <= 1.0
    scorer = RewardScorer.from_model(trainer.model, trainer.processing_class, cfg.max_length, pool=cfg.pooling)
    # the probe's own training accuracy is what the model now scores on the same pairs
    assert evaluate_pairs(scorer, train)["accuracy"] == pytest.approx(summary["train_accuracy"], abs=1e-9)
    assert summary["train_accuracy"] > 0.9  # chosen = rejected + " thanks": one word's evidence in the mean


def test_run_reward_with_a_probe_head_records_it(tiny_model_dir, tmp_path):
    import json

    from reward.train import run_reward

    from tests.test_reward_model import rm_config

    cfg = rm_config(tiny_model_dir, tmp_path, head_init="probe", max_steps=6)
    metrics = run_reward(cfg)
    probe = metrics["head_probe"]
    assert probe["l2"] in L2_GRID and probe["seconds"] >= 0 and 0.0 <= probe["train_accuracy"] <= 1.0
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["head_probe"] == probe
    assert metrics["eval_accuracy"] >= 0.9


def test_an_embedding_part_left_out_by_the_probe_gets_no_gradient(tiny_model_dir, tmp_path):
    from reward.member import build_trainer
    from reward.modeling import head_linear, trunk_and_head
    from reward.train import run_reward
    from rlhf.pairs import load_splits

    from tests.test_reward_model import rm_config

    cfg = rm_config(tiny_model_dir, tmp_path, pooling="last_mean_embeddings", max_steps=3)
    train, held = load_splits(cfg)
    trainer = build_trainer(cfg, tmp_path, train, held, None)
    head = head_linear(trunk_and_head(trainer.model)[1])
    hidden = head.hidden_size
    head.embedding_trainable = False  # as probe_head leaves it when cross-validation keeps the state alone
    before = head.weight.detach().clone()
    trainer.train()
    assert torch.equal(head.weight[:, hidden:], before[:, hidden:])  # 0 before, 0 after
    assert not torch.equal(head.weight[:, :hidden], before[:, :hidden])
    cfg = rm_config(tiny_model_dir, tmp_path, pooling="last_mean_embeddings", head_init="probe", max_steps=2)
    probe = run_reward(cfg)["head_probe"]  # the choice and both cross-validated accuracies are recorded
    assert probe["features"] in ("narrow", "all")
    assert 0.0 <= probe["cv_accuracy_narrow"] <= 1.0 and 0.0 <= probe["cv_accuracy_all"] <= 1.0


@pytest.mark.parametrize("kind", ["ensemble_length_head", "loreft"])
def test_the_shipped_head_options_with_ensembles_length_heads_and_loreft(tiny_model_dir, tmp_path, kind):
    """pooling auto + head_init probe (configs/reward.yaml) with the other reward options: the saved model scores
    the held-out pairs as training measured them."""
    from reward.evaluate import evaluate_pairs
    from reward.scorer import RewardScorer
    from reward.train import run_reward
    from rlhf.pairs import load_splits

    from tests.test_reward_model import rm_config

    extra = (dict(ensemble=2, length_debias="length_head", ensemble_bootstrap=False) if kind == "ensemble_length_head"
             else dict(method="loreft", reft_rank=4, reft_layers=[]))
    cfg = rm_config(tiny_model_dir, tmp_path, pooling="auto", head_init="probe", max_steps=3, **extra)
    metrics = run_reward(cfg)
    scorer = RewardScorer.from_pretrained(cfg.output_dir)
    _, held = load_splits(cfg)
    assert evaluate_pairs(scorer, held)["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert evaluate_pairs(scorer, held)["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-4)
