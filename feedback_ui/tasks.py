"""What the app does for a logged-in user, independent of the UI: serve, vote, rank, skip, history.

Every function takes the :class:`Store` and the user's name from the request
session; nothing is kept between calls. A vote is committed in the same
transaction that picks the next task, before the caller sees the result.
With ``assignment_ttl`` set, each call first expires abandoned assignments
(a cheap read, at most once per TTL while nothing can have become abandoned; a
short transaction of its own only when there are some).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from feedback_ui.assign import (
    expire_abandoned, holds_comparison, locked_user, next_task, oldest_open_shown, progress, skip_task,
)
from feedback_ui.db_errors import integrity_violation
from feedback_ui.store import Assignment, Comparison, Prompt, Response, Store, User, Vote, get_setting, utcnow
from feedback_ui.voting import TaskClosed, record_vote
from rlhf.errors import UserError

log = logging.getLogger("feedback_ui")

EMPTY_TASK = {"token": "", "kind": "", "prompt": "", "responses": []}


class NotAllowed(UserError):
    """Not logged in, or not allowed to see this."""


class Refused(UserError):
    """The database refused a write for a reason other than a repeated vote (e.g. a row it refers to is gone)."""


def expire(store: Store, assignment_ttl: Optional[timedelta]) -> int:
    """Expire assignments left open longer than ``assignment_ttl`` (None: never); returns how many."""
    if assignment_ttl is None:
        return 0
    now, due = utcnow(), store.memo.get(("expiry_due", assignment_ttl))
    if due is not None and now < due:  # nothing open can have waited a whole TTL yet
        return 0
    cutoff = now - assignment_ttl
    with store.read() as s:
        oldest = oldest_open_shown(s)
    if oldest is None or oldest >= cutoff:  # what opens later is shown later: look again when the oldest is due
        store.memo[("expiry_due", assignment_ttl)] = min(oldest or now, now) + assignment_ttl
        return 0
    store.memo.pop(("expiry_due", assignment_ttl), None)
    with store.write() as s:
        n = expire_abandoned(s, cutoff)
    if n:
        log.info("%d abandoned assignment%s expired (open > %s)", n, "s" * (n != 1), assignment_ttl)
    return n


def _user(s, name: Optional[str], role: Optional[str] = None, *, lock: bool = False) -> User:
    """The logged-in user; ``lock``: in a write, its row locked as the labeler's (:func:`locked_user`)."""
    if lock and name:
        user = locked_user(s, name)
    else:
        user = s.scalar(sa.select(User).where(User.name == name)) if name else None
    if user is None:
        raise NotAllowed("not logged in")
    if user.disabled_at is not None:
        raise NotAllowed("this account is disabled")
    if role and user.role != role:
        raise NotAllowed(f"this view is for {role}s only")
    return user


def current_user(store: Store, name: Optional[str], role: Optional[str] = None) -> User:
    with store.read() as s:
        return _user(s, name, role)


def _next_task(s, user_id: int, gold_rate: Optional[float]) -> Optional[Assignment]:
    """:func:`next_task` with ``gold_rate``, or (None) the rate stored by ``rlhf label candidates``, read now: an
    app that runs while a new round's gold items and rate are stored serves them without a restart, and app
    processes started at different times agree."""
    rate = float(get_setting(s, "gold_rate", 0.0)) if gold_rate is None else gold_rate
    return next_task(s, user_id, gold_rate=rate)


def _view(s, a: Optional[Assignment], user_id: int) -> dict:
    done, total = progress(s, user_id)
    if a is None:
        return {**EMPTY_TASK, "done": done, "total": total}
    kind, prompt = s.execute(
        sa.select(Comparison.kind, Prompt.text).join(Prompt, Prompt.id == Comparison.prompt_id)
        .where(Comparison.id == a.comparison_id)
    ).one()  # fmt: skip
    texts = dict(s.execute(sa.select(Response.id, Response.text).where(Response.id.in_(a.order))).all())
    return {
        "token": a.token,
        "kind": kind,
        "prompt": prompt,
        "responses": [texts[i] for i in a.order],
        "done": done,
        "total": total,
    }


