"""Agreement metrics and vote -> pair rules, against numbers worked out by hand."""

import pytest

from feedback_ui.agreement import cohen_kappa, krippendorff_alpha_nominal, percent_agreement
from feedback_ui.pairs import (
    Judgement,
    aggregate,
    judgement_pairs,
    ranking_to_pairs,
    split_by_prompt,
    strength_to_margin,
)


def test_cohen_kappa_hand_computed():
    # 10 items, two labelers, labels A/B:
    #   items 1-4 both A, 5-6 A vs B, 7-9 both B, 10 B vs A
    #   p_o = 7/10 = 0.7
    #   labeler 1: A 6, B 4; labeler 2: A 5, B 5
    #   p_e = 0.6*0.5 + 0.4*0.5 = 0.5
    #   kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    first = list("AAAAAABBBB")
    second = list("AAAABBBBBA")
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(first, first) == pytest.approx(1.0)
    assert cohen_kappa(list("AB"), list("BA")) == pytest.approx(-1.0)  # p_o 0, p_e 0.5
    assert cohen_kappa(list("AA"), list("AA")) is None  # p_e = 1: undefined
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa(["A"], [])


def test_krippendorff_alpha_hand_computed():
    # units: u1 = a a a, u2 = a b, u3 = b b b, u4 = a (one label: not pairable)
    # coincidences: u1 gives 6 ordered (a,a) pairs / (3-1) = 3; u2 gives (a,b) and (b,a) 1 each;
    # u3 gives (b,b) 3.  o_aa = 3, o_ab = o_ba = 1, o_bb = 3; n_a = n_b = 4, n = 8
    # alpha = 1 - (n-1) * sum_{c!=k} o_ck / sum_{c!=k} n_c n_k = 1 - 7 * 2 / (2 * 4 * 4) = 1 - 14/32 = 0.5625
    units = [["a", "a", "a"], ["a", "b"], ["b", "b", "b"], ["a"]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.5625)
    # pairwise agreement: u1 3 of 3, u2 0 of 1, u3 3 of 3 -> 6/7
    assert percent_agreement(units) == pytest.approx(6 / 7)
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None  # one value only: D_e = 0
    assert krippendorff_alpha_nominal([["a"], ["b"]]) is None


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units,
    # missing values; nominal alpha = 0.743
    obs = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in col if v is not None] for col in zip(*obs)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_ranking_strategies():
    assert ranking_to_pairs([3, 1, 2], "all-pairs") == [(3, 1), (3, 2), (1, 2)]
    assert ranking_to_pairs([3, 1, 2], "best-vs-rest") == [(3, 1), (3, 2)]
    assert ranking_to_pairs([5, 4], "best-vs-rest") == [(5, 4)]
    assert len(ranking_to_pairs(list(range(5)), "all-pairs")) == 10  # K(K-1)/2
    with pytest.raises(ValueError):
        ranking_to_pairs([1, 2], "nope")


def test_strength_to_margin():
    assert strength_to_margin(None) == 0.0
    assert strength_to_margin("slightly") == 1.0
    assert strength_to_margin("much") == 3.0
    assert strength_to_margin("much", slightly=0.5, much=2.0) == 2.0


def test_edit_is_ranked_above_every_response():
    j = Judgement("ann", "ranked", (1, 2), margin=1.0, edit=9)
    got = {(p.chosen, p.rejected, p.margin) for p in judgement_pairs(j)}
    assert got == {(1, 2, 1.0), (9, 1, 0.0), (9, 2, 0.0)}


def test_majority_and_all():
    votes = [
        Judgement("ann", "ranked", (1, 2), margin=1.0, created_at="t1"),
        Judgement("bob", "ranked", (1, 2), margin=3.0, created_at="t2"),
        Judgement("cy", "tie", (2, 1), created_at="t3"),
    ]
    (only,) = aggregate(votes, method="majority")
    # 2 of 3 voters prefer 1 over 2 (> 3/2): kept, margin = mean(1, 3)
    assert (only.chosen, only.rejected, only.margin, only.outcome) == (1, 2, 2.0, "ranked")
    assert only.annotators == ("ann", "bob") and only.created_at == "t2"
    every = aggregate(votes, method="all")
    assert [(p.chosen, p.rejected, p.outcome, p.annotators) for p in every] == [
        (1, 2, "ranked", ("ann",)), (1, 2, "ranked", ("bob",)), (1, 2, "tie", ("cy",))
    ]  # fmt: skip
    # 1 vs 1: no strict majority, nothing exported
    split = [Judgement("ann", "ranked", (1, 2)), Judgement("bob", "ranked", (2, 1))]
    assert aggregate(split, method="majority") == []
    # a tie wins only with its own majority
    ties = [Judgement("ann", "tie", (1, 2)), Judgement("bob", "tie", (2, 1)), Judgement("cy", "ranked", (2, 1))]
    assert [(p.chosen, p.rejected, p.outcome) for p in aggregate(ties)] == [(1, 2, "tie")]


def test_majority_on_rankings_and_edits():
    votes = [
        Judgement("ann", "ranked", (3, 1, 2), edit=7),
        Judgement("bob", "ranked", (3, 2, 1)),
        Judgement("cy", "ranked", (1, 3, 2)),
    ]
    got = {(p.chosen, p.rejected) for p in aggregate(votes, "all-pairs", "majority")}
    # 3>1: ann, bob (2/3); 3>2: all; 1>2: ann, cy (2/3); ann's edit beats each of her shown responses
    assert got == {(3, 1), (3, 2), (1, 2), (7, 3), (7, 1), (7, 2)}
    best = {(p.chosen, p.rejected) for p in aggregate(votes, "best-vs-rest", "majority")}
    # best-vs-rest: 3>1 (ann, bob), 3>2 (ann, bob), 1>3 and 1>2 (cy only)
    assert best == {(3, 1), (3, 2), (7, 3), (7, 1), (7, 2)}


def test_split_by_prompt_is_deterministic_and_whole():
    prompts = [f"p{i}" for i in range(10) for _ in range(3)]
    test = split_by_prompt(prompts, 0.2, seed=1)
    assert len(test) == 2 and test <= set(prompts)
    assert split_by_prompt(list(reversed(prompts)), 0.2, seed=1) == test  # order does not matter
    assert split_by_prompt(prompts, 0.0) == set()
    assert len(split_by_prompt(["a", "b"], 0.9)) == 1  # at least one prompt on each side
    assert split_by_prompt(["a"], 0.5) == set()
