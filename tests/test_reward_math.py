"""Pure reward-model math: Bradley-Terry loss, pair metrics, Pearson, the labelling rule."""

import math

import pytest
import torch

from reward.losses import bradley_terry_loss, mean_std, pearson, preference_metrics
from reward.pooling import last_token_index, position_ids_from_mask
from reward.rules import rule_prefers, rule_score


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2
    per_pair = [math.log(1 + math.exp(-1)), math.log(2)]
    assert bradley_terry_loss(chosen, rejected, reduction="none").tolist() == pytest.approx(per_pair, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((0.31326169 + 0.69314718) / 2, abs=1e-6)


def test_bradley_terry_loss_with_margin_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 0.0])
    margin = torch.tensor([0.5, -1.0])
    # -log sigmoid(1 - 0.5) = log(1 + e^-0.5) = 0.47407698; -log sigmoid(0 + 1) = 0.31326169
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx((0.47407698 + 0.31326169) / 2, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, margin, reduction="sum").item() == pytest.approx(0.78733867, abs=1e-6)


def test_bradley_terry_loss_does_not_mutate_inputs_and_has_gradient_on_rewards_only():
    chosen = torch.tensor([2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.5, 0.5], requires_grad=True)
    margin = torch.tensor([1.0, 0.0])
    bradley_terry_loss(chosen, rejected, margin).backward()
    assert margin.tolist() == [1.0, 0.0] and margin.grad is None
    # d/dr_c of -log sigmoid(d) = -(1 - sigmoid(d)) / B, d = r_c - r_r - m
    d = torch.tensor([0.5, -1.5])
    assert chosen.grad.tolist() == pytest.approx((-(1 - torch.sigmoid(d)) / 2).tolist(), abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx(((1 - torch.sigmoid(d)) / 2).tolist(), abs=1e-6)


def test_pearson_and_mean_std_by_hand():
    # dx = [-1, 0, 1], dy = [-4/3, -1/3, 5/3]: sxy = 3, sxx = 2, syy = 42/9
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_preference_metrics_by_hand():
    m = preference_metrics([1.0, 0.0, 2.0], [0.0, 0.0, 3.0], None, [1, 2, 3], [4, 5, 6])
    assert m["n"] == 3
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)  # a tie counts half
    assert m["mean_margin"] == pytest.approx((1 + 0 - 1) / 3)
    assert m["loss"] == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(1))) / 3)
    assert m["reward_mean"] == pytest.approx(1.0)
    assert m["length_correlation"] == pytest.approx(pearson([1, 0, 2, 0, 0, 3], [1, 2, 3, 4, 5, 6]))
    with_margin = preference_metrics([1.0], [0.0], [0.5])
    assert with_margin["loss"] == pytest.approx(math.log(1 + math.exp(-0.5)))


def test_pooling_positions_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])  # (2, 4)
    assert last_token_index(mask).tolist() == [2, 3]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]


def test_rule_score_and_preference_by_hand():
    twenty = " ".join(["word"] * 19) + " end."
    assert rule_score("q", twenty) == pytest.approx(1.0)  # 20 words, full stop
    assert rule_score("q", " ".join(["w"] * 30)) == pytest.approx(0.5 * (1 - 10 / 20))  # no full stop
    assert rule_score("q", "Yes.") == pytest.approx(0.5 * (1 / 20) + 0.5)
    assert rule_score("q", "   ") == 0.0
    assert rule_score("q", " ".join(["w"] * 45)) == 0.0  # over twice the target, unfinished
    assert rule_prefers("q", twenty, "Yes.") == "a"
    assert rule_prefers("q", "Yes.", twenty) == "b"
    assert rule_prefers("q", "Yes.", "No.") is None  # equal scores
    assert rule_prefers("q", "One two three.", "One two three four.", min_gap=0.3) is None  # gap 0.025
