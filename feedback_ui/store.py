"""Database schema, engine set-up and schema versioning.

SQLite is the default (a plain file path or ``sqlite:///FILE``): WAL journal,
``synchronous=FULL`` (a committed vote survives a killed process and a crashed
OS), foreign keys on. Write transactions begin with ``BEGIN IMMEDIATE`` and are
serialised inside the process by a lock owned by the :class:`Store`, so
concurrent labelers queue for the writer instead of spinning on
``SQLITE_BUSY``. PostgreSQL works by URL (``postgresql://...``); there the
assignment counters are updated with conditional ``UPDATE`` statements so the
same code is safe without the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import sqlalchemy as sa
from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from feedback_ui.db_errors import database_errors
from feedback_ui.db_url import (MARKER_TABLE, check_sqlite_file, foreign_database, normalize_url, shown_url,
                                sqlite_path)  # fmt: skip
from rlhf.errors import UserError

SCHEMA_VERSION = 3  # 2: users.disabled_at, login_sessions, login_failures; 3: votes.voided_at
PG_CONNECT_TIMEOUT_S = 10


# helper functions


def has_nul(value: Any) -> bool:
    """Whether a string, or any string in a list or dict, holds a NUL character, which PostgreSQL cannot store in
    text (SQLite can: such text is refused on both, so that a database's backend never decides what is kept)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_nul(v) for v in value)
    return False


def utcnow() -> datetime:
    """Naive UTC (SQLite keeps no time zone; every timestamp in the database is UTC)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# schema


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = MARKER_TABLE
    version: Mapped[int] = mapped_column(primary_key=True)


class Setting(Base):
    """Project-wide settings written by ``rlhf label candidates`` (e.g. ``gold_rate``)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # labeler | admin
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[Optional[datetime]] = mapped_column()  # set by 'rlhf label user disable'


class LoginSession(Base):
    """A logged-in browser or client: the cookie holds the token, the database only its sha256."""

    __tablename__ = "login_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class LoginFailure(Base):
    """Failed logins counted per key (``account:NAME`` or ``address:IP``) for throttling."""

    __tablename__ = "login_failures"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    window_start: Mapped[datetime] = mapped_column(default=utcnow)
    locked_until: Mapped[Optional[datetime]] = mapped_column()


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the canonical messages JSON
    text: Mapped[str] = mapped_column(Text)  # what labelers read and what export writes
    messages: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Response(Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("prompt_id", "text_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    text_key: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # policy | gold | edit
    policy: Mapped[Optional[str]] = mapped_column(String(1024))  # base model [+ adapter]
    settings: Mapped[Optional[Any]] = mapped_column(JSON)  # generation settings
    author_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))  # edits
    parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("responses.id"))  # the edited response
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Comparison(Base):
    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # pair | rank
    response_ids: Mapped[Any] = mapped_column(JSON)  # canonical order (ascending ids)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    overlap: Mapped[int] = mapped_column(default=1)  # labelers wanted
    n_active: Mapped[int] = mapped_column(default=0)  # open + done assignments
    is_gold: Mapped[bool] = mapped_column(default=False, index=True)
    gold_ranking: Mapped[Optional[Any]] = mapped_column(JSON)  # known answer, best first
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("comparison_id", "user_id"),  # nobody gets a comparison twice
        Index("ix_assignments_user_status", "user_id", "status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token: Mapped[str] = mapped_column(String(64), unique=True)
    order: Mapped[Any] = mapped_column(JSON)  # response ids in display order (A, B, ...)
    status: Mapped[str] = mapped_column(String(8), default="open")  # open | done | skipped | expired | requeued
    is_gold: Mapped[bool] = mapped_column(default=False)
    assigned_at: Mapped[datetime] = mapped_column(default=utcnow)
    shown_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column()


class Vote(Base):
    __tablename__ = "votes"
    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    outcome: Mapped[str] = mapped_column(String(12))  # ranked | tie | both_bad
    ranking: Mapped[Any] = mapped_column(JSON)  # response ids best first (display order for tie/both_bad)
    picked_position: Mapped[Optional[int]] = mapped_column()  # display slot of the best (0 = A)
    strength: Mapped[Optional[str]] = mapped_column(String(12))  # slightly | much
    rationale: Mapped[Optional[str]] = mapped_column(Text)
    edited_response_id: Mapped[Optional[int]] = mapped_column(ForeignKey("responses.id"))
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    voided_at: Mapped[Optional[datetime]] = mapped_column()  # set when an admin re-queues the labeler's work

    @classmethod
    def counted(cls):
        """The condition for votes that count (not voided by a re-queue)."""
        return cls.voided_at.is_(None)


# engine and sessions


def _set_wal(cur) -> None:
    """WAL mode, once per database file. Switching needs the file to itself and fails at once (no busy wait)
    while another connection uses it, as when two processes open a new database together: tried again."""
    import sqlite3
    import time

    for attempt in range(100):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _configure_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        _set_wal(cur)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8, max_overflow=32
        )
        _configure_sqlite(engine)
        return engine
    connect_args = {}
    if url.startswith("postgresql") and "connect_timeout=" not in url.partition("?")[2]:  # the URL's own wins
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    try:
        return sa.create_engine(url, pool_size=8, max_overflow=32, pool_pre_ping=True, connect_args=connect_args)
    except sa.exc.ArgumentError:  # the message would quote the URL, password included
        raise UserError(f"invalid {url.split('://')[0]} database URL: SQLAlchemy cannot parse it") from None
    except ModuleNotFoundError as exc:
        raise UserError(f"cannot open {url.split('://')[0]} database: driver {exc.name} is not installed") from None


