"""Each labeler's task queue: overlap, hidden gold items, no repeats.

A comparison wants ``overlap`` labelers. ``n_active`` counts its open and done
assignments and is raised with a conditional ``UPDATE ... WHERE n_active <
overlap`` so two labelers can never over-fill it, on SQLite or PostgreSQL. The
unique (comparison, user) constraint means nobody gets a comparison twice.
With probability ``gold_rate`` a task is a hidden gold item the labeler has not
seen (gold items have no overlap limit). A labeler holds at most one open
assignment, which is served again until it is voted on or skipped: every
transaction that changes a labeler's assignments first locks that labeler's
row (:func:`lock_labeler`), so two requests of one labeler (two browser tabs)
take turns on PostgreSQL too.

An open assignment not shown or voted on for ``assignment_ttl`` is abandoned:
:func:`expire_abandoned` marks it ``expired`` and gives its overlap slot back to
the pool, so another labeler can get the comparison. Locks on PostgreSQL: a
transaction takes its labeler's row, then that labeler's assignment rows, then
at most one comparison row, and waits only while holding nothing another
labeler waits for; the sweep never waits at all (``FOR NO KEY UPDATE SKIP
LOCKED`` over the labeler, assignment and comparison rows it changes; what it
skips, a later sweep expires). So no two transactions wait on each other in a cycle.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from datetime import datetime, timedelta
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_ui.store import Assignment, Comparison, User, transaction_memo, utcnow

CANDIDATE_WINDOW = 16  # comparison ids fetched per attempt; the conditional UPDATE settles races
DEFAULT_ASSIGNMENT_TTL = timedelta(minutes=30)  # an open assignment untouched this long is abandoned


def lock_labeler(session: Session, user_id: int) -> bool:
    """Hold the labeler's row until the transaction ends (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL;
    on SQLite the store's write lock already serialises writers). Taken first, before any assignment row.

    Returns whether the account is disabled, read under the lock: a request that checked the account
    before an admin disabled it (and re-queued its work) sees it here. A second call in the same transaction
    (a vote, then the next task) answers from a memo without another statement."""
    held = transaction_memo(session).setdefault("labeler_locks", {})  # {user id: disabled}
    if user_id not in held:  # the row stays locked until the transaction ends: what was read under it holds
        held[user_id] = session.scalar(
            sa.select(User.disabled_at).where(User.id == user_id).with_for_update(key_share=True)
        ) is not None
    return held[user_id]


def locked_user(session: Session, name: str) -> Optional[User]:
    """The user named ``name``, its row locked as :func:`lock_labeler` locks it (one statement for both:
    a later :func:`lock_labeler` in the transaction answers from the memo). Taken first, before any assignment row."""
    user = session.scalar(sa.select(User).where(User.name == name).with_for_update(key_share=True))
    if user is not None:
        transaction_memo(session).setdefault("labeler_locks", {})[user.id] = user.disabled_at is not None
    return user


def _seen_by(user_id: int):
    return sa.select(Assignment.comparison_id).where(Assignment.user_id == user_id)


def _available(user_id: int, *columns):
    """SELECT ``columns`` over regular comparisons that still want labelers and are new to this user."""
    return (
        sa.select(*columns)
        .select_from(Comparison)
        .where(~Comparison.is_gold, Comparison.n_active < Comparison.overlap, Comparison.id.not_in(_seen_by(user_id)))
    )


def _new_assignment(session: Session, user_id: int, comparison: Comparison, rng: random.Random) -> Assignment:
    order = list(comparison.response_ids)
    rng.shuffle(order)  # randomised sides, recorded
    a = Assignment(
        comparison_id=comparison.id,
        user_id=user_id,
        token=secrets.token_hex(16),
        order=order,
        status="open",
        is_gold=comparison.is_gold,
    )
    session.add(a)
    session.flush()
    return a


def take_slot(session: Session, comparison_id: int) -> bool:
    """Take one of the comparison's overlap slots; False when all are taken (a conditional UPDATE: no over-fill).

    The transaction may hold the comparison's row from here on: :func:`holds_comparison` says so."""
    _hold_comparison(session)
    return session.execute(
        sa.update(Comparison)
        .where(Comparison.id == comparison_id, Comparison.n_active < Comparison.overlap)
        .values(n_active=Comparison.n_active + 1)
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def _assign_regular(session: Session, user_id: int, rng: random.Random) -> Optional[Assignment]:
    """Fill comparisons that already have labelers first, so overlap sets complete early."""
    ids = session.scalars(
        _available(user_id, Comparison.id)
        .order_by(Comparison.n_active.desc(), Comparison.id)
        .limit(CANDIDATE_WINDOW)
    ).all()
    for cid in ids:
        if take_slot(session, cid):
            return _new_assignment(session, user_id, session.get(Comparison, cid), rng)
    return None


def _assign_gold(session: Session, user_id: int, rng: random.Random) -> Optional[Assignment]:
    ids = session.scalars(
        sa.select(Comparison.id).where(Comparison.is_gold, Comparison.id.not_in(_seen_by(user_id)))
    ).all()
    if not ids:
        return None
    return _new_assignment(session, user_id, session.get(Comparison, rng.choice(ids)), rng)


def open_assignment(session: Session, user_id: int) -> Optional[Assignment]:
    return session.scalar(
        sa.select(Assignment).where(Assignment.user_id == user_id, Assignment.status == "open").order_by(Assignment.id)
    )


def next_task(
    session: Session, user_id: int, *, gold_rate: float = 0.0, rng: Optional[random.Random] = None
) -> Optional[Assignment]:
    """The labeler's open assignment, else a new one (gold with probability ``gold_rate``); None when done
    (or when the account is disabled).

    Gold items are only mixed in while regular work remains, so a queue never
    ends in a run of gold items. Call inside ``Store.write()``.
    """
    rng = rng or random.SystemRandom()
    if lock_labeler(session, user_id):  # disabled while this request waited: nothing new for them
        return None
    current = open_assignment(session, user_id)
    if current is not None:
        current.shown_at = utcnow()
        return current
    if gold_rate > 0 and rng.random() < gold_rate and session.scalar(_available(user_id, sa.func.count())):
        gold = _assign_gold(session, user_id, rng)
        if gold is not None:
            return gold
    return _assign_regular(session, user_id, rng)


def skip_task(session: Session, user_id: int, token: str) -> bool:
    """Close the labeler's open assignment without a vote; its overlap slot goes back to the pool."""
    if "\x00" in token:  # no task has such a token (and PostgreSQL cannot compare it)
        return False
    lock_labeler(session, user_id)
    a = session.scalar(
        sa.select(Assignment).where(
            Assignment.token == token, Assignment.user_id == user_id, Assignment.status == "open"
        )
    )
    if a is None:
        return False
    a.status, a.finished_at = "skipped", utcnow()
    if not a.is_gold:
        _hold_comparison(session)  # the slot's row is locked until the transaction ends
        session.execute(
            sa.update(Comparison)
            .where(Comparison.id == a.comparison_id, Comparison.n_active > 0)
            .values(n_active=Comparison.n_active - 1)
            .execution_options(synchronize_session=False)
        )
    return True


def _abandoned(cutoff: datetime):
    """Open assignments last shown before ``cutoff``, reached per labeler through (user_id, status)."""
    return (
        sa.select(Assignment.id, Assignment.comparison_id, Assignment.is_gold)
        .select_from(User)
        .join(Assignment, sa.and_(Assignment.user_id == User.id, Assignment.status == "open"))
        .join(Comparison, Comparison.id == Assignment.comparison_id)
        .where(Assignment.shown_at < cutoff)
    )


def _hold_comparison(session: Session) -> None:
    transaction_memo(session)["comparison_held"] = True


def holds_comparison(session: Session) -> bool:
    """Whether the transaction took a comparison row (:func:`take_slot`, :func:`skip_task`): it may take no
    second one, so the next task comes in a transaction of its own."""
    return bool(transaction_memo(session).get("comparison_held"))


def oldest_open_shown(session: Session) -> Optional[datetime]:
    """When the longest-waiting open assignment was last shown (None: no open assignment); a cheap read before
    :func:`expire_abandoned` (one index lookup per labeler on (user_id, status), never a scan of all assignments).

    ``shown_at`` is only ever set to the time of writing, so until this time plus the TTL no assignment can become
    abandoned: the caller need not look again before then."""
    per_labeler = (
        sa.select(sa.func.min(Assignment.shown_at))
        .where(Assignment.user_id == User.id, Assignment.status == "open")
        .scalar_subquery()
    )
    return session.scalar(sa.select(sa.func.min(per_labeler)).select_from(User))


def expire_abandoned(session: Session, cutoff: datetime) -> int:
    """Expire the open assignments last shown before ``cutoff``; their overlap slots go back to the pool.

    Rows another transaction holds (a labeler voting, a comparison being assigned) are skipped, never waited
    for; a later sweep expires them. Call inside ``Store.write()``, in a transaction of its own. Returns how many
    expired.
    """
    rows = session.execute(
        _abandoned(cutoff).order_by(Assignment.id).with_for_update(skip_locked=True, key_share=True)
    ).all()
    if not rows:
        return 0
    session.execute(
        sa.update(Assignment)
        .where(Assignment.id.in_([r.id for r in rows]), Assignment.status == "open")
        .values(status="expired", finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    freed = Counter(r.comparison_id for r in rows if not r.is_gold)
    for cid in sorted(freed):  # rows locked above: no waiting here
        session.execute(
            sa.update(Comparison)
            .where(Comparison.id == cid)
            .values(n_active=Comparison.n_active - freed[cid])
            .execution_options(synchronize_session=False)
        )
    return len(rows)


def progress(session: Session, user_id: int) -> tuple[int, int]:
    """(done, total) for the labeler, regular comparisons only: total = done + open + still available to them.

    Gold items count in neither (they are hidden): serving one leaves the total as it was, as a regular task does.
    """
    def mine(status: str):
        return (sa.select(sa.func.count()).select_from(Assignment)
                .where(Assignment.user_id == user_id, Assignment.status == status, ~Assignment.is_gold)
                .scalar_subquery())  # fmt: skip

    done, open_, available = session.execute(
        sa.select(mine("done"), mine("open"), _available(user_id, sa.func.count()).scalar_subquery())
    ).one()  # one statement
    return done, done + open_ + available
