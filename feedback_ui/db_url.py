"""Where the labeling database is: file paths and URLs, and the checks made before a SQLite file is opened."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import sqlalchemy as sa

from rlhf.errors import UserError

MARKER_TABLE = "schema_version"  # a labeling database has this table (feedback_ui.store.SchemaVersion)
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _postgres_driver() -> str:
    """``postgresql+psycopg`` when only psycopg 3 is installed (SQLAlchemy's bare ``postgresql`` means psycopg2)."""
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg"
    return "postgresql"


def normalize_url(db: str) -> str:
    """A file path or database URL -> a SQLAlchemy URL (file paths become absolute ``sqlite:///``)."""
    if not db or not db.strip():
        raise UserError("no database given (set --db to a file path or a database URL)")
    if "://" in db:
        scheme, _, rest = db.partition("://")
        if scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+"):
            url = f"{_postgres_driver()}://{rest}" if "+" not in scheme else db
            user, colon, after = rest.partition(":")
            if colon and "/" not in user and "@" in after and "@" in after.split("@", 1)[1]:
                # a password ends at its first '@': the rest of it would be taken for the host, the database
                # or the query (an '@' in the user name, as in user@server, is fine)
                raise UserError(f"invalid {scheme} URL: an '@' in the password must be written as %40")
            try:
                sa.engine.make_url(url).port  # noqa: B018 - parses host and port
            except (sa.exc.ArgumentError, ValueError):  # the message could quote a password
                raise UserError(f"invalid {scheme} URL: cannot parse user, host, port and database from it") from None
            return url
        if scheme != "sqlite":  # the URL itself is not shown: it may hold a password
            raise UserError(f"unsupported database URL scheme '{scheme}://': use a file path, sqlite:///FILE or "
                            "postgresql://...")
        if not rest.startswith("/") or rest == "/":
            raise UserError(f"a SQLite URL names a file: sqlite:///FILE (got '{db}')")
        db = rest[1:]  # sqlite:///relative or sqlite:////absolute
    path = Path(db).expanduser().resolve()
    if not path.parent.is_dir():
        raise UserError(f"folder of database file {path} does not exist")
    return f"sqlite:///{path}"


def shown_url(url: str) -> str:
    """``url`` with any password masked, for messages."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def shown_db(db: str) -> str:
    """A ``--db`` value for messages: a file path as given, a URL with its password masked."""
    if "://" not in db:
        return db
    try:
        return shown_url(db)
    except (sa.exc.ArgumentError, ValueError):
        return "the database URL"


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URL (None for other databases)."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def foreign_database(path_or_url, tables, sqlite: bool = True) -> UserError:
    shown = ", ".join(sorted(tables)[:5])
    if sqlite:
        return UserError(f"{path_or_url} is a SQLite database of something else (tables: {shown}); left untouched")
    return UserError(f"database {path_or_url} holds tables of something else ({shown}); left untouched: give the "
                     "labeling data a database of its own")


def _labeling_tables(path: Path, tables: set, labeling: dict) -> bool:
    """Whether every table is one of ``labeling`` (name -> its column names) with none but its columns: the
    tables of an interrupted init, which the store names as such once connected."""
    import sqlite3

    if not tables <= set(labeling):
        return False
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as con:
        return all({row[1] for row in con.execute(f'PRAGMA table_info("{t}")')} <= labeling[t] for t in tables)


def check_sqlite_file(path: Path, create: bool, labeling_tables: Optional[dict] = None) -> None:
    """Refuse, before any connection that could change the file, a SQLite path that is not a labeling database.

    Without ``create`` (every command but ``init``) the file must exist and not be empty. A file
    that is not SQLite is refused and left untouched, and so is a SQLite database of something else
    (tables, none of them ours) in rollback-journal mode, which opening it here would switch to WAL.
    (A WAL-mode file keeps its mode when opened: it is checked once connected, in ``_stored_version``.)
    """
    import sqlite3

    init = f"run 'rlhf label init --db {path}'"
    if path.is_dir():
        raise UserError(f"database {path} is a folder, not a database file")
    if not path.exists():
        if not create:
            raise UserError(f"database file {path} does not exist (not initialised): {init}")
        return
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        raise UserError(f"cannot read database file {path}: {exc.strerror}") from None
    if not head:
        if not create:
            raise UserError(f"database {path} is empty (not initialised): {init}")
        return
    if head[: len(SQLITE_MAGIC)] != SQLITE_MAGIC:
        raise UserError(f"{path} is not a SQLite database (left untouched); give a database file or a new path")
    if len(head) > 18 and head[18] == 2:  # WAL mode: a read-only look would leave -wal/-shm files behind
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise UserError(f"cannot read SQLite database {path}: {exc}") from None
    if tables and MARKER_TABLE not in tables and not _labeling_tables(path, tables, labeling_tables or {}):
        raise foreign_database(path, tables)
    if not tables and not create:
        raise UserError(f"database {path} is not initialised: {init}")
