"""Login throttling per account and per client address, counted in the database (shared by app processes).

Every login attempt counts against two keys, ``account:NAME`` (whether or not the account exists) and
``address:IP``, *before* its password is checked (:func:`begin_attempt`): attempts sent in parallel are
counted as they arrive, so no more than ``ThrottlePolicy.max_failures`` of them per key are ever checked
within ``window``. A wrong password keeps its count (:func:`record_failure`) and, once a key has
``max_failures``, locks it for ``lock``; while a key is locked every login with it is refused before the
password is checked, right or wrong. A right password takes back its own count (:func:`record_success`),
never anyone else's, and never ends a lock. Every function blocks on the database: the app calls them in
worker threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from feedback_ui.store import LoginFailure, Store, utcnow


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int = 10
    """Failed logins of one account, or from one address, that lock it (attempts still being checked count)."""
    window: timedelta = timedelta(minutes=15)
    """Failures older than this are forgotten."""
    lock: timedelta = timedelta(minutes=15)
    """How long a lock lasts."""


def throttle_keys(name: str, address: Optional[str]) -> list[str]:
    keys = [f"account:{name[:100]}"]
    return keys + [f"address:{address[:100]}"] if address else keys


def locked_message(key: str, seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    who = "this account" if key.startswith("account:") else "your address"
    return f"Too many failed logins for {who}: login is locked, try again in {minutes} minute{'s' * (minutes > 1)}."


def busy_message(key: str) -> str:
    who = "this account" if key.startswith("account:") else "your address"
    return f"Too many logins for {who} are being checked right now: try again in a minute."


def _is_locked(row: Optional[LoginFailure], now: datetime) -> bool:
    return row is not None and row.locked_until is not None and row.locked_until > now


def locked(store: Store, keys: list[str]) -> Optional[str]:
    """The message for the first locked key (see :func:`locked_message`), or None when none is locked."""
    now = utcnow()
    with store.read() as s:
        rows = {row.key: row for row in s.scalars(sa.select(LoginFailure).where(LoginFailure.key.in_(keys)))}
    for key in keys:
        if _is_locked(rows.get(key), now):
            return locked_message(key, (rows[key].locked_until - now).total_seconds())
    return None


def _retried(write, *args):
    """``write(*args)``, again when PostgreSQL refused it because a concurrent first attempt inserted a key first."""
    for attempt in range(3):
        try:
            return write(*args)
        except IntegrityError:
            if attempt == 2:
                raise
    return None


def begin_attempt(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    """Count a login attempt against each key before its password is checked; returns the refusal message
    instead (nothing counted) when a key is locked or already has ``max_failures`` attempts counted."""
    return _retried(_begin_attempt, store, keys, policy)


def _begin_attempt(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    now = utcnow()
    with store.write() as s:
        s.execute(sa.delete(LoginFailure).where(  # forgotten failures and ended locks
            LoginFailure.window_start < now - policy.window,
            sa.or_(LoginFailure.locked_until.is_(None), LoginFailure.locked_until < now),
        ))  # fmt: skip
        rows = [_row(s, store, key, now) for key in keys]
        for row in rows:
            if _is_locked(row, now):
                return locked_message(row.key, (row.locked_until - now).total_seconds())
            if row.failures >= policy.max_failures:  # not locked: the last attempts are still being checked
                return busy_message(row.key)
        for row in rows:
            row.failures += 1
        s.flush()
    return None


def _row(s, store: Store, key: str, now: datetime) -> LoginFailure:
    """The key's row, locked for this transaction (PostgreSQL), new or started afresh after an ended lock."""
    row = s.get(LoginFailure, key, with_for_update=not store.is_sqlite)
    if row is None:
        row = LoginFailure(key=key, failures=0, window_start=now)
        s.add(row)
    elif row.locked_until is not None and row.locked_until <= now:  # an ended lock starts afresh
        row.failures, row.window_start, row.locked_until = 0, now, None
    return row


def record_failure(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    """A begun attempt (:func:`begin_attempt`) failed: it stays counted, and a key with ``max_failures``
    counted is locked. Returns the lock message when this failure locked one."""
    now, message = utcnow(), None
    with store.write() as s:
        for key in keys:
            row = s.get(LoginFailure, key, with_for_update=not store.is_sqlite)
            if row is not None and row.failures >= policy.max_failures and not _is_locked(row, now):
                row.locked_until = now + policy.lock
                message = message or locked_message(key, policy.lock.total_seconds())
    return message


def record_success(store: Store, keys: list[str]) -> None:
    """Take back a begun attempt (a right password, or one refused before its check): one count per key, and
    never a lock."""
    with store.write() as s:
        s.execute(sa.update(LoginFailure).where(LoginFailure.key.in_(keys), LoginFailure.failures > 0)
                  .values(failures=LoginFailure.failures - 1))  # fmt: skip