def transaction_memo(session: Session) -> dict:
    """A dict for what stays true until the session's transaction ends (e.g. rows it locked); a :class:`Store`
    session empties it when a transaction ends."""
    return session.info.setdefault(_MEMO, {})


_MEMO = "transaction_memo"


def _forget_transaction_memo(session: Session, transaction) -> None:
    if transaction.parent is None:  # the database transaction ended, not a flush's or a savepoint's inner one
        session.info.pop(_MEMO, None)


class Store:
    """An open database: ``read()`` and ``write()`` give sessions; ``write()`` commits on success."""

    def __init__(self, db: str, create: bool = False):
        """Open ``db``; a SQLite file must already exist unless ``create`` (``init_db``) and be a SQLite database."""
        self.url = normalize_url(db)
        path = sqlite_path(self.url)
        if path is not None:
            check_sqlite_file(path, create, {name: set(t.columns.keys()) for name, t in Base.metadata.tables.items()})
        self.engine = make_engine(self.url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.memo: dict = {}  # what this process may remember about the database between transactions
        event.listen(self._sessions, "after_transaction_end", _forget_transaction_memo)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that is committed (durably) before the block's result is used."""
        with self._write_lock, self._sessions() as session:
            session.connection(execution_options={"immediate": True})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


FIRST_TABLES = {"settings", "users", "prompts", "responses", "comparisons", "assignments", "votes"}  # schema v1


def _stored_version(store: Store) -> Optional[int]:
    """The schema version of a labeling database, None for an empty one; a database that holds tables of
    something else (also a ``schema_version`` table that is not ours) is refused before anything is written."""
    inspector = sa.inspect(store.engine)
    tables = set(inspector.get_table_names())
    where = sqlite_path(store.url) if store.is_sqlite else shown_url(store.url)
    if SchemaVersion.__tablename__ not in tables:
        ours = Base.metadata.tables
        if tables and all(t in ours and {c["name"] for c in inspector.get_columns(t)} <= set(ours[t].columns.keys())
                          for t in tables):  # an older version's init, stopped before recording its version
            raise UserError(f"database {where} holds labeling tables but no schema version (an interrupted "
                            "'rlhf label init'); left untouched: drop those tables or use a new database")
        if tables:  # init creates the tables and records the version in one transaction: these are not ours
            raise foreign_database(where, tables, store.is_sqlite)
        return None
    columns = {c["name"]: c["type"] for c in inspector.get_columns(SchemaVersion.__tablename__)}
    if list(columns) != ["version"] or not isinstance(columns["version"], sa.Integer) or not FIRST_TABLES <= tables:
        raise foreign_database(where, tables, store.is_sqlite)
    with store.read() as s:
        return s.scalar(sa.select(sa.func.max(SchemaVersion.version)))


def _check_version(version: Optional[int], url: str) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise UserError(
            f"database {shown_url(url)} has schema version {version}, newer than this toolkit supports "
            f"({SCHEMA_VERSION}); "
            "upgrade the toolkit"
        )


def _upgrade(store: Store) -> None:
    """Bring an older schema up to ``SCHEMA_VERSION`` (additive changes only; safe when two processes race).

    Version 1 -> 2: the column ``users.disabled_at`` and the tables ``login_sessions`` and ``login_failures``.
    Version 2 -> 3: the column ``votes.voided_at``. A column that is already there is left alone.
    """
    with store.write() as s:
        conn = s.connection()
        if not store.is_sqlite:  # SQLite's BEGIN IMMEDIATE already keeps a second upgrader out
            conn.exec_driver_sql(f"LOCK TABLE {SchemaVersion.__tablename__} IN EXCLUSIVE MODE")
        version = conn.scalar(sa.select(sa.func.max(SchemaVersion.version)))
        if version is None or version >= SCHEMA_VERSION:
            return
        Base.metadata.create_all(conn)  # the new tables
        for since, column in ((2, User.__table__.c.disabled_at), (3, Vote.__table__.c.voided_at)):
            table = column.table.name
            present = {c["name"] for c in sa.inspect(conn).get_columns(table)}
            if version < since and column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column.name} {kind}")
        s.add(SchemaVersion(version=SCHEMA_VERSION))


