"""Reward models: training (``rlhf reward``), evaluation (``rlhf reward evaluate``) and scoring.

``from reward import RewardScorer`` is resolved lazily so that importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reward.scorer import RewardScorer

__all__ = ["RewardScorer"]


def __getattr__(name: str):
    if name == "RewardScorer":
        from reward.scorer import RewardScorer

        return RewardScorer
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
