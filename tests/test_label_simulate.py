"""The simulated labelers' decisions (feedback_ui.simulate), without a server."""

import random

from feedback_ui.simulate import rule_choice, rule_ranking


def words(prompt, response):
    return float(len(response.split()))


def test_a_pair_goes_to_the_higher_score_and_equal_scores_are_a_tie_on_either_side():
    rng = random.Random(0)
    assert rule_choice("q", ["one two", "one"], words, 0.0, rng, 0.0) == "A"
    assert rule_choice("q", ["one", "one two"], words, 0.0, rng, 0.0) == "B"
    assert rule_choice("q", ["one", "two"], words, 0.0, rng, 0.0) == "tie"  # never the side shown second
    assert rule_choice("q", ["one two", "one"], words, 1.5, rng, 0.0) == "tie"  # closer than min_gap
    assert rule_choice("q", ["one two", "one"], words, 0.0, rng, 1.0) == "B"  # noise 1: always against the rule


def test_a_ranking_follows_the_scores_and_noise_swaps_two_neighbours():
    responses = ["a", "a b c", "a b", "a b c d"]
    assert rule_ranking("q", responses, words) == [3, 1, 2, 0]
    assert rule_ranking("q", responses, words, random.Random(0), noise=0.0) == [3, 1, 2, 0]
    for seed in range(5):  # noise 1: the rule's order with exactly one pair of neighbours swapped
        got = rule_ranking("q", responses, words, random.Random(seed), noise=1.0)
        changed = [i for i in range(4) if got[i] != [3, 1, 2, 0][i]]
        assert len(changed) == 2 and changed[1] == changed[0] + 1 and sorted(got) == [0, 1, 2, 3]
