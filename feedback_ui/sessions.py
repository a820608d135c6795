"""Login sessions kept in the database, so every app process sees them and admin commands can end them.

A session is a random token in an HttpOnly cookie; the database keeps only its sha256
(``login_sessions``), the user and two times. It ends when it has been idle longer than
``SessionPolicy.idle``, when it is older than ``SessionPolicy.lifetime``, at logout, and when
its account is disabled (``rlhf label user disable`` deletes the rows). Every function here
blocks on the database: the app calls them in worker threads.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import sqlalchemy as sa

from feedback_ui.store import LoginSession, Store, User, sha256_hex, utcnow
from rlhf.errors import UserError


@dataclass(frozen=True)
class SessionPolicy:
    """How long a login lasts."""

    idle: timedelta = timedelta(minutes=60)
    """A session unused this long ends (each request counts as use)."""
    lifetime: timedelta = timedelta(hours=12)
    """A session ends this long after login, used or not."""

    def __post_init__(self):
        if self.idle <= timedelta(0) or self.lifetime <= timedelta(0):
            raise UserError("session timeouts must be > 0")

    @property
    def touch_every(self) -> timedelta:
        """``last_seen`` is written at most this often (not on every request: writes queue behind votes)."""
        return min(timedelta(seconds=60), self.idle / 10)


def start_session(store: Store, user_id: int, policy: SessionPolicy) -> str:
    """A new session for ``user_id``; returns the token for the cookie (never stored as such).

    Sessions that have ended under ``policy`` are deleted on the way (rows nobody will present again).
    """
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with store.write() as s:
        s.execute(sa.delete(LoginSession).where(
            sa.or_(LoginSession.last_seen < now - policy.idle, LoginSession.created_at < now - policy.lifetime)
        ))  # fmt: skip
        s.add(LoginSession(token_hash=sha256_hex(token), user_id=user_id, created_at=now, last_seen=now))
    return token


def session_user(store: Store, token: Optional[str], policy: SessionPolicy, touch: bool = True) -> Optional[str]:
    """The name of the user whose live session ``token`` is, else None (an expired session is deleted).

    ``touch=False`` for requests a page makes on its own (heartbeats, event streams): they do not count as use.
    """
    if not token or len(token) > 128:
        return None
    key, now = sha256_hex(token), utcnow()
    with store.read() as s:
        row = s.execute(
            sa.select(LoginSession.created_at, LoginSession.last_seen, User.name, User.disabled_at)
            .join(User, User.id == LoginSession.user_id)
            .where(LoginSession.token_hash == key)
        ).first()  # fmt: skip
    if row is None:
        return None
    created, seen, name, disabled = row
    if disabled is not None or now - seen > policy.idle or now - created > policy.lifetime:
        end_session(store, token)
        return None
    if touch and now - seen > policy.touch_every:
        with store.write() as s:
            s.execute(sa.update(LoginSession).where(LoginSession.token_hash == key).values(last_seen=now))
    return name


def end_session(store: Store, token: Optional[str]) -> None:
    """Logout: the session is gone on the server, whatever the browser keeps."""
    if token:
        with store.write() as s:
            s.execute(sa.delete(LoginSession).where(LoginSession.token_hash == sha256_hex(token)))

