"""Login throttling per account and per client address, counted in the database (shared by app processes).

Each failed login counts against two keys, ``account:NAME`` (whether or not the account exists)
and ``address:IP``. ``ThrottlePolicy.max_failures`` failures of one key within ``window`` lock
that key for ``lock``: while it is locked every login with it is refused before the password is
checked, right or wrong. A successful login clears its account's count (not its address's).
Every function blocks on the database: the app calls them in worker threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from feedback_ui.store import LoginFailure, Store, utcnow


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int = 10
    """Failed logins of one account, or from one address, that lock it."""
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


def locked(store: Store, keys: list[str]) -> Optional[str]:
    """The message for the first locked key (see :func:`locked_message`), or None when none is locked."""
    now = utcnow()
    with store.read() as s:
        rows = s.execute(sa.select(LoginFailure.key, LoginFailure.locked_until).where(LoginFailure.key.in_(keys)))
        until = {key: at for key, at in rows if at is not None and at > now}
    for key in keys:
        if key in until:
            return locked_message(key, (until[key] - now).total_seconds())
    return None


def record_failure(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    """Count one failure against each key; returns the lock message when this failure locked one."""
    for attempt in range(3):  # PostgreSQL: a concurrent first failure of the same key inserts it first
        try:
            return _record_failure(store, keys, policy)
        except IntegrityError:
            if attempt == 2:
                raise
    return None


def _record_failure(store: Store, keys: list[str], policy: ThrottlePolicy) -> Optional[str]:
    now, message = utcnow(), None
    with store.write() as s:
        s.execute(sa.delete(LoginFailure).where(  # forgotten failures and ended locks
            LoginFailure.window_start < now - policy.window,
            sa.or_(LoginFailure.locked_until.is_(None), LoginFailure.locked_until < now),
        ))  # fmt: skip
        for key in keys:
            row = s.get(LoginFailure, key, with_for_update=not store.is_sqlite)
            if row is None:
                row = LoginFailure(key=key, failures=0, window_start=now)
                s.add(row)
            elif row.locked_until is not None and row.locked_until <= now:  # an ended lock starts afresh
                row.failures, row.window_start, row.locked_until = 0, now, None
            row.failures += 1
            if row.failures >= policy.max_failures and row.locked_until is None:
                row.locked_until = now + policy.lock
                message = message or locked_message(key, policy.lock.total_seconds())
            s.flush()
    return message


def record_success(store: Store, name: str) -> None:
    with store.write() as s:
        s.execute(sa.delete(LoginFailure).where(LoginFailure.key == throttle_keys(name, None)[0]))
