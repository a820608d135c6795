"""Passwords (scrypt, salted, constant-time compare) and user accounts.

Stored form: ``scrypt$N$r$p$<salt hex>$<hash hex>``. scrypt (RFC 7914) with
N=2**17, r=8, p=1 (OWASP's recommendation) costs 128 MiB and a few hundred
milliseconds per check, paid once per login (the session cookie carries the user
afterwards); the app runs it in a worker thread, at most two at a time. Hashes
made with other parameters (N=2**14 before) still verify and are replaced by one
with the current parameters at the account's next successful login.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from feedback_ui.store import LoginSession, Store, User, utcnow
from rlhf.errors import UserError

ROLES = ("labeler", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES = 2**17, 8, 1, 32
MAX_N, MAX_R, MAX_P = 2**20, 32, 16  # a stored hash asking for more than this is refused, not computed


def _maxmem(n: int, r: int, p: int) -> int:
    """Bytes scrypt needs (128*r*(n+2) for V plus 128*r*p for B) and 1 MiB of slack; OpenSSL refuses less."""
    return 128 * r * (n + 2 + p) + (1 << 20)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_maxmem(n, r, p))
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh 16-byte random salt."""
    salt = os.urandom(16)
    digest = _scrypt(password, salt, n, r, p, KEY_BYTES)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Recompute scrypt with the stored salt and parameters; compare in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        n, r, p = int(n), int(r), int(p)
        if scheme != "scrypt" or not (n <= MAX_N and r <= MAX_R and p <= MAX_P):
            return False
        expected = bytes.fromhex(digest)
        got = _scrypt(password, bytes.fromhex(salt), n, r, p, len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with other scrypt parameters than the current ones."""
    return stored.split("$")[1:4] != [str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P)]


# a well-formed hash of a random password: unknown users cost the same time as known ones
@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_hex(16))  # made on first use: admin commands need no scrypt run to start


def check_login(store: Store, name: str, password: str) -> Optional[User]:
    """The account when ``name`` exists and ``password`` matches (same cost either way), else None.

    Blocking (one scrypt run): the app calls it in a worker thread. A hash with old parameters is
    replaced by one with the current parameters. The caller decides what a disabled account may do.
    """
    dummy = _dummy_hash()  # before the lookup: the first login pays for it whoever logs in
    with store.read() as s:
        user = s.scalar(sa.select(User).where(User.name == name))
    if not verify_password(password, user.password_hash if user else dummy) or user is None:
        return None
    if needs_rehash(user.password_hash):
        fresh = hash_password(password)
        with store.write() as s:  # only if nobody changed it meanwhile
            s.execute(sa.update(User).where(User.id == user.id, User.password_hash == user.password_hash)
                      .values(password_hash=fresh))  # fmt: skip
    return user


def check_user_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")


def add_user(store: Store, name: str, password: str, role: str = "labeler") -> User:
    check_user_name(name)
    if role not in ROLES:
        raise UserError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise UserError("password must have at least 8 characters")
    try:
        with store.write() as s:
            user = User(name=name, role=role, password_hash=hash_password(password))
            s.add(user)
    except IntegrityError:
        raise UserError(f"user {name!r} already exists") from None
    return user


def get_user(store: Store, name: Optional[str]) -> Optional[User]:
    if not name:
        return None
    with store.read() as s:
        return s.scalar(sa.select(User).where(User.name == name))


def disable_in(session: Session, name: str, disabled: bool = True) -> tuple[User, int]:
    """Disable (or enable again) the account ``name`` inside the caller's transaction; disabling deletes its
    sessions. Returns the user and the number of sessions ended."""
    user = session.scalar(sa.select(User).where(User.name == name))
    if user is None:
        raise UserError(f"no user named {name!r}")
    user.disabled_at = (user.disabled_at or utcnow()) if disabled else None
    if not disabled:
        return user, 0
    return user, session.execute(sa.delete(LoginSession).where(LoginSession.user_id == user.id)).rowcount


def set_disabled(store: Store, name: str, disabled: bool = True) -> int:
    """Disable (or enable again) an account; disabling ends its sessions at once. Returns sessions ended."""
    with store.write() as s:
        return disable_in(s, name, disabled)[1]


def list_users(store: Store) -> list[User]:
    with store.read() as s:
        return list(s.scalars(sa.select(User).order_by(User.id)))
