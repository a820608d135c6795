"""Disabling a labeler and re-queuing their work: their votes stop counting, their comparisons go back to the pool.

Nothing is deleted. In one transaction the account is disabled and its sessions end (the path
``rlhf label user disable`` takes), each of the labeler's counted votes gets ``voided_at``, and each
of their done or open assignments becomes ``requeued``; every regular comparison among them gives
its overlap slot back (``n_active - 1``), so another labeler can take it. Gold items have no overlap
limit and only lose the vote. Stats, agreement and export read counted votes only (``Vote.counted()``).

Locks on PostgreSQL follow :mod:`feedback_ui.assign`: the labeler's row first, then that labeler's
assignment rows, then comparison rows in id order.
"""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa

from feedback_ui.assign import lock_labeler
from feedback_ui.auth import disable_in
from feedback_ui.store import Assignment, Comparison, Store, Vote, utcnow

REQUEUED = "requeued"


def disable_and_requeue(store: Store, name: str) -> dict:
    """Disable ``name`` and re-queue their work; returns what changed:
    ``sessions_ended``, ``votes_voided``, ``comparisons_requeued`` (regular ones whose slot returned)."""
    now = utcnow()
    with store.write() as s:
        user, ended = disable_in(s, name)
        lock_labeler(s, user.id)
        rows = s.execute(
            sa.select(Assignment.id, Assignment.comparison_id, Assignment.is_gold)
            .where(Assignment.user_id == user.id, Assignment.status.in_(("open", "done")))
            .order_by(Assignment.id)
            .with_for_update()
        ).all()
        voided = s.execute(
            sa.update(Vote)
            .where(Vote.user_id == user.id, Vote.counted())
            .values(voided_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        if rows:
            s.execute(
                sa.update(Assignment)
                .where(Assignment.id.in_([r.id for r in rows]))
                .values(status=REQUEUED, finished_at=now)
                .execution_options(synchronize_session=False)
            )
        freed = Counter(r.comparison_id for r in rows if not r.is_gold)
        for cid in sorted(freed):
            s.execute(
                sa.update(Comparison)
                .where(Comparison.id == cid)
                .values(n_active=sa.func.max(Comparison.n_active - freed[cid], 0) if store.is_sqlite
                        else sa.func.greatest(Comparison.n_active - freed[cid], 0))
                .execution_options(synchronize_session=False)
            )  # fmt: skip
    return {"sessions_ended": ended, "votes_voided": voided, "comparisons_requeued": len(freed)}
