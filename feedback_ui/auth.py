"""Passwords (scrypt, salted, constant-time compare) and user accounts.

Stored form: ``scrypt$N$r$p$<salt hex>$<hash hex>``. scrypt (RFC 7914) with
N=2**14, r=8, p=1 costs about 16 MiB and tens of milliseconds per check, which
is paid once per login (the session cookie carries the user afterwards).
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

from feedback_ui.store import Store, User
from rlhf.errors import UserError

ROLES = ("labeler", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES = 2**14, 8, 1, 32
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh 16-byte random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Recompute scrypt with the stored salt and parameters; compare in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(digest)
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


# a well-formed hash of a random password: unknown users cost the same time as known ones
@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_hex(16))  # made on first use: admin commands need no scrypt run to start


def check_login(store: Store, name: str, password: str) -> bool:
    """True when ``name`` exists and ``password`` matches (same cost either way)."""
    dummy = _dummy_hash()  # before the lookup: the first login pays for it whoever logs in
    with store.read() as s:
        stored = s.scalar(sa.select(User.password_hash).where(User.name == name))
    ok = verify_password(password, stored or dummy)
    return ok and stored is not None


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


def list_users(store: Store) -> list[User]:
    with store.read() as s:
        return list(s.scalars(sa.select(User).order_by(User.id)))
