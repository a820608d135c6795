"""Votes -> preference pairs (pure functions, no database).

A :class:`Judgement` is one labeler's answer in response ids. Rankings become
pairs by a strategy:

- ``all-pairs``:    r_1 > r_2 > ... > r_K gives every (r_i, r_j), i < j: K(K-1)/2 pairs
- ``best-vs-rest``: (r_1, r_j) for j = 2..K: K-1 pairs

A labeler's edit of the best answer is ranked above every shown response.
Several labelers on one comparison are combined by ``all`` (every vote is a
row) or ``majority`` (a direction is kept when strictly more than half of the
comparison's voters support it; ties and both-bad count as votes for neither
direction and win only with their own strict majority).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Optional, Sequence

STRATEGIES = ("all-pairs", "best-vs-rest")
AGGREGATIONS = ("majority", "all")


@dataclass(frozen=True)
class Judgement:
    annotator: str
    outcome: str  # ranked | tie | both_bad
    ranking: tuple[int, ...]  # best first (shown order for tie / both_bad)
    margin: float = 0.0
    edit: Optional[int] = None  # the labeler's improved answer, above ranking[0]
    created_at: str = ""


@dataclass(frozen=True)
class PrefPair:
    chosen: int
    rejected: int
    margin: float
    outcome: str  # ranked | tie | both_bad
    annotators: tuple[str, ...] = field(default=())
    created_at: str = ""


def strength_to_margin(strength: Optional[str], slightly: float = 1.0, much: float = 3.0) -> float:
    """Margin for the reward loss -log sigma(r_chosen - r_rejected - margin); no strength -> 0."""
    return {"slightly": slightly, "much": much}.get(strength or "", 0.0)


def ranking_to_pairs(ranking: Sequence[int], strategy: str = "all-pairs") -> list[tuple[int, int]]:
    """(better, worse) pairs from a ranking, best first."""
    if strategy == "all-pairs":
        return [(ranking[i], ranking[j]) for i, j in combinations(range(len(ranking)), 2)]
    if strategy == "best-vs-rest":
        return [(ranking[0], r) for r in ranking[1:]]
    raise ValueError(f"unknown ranking strategy {strategy!r} (use {', '.join(STRATEGIES)})")


def _edit_pairs(j: Judgement) -> list[PrefPair]:
    if j.edit is None:
        return []
    return [PrefPair(j.edit, r, 0.0, "ranked", (j.annotator,), j.created_at) for r in j.ranking]


def judgement_pairs(j: Judgement, strategy: str = "all-pairs", with_edit: bool = True) -> list[PrefPair]:
    """One vote as pairs: decisive -> strategy pairs (+ edit pairs); tie / both-bad -> each unordered pair."""
    if j.outcome == "ranked":
        pairs = ranking_to_pairs(j.ranking, strategy)
        return [PrefPair(b, w, j.margin, "ranked", (j.annotator,), j.created_at) for b, w in pairs] + (
            _edit_pairs(j) if with_edit else []
        )
    return [PrefPair(a, b, 0.0, j.outcome, (j.annotator,), j.created_at) for a, b in combinations(sorted(j.ranking), 2)]


def aggregate(judgements: Sequence[Judgement], strategy: str = "all-pairs", method: str = "majority") -> list[PrefPair]:
    """Pairs for one comparison from all its votes (see the module docstring for the rules)."""
    if method == "all":
        return [p for j in judgements for p in judgement_pairs(j, strategy)]
    if method != "majority":
        raise ValueError(f"unknown aggregation {method!r} (use {', '.join(AGGREGATIONS)})")
    n_voters = len(judgements)
    support: dict[tuple, list[PrefPair]] = defaultdict(list)
    out: list[PrefPair] = []
    for j in judgements:
        out.extend(_edit_pairs(j))  # an edit has one author: nothing to aggregate
        for p in judgement_pairs(j, strategy, with_edit=False):
            support[(p.chosen, p.rejected, p.outcome)].append(p)
    for (chosen, rejected, outcome), ps in sorted(support.items()):
        if len(ps) * 2 > n_voters:
            out.append(
                PrefPair(
                    chosen,
                    rejected,
                    sum(p.margin for p in ps) / len(ps),
                    outcome,
                    tuple(sorted(a for p in ps for a in p.annotators)),
                    max(p.created_at for p in ps),
                )
            )
    return out


def split_by_prompt(prompts: Iterable[str], test_fraction: float, seed: int = 0) -> set[str]:
    """The prompts that go to the test file: round(N * test_fraction) of the N distinct prompts.

    Prompts are ordered by sha256(seed:prompt), so the split is deterministic,
    independent of row order, and every row of a prompt lands on the same side.
    With test_fraction > 0 and N >= 2, at least one prompt goes to each side.
    """
    unique = sorted(set(prompts), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    if test_fraction <= 0 or len(unique) < 2:
        return set()
    n_test = min(max(1, round(len(unique) * test_fraction)), len(unique) - 1)
    return set(unique[:n_test])