def init_db(db: str) -> Store:
    """Create the schema (idempotent), upgrade an older one, and record the schema version.

    Refuses a file that is not a SQLite database; a database file made here is removed again if
    creating the schema fails.
    """
    store = Store(db, create=True)
    path = sqlite_path(store.url)
    fresh = path is not None and not path.exists()
    try:
        with database_errors(store.url):
            version = _stored_version(store)
            _check_version(version, store.url)
            if version is not None and version < SCHEMA_VERSION:
                _upgrade(store)
            if version is None:
                _create_schema(store)
            else:
                Base.metadata.create_all(store.engine)
    except BaseException:
        store.close()
        if fresh and not _has_schema(path):  # a file another init made meanwhile is that one's
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise
    return store


INIT_LOCK = 0x726C6866  # the key of the PostgreSQL advisory lock that serialises creating the schema


def _create_schema(store: Store) -> None:
    """The schema and its version, in one transaction, unless another init made them meanwhile (two inits of
    a new database at once: the second finds the first one's schema instead of failing on it)."""
    with store.write() as s:
        conn = s.connection()
        if not store.is_sqlite:  # (SQLite: the write transaction holds the whole database already)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": INIT_LOCK})
        if SchemaVersion.__tablename__ in sa.inspect(conn).get_table_names():
            return
        Base.metadata.create_all(conn)
        s.add(SchemaVersion(version=SCHEMA_VERSION))


def _has_schema(path: Path) -> bool:
    """Whether the SQLite file holds our ``schema_version`` table (read-only look)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as con:
            return con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)).fetchone() is not None
    except sqlite3.Error:
        return False


def open_store(db: str) -> Store:
    """Open an initialised database (an older schema is upgraded in place); a missing file or schema,
    a newer version or no connection is a clear error."""
    store = Store(db)
    try:
        with database_errors(store.url):
            version = _stored_version(store)
        if version is None:
            init = f"'rlhf label init --db {db}'" if store.is_sqlite else "'rlhf label init' with the same --db"
            raise UserError(f"database {shown_url(store.url)} is not initialised: run {init}")
        _check_version(version, store.url)
        if version < SCHEMA_VERSION:
            with database_errors(store.url):
                _upgrade(store)
    except BaseException:
        store.close()
        raise
    return store


def get_setting(session: Session, key: str, default: Any = None) -> Any:
    row = session.get(Setting, key)
    return default if row is None else row.value


def set_setting(session: Session, key: str, value: Any) -> None:
    session.merge(Setting(key=key, value=value))
