"""What a database failure means, in one line for the user, and which constraint an integrity error broke."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import sqlalchemy as sa

from feedback_ui.db_url import shown_url
from rlhf.errors import UserError


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


@contextlib.contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a database failure (unreachable server, refused login, broken file) into one UserError line."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise UserError(f"database {shown_url(url)}: {_first_line(exc)}") from None


@dataclasses.dataclass(frozen=True)
class Violation:
    """What an ``IntegrityError`` broke: ``kind`` (unique | foreign_key | not_null | check | other), the table
    and, where the database says, the column(s) or constraint."""

    kind: str
    table: Optional[str] = None
    detail: Optional[str] = None

    def describe(self) -> str:
        what = {"unique": "a row that already exists", "foreign_key": "a foreign-key violation (a row it refers "
                "to does not exist)", "not_null": "a required value missing", "check": "a check-constraint "
                "violation"}.get(self.kind, "an integrity error")  # fmt: skip
        where = ".".join(x for x in (self.table, self.detail) if x)
        return f"{what}{f' ({where})' if where else ''}"


_PG_STATES = {"23505": "unique", "23503": "foreign_key", "23502": "not_null", "23514": "check"}
_SQLITE_NAMES = {"UNIQUE": "unique", "PRIMARYKEY": "unique", "FOREIGNKEY": "foreign_key", "NOTNULL": "not_null",
                 "CHECK": "check"}  # fmt: skip


def integrity_violation(exc: BaseException) -> Violation:
    """Tell integrity errors apart on PostgreSQL (SQLSTATE + diagnostics) and SQLite (extended error code)."""
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state:
        diag = getattr(orig, "diag", None)
        table = getattr(diag, "table_name", None)
        detail = getattr(diag, "column_name", None) or getattr(diag, "constraint_name", None)
        return Violation(_PG_STATES.get(state, "other"), table, detail)
    name = getattr(orig, "sqlite_errorname", "") or ""  # e.g. SQLITE_CONSTRAINT_UNIQUE
    kind = _SQLITE_NAMES.get(name.removeprefix("SQLITE_CONSTRAINT_"), "other")
    text = str(orig)
    if kind == "other":  # an older sqlite3 module without error names: its message says it
        kind = next((k for word, k in (("UNIQUE", "unique"), ("FOREIGN KEY", "foreign_key"),
                                       ("NOT NULL", "not_null"), ("CHECK", "check")) if word in text), "other")  # fmt: skip
    named = [c.partition(".") for c in text.partition("constraint failed: ")[2].strip().split(", ") if "." in c]
    if not named:  # SQLite names no table for a foreign key
        return Violation(kind)
    return Violation(kind, named[0][0], ", ".join(column for _, _, column in named))