def serve(store: Store, name: str, gold_rate: Optional[float], status: str = "", *,
          assignment_ttl: Optional[timedelta] = None) -> dict:  # fmt: skip
    """The user's current task (a new one is assigned if none is open) with progress."""
    expire(store, assignment_ttl)
    with store.write() as s:
        user = _user(s, name, lock=True)
        view = _view(s, _next_task(s, user.id, gold_rate), user.id)
    return {**view, "status": status}


def answer(store: Store, name: str, token: str, gold_rate: Optional[float], *, assignment_ttl: Optional[timedelta] = None,
           **vote) -> dict:  # fmt: skip
    """Record a vote (``choice=`` or ``positions=``, strength, rationale, edit) and return the next task.

    A repeated submission of the same task is stored once and answered with
    the current task and status 'already recorded'. A late vote on an expired
    task whose comparison went to others, or on a task skipped or re-queued
    since it was shown, is answered with the next task and a status saying it
    was not saved and why. Any other integrity error raises
    :class:`Refused` naming what the database refused.
    """
    again = {"assignment_ttl": assignment_ttl}
    expire(store, assignment_ttl)
    try:
        with store.write() as s:
            user = _user(s, name, lock=True)
            stored = record_vote(s, user.id, token, **vote)
            # a late vote took a comparison row's lock: the next task comes in a transaction of its own
            view = None if holds_comparison(s) else _view(s, _next_task(s, user.id, gold_rate), user.id)
        if view is None:
            return serve(store, name, gold_rate, "saved", **again)
    except TaskClosed as exc:  # expired, skipped or re-queued: not saved, and the next task
        return serve(store, name, gold_rate, str(exc), **again)
    except IntegrityError as exc:
        violation = integrity_violation(exc)
        if violation.kind == "unique" and violation.table == Vote.__tablename__:
            return serve(store, name, gold_rate, "already recorded", **again)  # a concurrent duplicate won
        log.warning("vote of %s refused by the database: %s", name, str(getattr(exc, "orig", exc)).strip())
        raise Refused(f"not saved: the database refused this vote: {violation.describe()}") from None
    return {**view, "status": "saved" if stored is not None else "already recorded"}


def skip(store: Store, name: str, token: str, gold_rate: Optional[float], *,
         assignment_ttl: Optional[timedelta] = None) -> dict:  # fmt: skip
    expire(store, assignment_ttl)
    with store.write() as s:
        user = _user(s, name, lock=True)
        skipped = skip_task(s, user.id, token)
        # a skip gave its comparison's slot back under that row's lock: the next task comes in a transaction of its own
        view = None if holds_comparison(s) else _view(s, _next_task(s, user.id, gold_rate), user.id)
    status = "skipped" if skipped else "nothing to skip"
    if view is None:
        return serve(store, name, gold_rate, status, assignment_ttl=assignment_ttl)
    return {**view, "status": status}


def history(store: Store, name: str, limit: int = 50) -> list[list]:
    """The user's own latest votes: [time, prompt, answer, seconds]."""
    with store.read() as s:
        user = _user(s, name)
        rows = s.execute(
            sa.select(Vote.created_at, Prompt.text, Vote.outcome, Vote.picked_position, Comparison.kind, Vote.seconds)
            .join(Comparison, Comparison.id == Vote.comparison_id)
            .join(Prompt, Prompt.id == Comparison.prompt_id)
            .where(Vote.user_id == user.id)
            .order_by(Vote.id.desc())
            .limit(limit)
        ).all()
    out = []
    for created, prompt, outcome, picked, kind, seconds in rows:
        if outcome != "ranked":
            said = outcome.replace("_", " ")
        else:
            said = f"{'AB'[picked]} is better" if kind == "pair" else f"ranked, #{picked + 1} first"
        out.append([created.strftime("%Y-%m-%d %H:%M:%S"), prompt[:120], said, round(seconds, 1)])
    return out

