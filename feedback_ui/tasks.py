"""What the app does for a logged-in user, independent of the UI: serve, vote, rank, skip, history.

Every function takes the :class:`Store` and the user's name from the request
session; nothing is kept between calls. A vote is committed in the same
transaction that picks the next task, before the caller sees the result.
"""

from __future__ import annotations

from typing import Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from feedback_ui.assign import next_task, progress, skip_task
from feedback_ui.store import Assignment, Comparison, Prompt, Response, Store, User, Vote, get_setting
from feedback_ui.voting import record_vote
from rlhf.errors import UserError

EMPTY_TASK = {"token": "", "kind": "", "prompt": "", "responses": []}


class NotAllowed(UserError):
    """Not logged in, or not allowed to see this."""


def _user(s, name: Optional[str], role: Optional[str] = None) -> User:
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


def gold_rate_of(store: Store) -> float:
    with store.read() as s:
        return float(get_setting(s, "gold_rate", 0.0))


def _view(s, a: Optional[Assignment], user_id: int) -> dict:
    done, total = progress(s, user_id)
    if a is None:
        return {**EMPTY_TASK, "done": done, "total": total}
    c = s.get(Comparison, a.comparison_id)
    texts = dict(s.execute(sa.select(Response.id, Response.text).where(Response.id.in_(a.order))).all())
    return {
        "token": a.token,
        "kind": c.kind,
        "prompt": s.get(Prompt, c.prompt_id).text,
        "responses": [texts[i] for i in a.order],
        "done": done,
        "total": total,
    }


def serve(store: Store, name: str, gold_rate: float, status: str = "") -> dict:
    """The user's current task (a new one is assigned if none is open) with progress."""
    with store.write() as s:
        user = _user(s, name)
        view = _view(s, next_task(s, user.id, gold_rate=gold_rate), user.id)
    return {**view, "status": status}


def answer(store: Store, name: str, token: str, gold_rate: float, **vote) -> dict:
    """Record a vote (``choice=`` or ``positions=``, strength, rationale, edit) and return the next task.

    A repeated submission of the same task is stored once and answered with
    the current task and status 'already recorded'.
    """
    try:
        with store.write() as s:
            user = _user(s, name)
            stored = record_vote(s, user.id, token, **vote)
            view = _view(s, next_task(s, user.id, gold_rate=gold_rate), user.id)
    except IntegrityError:  # a concurrent duplicate won the race (PostgreSQL)
        return serve(store, name, gold_rate, "already recorded")
    return {**view, "status": "saved" if stored is not None else "already recorded"}


def skip(store: Store, name: str, token: str, gold_rate: float) -> dict:
    with store.write() as s:
        user = _user(s, name)
        skipped = skip_task(s, user.id, token)
        view = _view(s, next_task(s, user.id, gold_rate=gold_rate), user.id)
    return {**view, "status": "skipped" if skipped else "nothing to skip"}


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

