"""Active labeling: which candidate comparisons are worth a labeler's time.

Pure functions over plain numbers (no model, no database): the reward model's rewards go in, the
indices of the comparisons to create come out. ``rlhf label candidates --selection`` wires them.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def preference_probability(r_a: float, r_b: float) -> float:
    """Bradley-Terry P(a preferred to b) = sigmoid(r_a - r_b), computed without overflow."""
    d = r_a - r_b
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def pair_uncertainty(rewards_a: Sequence[float], rewards_b: Sequence[float]) -> float:
    """How unsure the reward model is about the pair (a, b); higher = more informative to label.

    ``rewards_a``, ``rewards_b``: each member's reward for a and for b (K values; K = 1 for a single
    reward model). With p_k = sigmoid(r_a^k - r_b^k):

    * K = 1: u = 1 - 2 |p_1 - 1/2|, in [0, 1]: 1 when the model says 50%, towards 0 when it is sure;
    * K > 1: u = std_k(p_k) (population std over members), in [0, 1/2]: the members' disagreement
      about the pair's preference (members that agree, however unsure, give 0).
    """
    if len(rewards_a) != len(rewards_b) or not rewards_a:
        raise ValueError("rewards_a and rewards_b need one reward per member each (K >= 1)")
    probs = [preference_probability(a, b) for a, b in zip(rewards_a, rewards_b)]
    if len(probs) == 1:
        return 1.0 - 2.0 * abs(probs[0] - 0.5)
    mean = sum(probs) / len(probs)
    return math.sqrt(sum((p - mean) ** 2 for p in probs) / len(probs))


def pair_uncertainties(rewards: Sequence[Sequence[float]], pairs: Sequence[tuple[int, int]]) -> list[float]:
    """:func:`pair_uncertainty` of every pair.

    ``rewards``: (K, R) nested lists, member k's reward for response r (as ``RewardScorer.score_members``
    returns them); ``pairs``: (a, b) response indices into R.
    """
    return [pair_uncertainty([m[a] for m in rewards], [m[b] for m in rewards]) for a, b in pairs]


def most_uncertain(scores: Sequence[float], budget: int) -> list[int]:
    """Indices of the ``budget`` highest ``scores`` (ties: the earlier index first), in ascending order."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[: max(0, budget)])


def random_selection(n: int, budget: int, seed: int) -> list[int]:
    """``min(budget, n)`` distinct indices of range(n) drawn with ``random.Random(seed)``, in ascending order."""
    return sorted(random.Random(seed).sample(range(n), min(max(0, budget), n)))
