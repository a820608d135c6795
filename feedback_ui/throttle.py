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
from sqlalchemy.exc import IntegrityError, OperationalError

from feedback_ui.store import LoginFailure, Store, utcnow

DEADLOCK = "40P01"  # PostgreSQL's SQLSTATE for a transaction ended to break a deadlock


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
    """``write(*args)``, again when PostgreSQL refused it because a concurrent first attempt inserted a key first,
    or ended it as a deadlock's victim (the functions here lock their rows in key order, so that should not
    happen; a retry is what PostgreSQL's documentation asks for if it does)."""
    for attempt in range(3):
        try:
            return write(*args)
        except (IntegrityError, OperationalError) as exc:
            code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)  # psycopg 3, psycopg2
            again = isinstance(exc, IntegrityError) or code == DEADLOCK
            if not again or attempt == 2:
                raise
    return None


def _lock_rows(s, store: Store, where) -> list[str]:
    """Lock the rows ``where`` selects in key order (PostgreSQL; SQLite's write transaction holds the whole
    database), so that two transactions never wait for each other's rows; returns their keys."""
    query = sa.select(LoginFailure.key).where(where).order_by(LoginFailure.key)
    return list(s.scalars(query if store.is_sqlite else query.with_for_update()))


def begin_attempt(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    """Count a login attempt against each key before its password is checked; returns the refusal message
    instead (nothing counted) when a key is locked or already has ``max_failures`` attempts counted."""
    return _retried(_begin_attempt, store, keys, policy)


def _forgotten(policy: ThrottlePolicy, now: datetime):
    """Rows of failures older than the window and not locked now (forgotten failures, ended locks)."""
    return sa.and_(LoginFailure.window_start < now - policy.window,
                   sa.or_(LoginFailure.locked_until.is_(None), LoginFailure.locked_until < now))  # fmt: skip


def _sweep(store: Store, policy: ThrottlePolicy, now: datetime) -> None:
    """Delete forgotten failures and ended locks, in a transaction of its own (its row locks are released before
    an attempt locks its keys); rows another login holds are left for a later sweep (no waiting on them)."""
    with store.write() as s:
        stale = sa.select(LoginFailure.key).where(_forgotten(policy, now)).order_by(LoginFailure.key)
        forgotten = list(s.scalars(stale if store.is_sqlite else stale.with_for_update(skip_locked=True)))
        if forgotten:
            s.execute(sa.delete(LoginFailure).where(LoginFailure.key.in_(forgotten)))


def _begin_attempt(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    now = utcnow()
    _sweep(store, policy, now)
    with store.write() as s:
        rows = {key: _row(s, store, key, now, policy) for key in sorted(set(keys))}  # locked in key order
        for key in keys:
            row = rows[key]
            if _is_locked(row, now):
                return locked_message(row.key, (row.locked_until - now).total_seconds())
            if row.failures >= policy.max_failures:  # not locked: the last attempts are still being checked
                return busy_message(row.key)
        for row in rows.values():
            row.failures += 1
        s.flush()
    return None


def _row(s, store: Store, key: str, now: datetime, policy: ThrottlePolicy) -> LoginFailure:
    """The key's row, locked for this transaction (PostgreSQL), new, or started afresh after an ended lock or
    when its failures are forgotten."""
    row = s.get(LoginFailure, key, with_for_update=not store.is_sqlite, populate_existing=True)
    if row is None:
        row = LoginFailure(key=key, failures=0, window_start=now)
        s.add(row)
    elif (row.locked_until is not None and row.locked_until <= now) or (
            row.locked_until is None and row.window_start < now - policy.window):
        row.failures, row.window_start, row.locked_until = 0, now, None
    return row


def record_failure(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    """A begun attempt (:func:`begin_attempt`) failed: it stays counted, and a key with ``max_failures``
    counted is locked. Returns the lock message when this failure locked one."""
    return _retried(_record_failure, store, keys, policy)


def _record_failure(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    now, locks = utcnow(), []
    with store.write() as s:
        for key in sorted(set(keys)):  # locked in key order
            row = s.get(LoginFailure, key, with_for_update=not store.is_sqlite, populate_existing=True)
            if row is not None and row.failures >= policy.max_failures and not _is_locked(row, now):
                row.locked_until = now + policy.lock
                locks.append(key)
    first = next((key for key in keys if key in locks), None)
    return locked_message(first, policy.lock.total_seconds()) if first else None


def record_success(store: Store, keys: list[str]) -> None:
    """Take back a begun attempt (a right password, or one refused before its check): one count per key, and
    never a lock."""
    _retried(_record_success, store, keys)


def _record_success(store: Store, keys: list[str]) -> None:
    with store.write() as s:
        held = _lock_rows(s, store, LoginFailure.key.in_(keys) & (LoginFailure.failures > 0))
        if held:
            s.execute(sa.update(LoginFailure).where(LoginFailure.key.in_(held))
                      .values(failures=LoginFailure.failures - 1))  # fmt: skip
