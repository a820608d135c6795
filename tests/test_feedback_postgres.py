"""Concurrent labelers on one database, on SQLite and on a throwaway PostgreSQL cluster (see conftest.py).

Work done in worker threads goes through ``run_in_threads``: an assertion that fails in a worker is raised
again in the test's thread and fails the test.
"""

import threading

import pytest
import sqlalchemy as sa
from test_feedback_store import run_in_threads, uid

from feedback_ui import tasks
from feedback_ui.db_url import normalize_url
from feedback_ui.export import export_preferences
from feedback_ui.stats import collect_stats
from feedback_ui.store import Assignment, Comparison, Vote, init_db, open_store
from feedback_ui.testing import make_project
from rlhf.errors import UserError


def test_postgresql_databases_are_postgresql(postgres_cluster):
    store = init_db(postgres_cluster.new_database())
    assert store.engine.dialect.name == "postgresql" and not store.is_sqlite
    with store.read() as s:
        assert s.scalar(sa.text("SELECT version()")).startswith("PostgreSQL")


def test_concurrent_votes_idempotency_and_export(db_url, tmp_path):
    names = {f"u{i}": "labeler" for i in range(6)}
    store = make_project(db_url, names, n_pairs=10, overlap=3)
    assert open_store(db_url).url == store.url

    def work(name):
        view = tasks.serve(store, name, 0.0)
        while view["token"]:
            tasks.answer(store, name, view["token"], 0.0, choice="A")
            again = tasks.answer(store, name, view["token"], 0.0, choice="A")  # duplicate submission
            assert again["status"] == "already recorded"
            view = again

    run_in_threads(*(lambda n=n: work(n) for n in names))
    with store.read() as s:
        per = s.execute(sa.select(Vote.comparison_id, sa.func.count()).group_by(Vote.comparison_id)).all()
        assert sorted(n for _, n in per) == [3] * 10
        assert all(c.n_active == 3 for c in s.scalars(sa.select(Comparison)))
    assert export_preferences(store, str(tmp_path / "p.jsonl"), aggregate="all")["rows"] == 30
    assert collect_stats(store)["agreement"]["overlapping_items"] == 10


def test_one_submission_from_two_tabs_at_once_is_stored_once(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=5)
    view = tasks.serve(store, "ann", 0.0)
    for _ in range(5):
        both = threading.Barrier(2)
        replies = []

        def tab(token=view["token"]):
            both.wait(10)
            replies.append(tasks.answer(store, "ann", token, 0.0, choice="B"))

        run_in_threads(tab, tab)
        assert sorted(r["status"] for r in replies) == ["already recorded", "saved"]
        assert replies[0]["token"] == replies[1]["token"]
        view = replies[0]
    assert view["token"] == "" and (view["done"], view["total"]) == (5, 5)
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Vote)) == 5


def test_two_tabs_serving_and_voting_at_once_keep_one_open_task(db_url):
    """Two tabs of one labeler, each asking for its task and voting on it as fast as it can."""
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=12)
    ann = uid(store, "ann")
    open_counts = []

    def tab():
        view = tasks.serve(store, "ann", 0.0)
        while view["token"]:
            with store.read() as s:
                open_counts.append(s.scalar(sa.select(sa.func.count()).select_from(Assignment).where(
                    Assignment.user_id == ann, Assignment.status == "open")))  # fmt: skip
            view = tasks.answer(store, "ann", view["token"], 0.0, choice="A")
            if view["status"] == "already recorded":  # the other tab voted on it first
                view = tasks.serve(store, "ann", 0.0)

    run_in_threads(tab, tab)
    assert max(open_counts) == 1
    with store.read() as s:
        voted = s.scalars(sa.select(Vote.comparison_id)).all()
        assert sorted(voted) == sorted(s.scalars(sa.select(Comparison.id)).all())  # each exactly once
        assert s.scalar(sa.select(sa.func.count()).select_from(Assignment).where(Assignment.status == "open")) == 0


def test_no_message_shows_the_database_password(postgres_cluster, tmp_path, capsys):
    """The database URL's password is masked wherever a command names the database (the test cluster trusts
    every login, so the password in these URLs is accepted and ignored)."""
    from rlhf.cli import main
    from rlhf.testing import write_jsonl

    secret, said = "S3cretPW", []

    def run(*argv) -> tuple[int, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        said.append(captured.out + captured.err)
        return code, said[-1]

    with_password = lambda url: url.replace("postgres@", f"postgres:{secret}@")  # noqa: E731
    url, fresh = with_password(postgres_cluster.new_database()), with_password(postgres_cluster.new_database())
    rows = [{"prompt": "2+2?", "response": "4", "model": "a"}, {"prompt": "2+2?", "response": "Four.", "model": "b"}]
    responses = str(write_jsonl(tmp_path / "r.jsonl", rows))
    code, text = run("label", "init", "--db", url)
    assert code == 0 and "database ready: postgresql+psycopg://postgres:***@" in text
    code, text = run("label", "import", "--db", url, "--file", responses)
    assert code == 0 and "1 new comparisons -> postgresql://postgres:***@" in text
    code, text = run("label", "stats", "--db", fresh)  # not initialised
    assert code == 2 and "is not initialised: run 'rlhf label init' with the same --db" in text
    with init_db(url) as store, store.write() as s:
        s.execute(sa.text("INSERT INTO schema_version (version) VALUES (99)"))
    code, text = run("label", "stats", "--db", url)  # a newer schema
    assert code == 2 and "has schema version 99" in text
    code, text = run("label", "stats", "--db", url.replace(secret, "p@ss" + secret))  # '@' not written as %40
    assert code == 2 and "an '@' in the password must be written as %40" in text
    code, text = run("label", "stats", "--db", url.replace("postgresql://", "mysql://"))
    assert code == 2 and "unsupported database URL scheme 'mysql://'" in text
    assert len(said) == 6 and not [text for text in said if secret in text]
    # an '@' in the user name parses (e.g. Azure's user@server form): only the password's is ambiguous, wherever
    # the text after it would go (host, database or query)
    assert normalize_url("postgresql://user@server:pw@db.example:5432/labels").endswith("@db.example:5432/labels")
    for password in ("p@ss?word", "p@ss/word", "p@ss:word", "p@ss"):
        with pytest.raises(UserError, match="an '@' in the password must be written as %40"):
            normalize_url(f"postgresql://user:{password}@db.example:5432/labels")


FOREIGN_SCHEMAS = {
    "another application": ["CREATE TABLE users (id integer PRIMARY KEY, email text)", "CREATE TABLE orders (id int)"],
    "a table of the same name alone": ["CREATE TABLE users (id integer PRIMARY KEY, email text)"],
    "another schema_version": ["CREATE TABLE schema_version (version text, script text)"],
    "an integer schema_version alone": ["CREATE TABLE schema_version (version integer PRIMARY KEY)",
                                        "INSERT INTO schema_version VALUES (2)"],
}


@pytest.mark.parametrize("what", list(FOREIGN_SCHEMAS))
def test_a_database_of_something_else_is_left_untouched(what, new_db, capsys):
    """On SQLite and on PostgreSQL alike, `rlhf label init` and the other commands refuse a database holding
    tables that are not the labeling schema's, before writing anything."""
    from rlhf.cli import main

    db = new_db()
    engine = sa.create_engine(normalize_url(db))
    with engine.begin() as conn:
        for statement in FOREIGN_SCHEMAS[what]:
            conn.execute(sa.text(statement))

    def snapshot():
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            tables = {t: [c["name"] for c in inspector.get_columns(t)] for t in inspector.get_table_names()}
            versions = conn.execute(sa.text("SELECT * FROM schema_version")).all() if "schema_version" in tables else []
            return tables, versions

    before = snapshot()
    for argv in (["label", "init"], ["label", "stats"], ["label", "user", "list"]):
        assert main([*argv, "--db", db]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "something else" in err and "left untouched" in err
        assert err.count("\n") == 1
    assert snapshot() == before
    engine.dispose()


def test_logins_to_one_account_on_two_replicas_at_once_never_deadlock(postgres_cluster):
    """Two app processes (two stores) count and take back attempts of one account from two addresses at once, as
    the gate does for right passwords: each function locks its rows in key order, so no transaction waits for
    another's rows in a cycle (PostgreSQL would end one as a deadlock's victim, a 500 and a leaked count), and
    every count is taken back."""
    from feedback_ui.store import LoginFailure
    from feedback_ui.throttle import ThrottlePolicy, begin_attempt, record_success

    url = postgres_cluster.new_database()
    init_db(url).close()
    stores = [open_store(url), open_store(url)]
    policy = ThrottlePolicy(max_failures=10**6)  # only the locking is looked at here

    def logins(worker: int):
        for attempt in range(60):
            keys = ["account:bob", f"address:10.0.0.{(worker + attempt) % 2}"]
            assert begin_attempt(stores[worker % 2], keys, policy) is None
            record_success(stores[worker % 2], keys)

    run_in_threads(*[lambda worker=worker: logins(worker) for worker in range(4)])
    with stores[0].read() as s:
        counts = dict(s.execute(sa.select(LoginFailure.key, LoginFailure.failures)).all())
    assert counts == {"account:bob": 0, "address:10.0.0.0": 0, "address:10.0.0.1": 0}
    for store in stores:
        store.close()


@pytest.mark.parametrize("name", ["a\x00b", "x" * 65, ""])
def test_a_login_name_no_account_can_have_is_a_wrong_login_on_either_database(name, new_db):
    """PostgreSQL refuses text with NUL, which made such a login a 500 for anyone, without an account."""
    import httpx

    from feedback_ui.server import Server
    from feedback_ui.testing import PASSWORD, make_project

    store = make_project(new_db(), {"ann": "labeler"}, n_pairs=1)
    server = Server(store).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            wrong = client.post("login", data={"username": name, "password": PASSWORD})
            known = client.post("login", data={"username": "nobody", "password": PASSWORD})
        assert wrong.status_code == known.status_code == 401 and wrong.json() == known.json()
    finally:
        server.stop()
        store.close()


def test_a_connect_timeout_in_the_url_is_kept(postgres_cluster):
    from feedback_ui.store import PG_CONNECT_TIMEOUT_S, make_engine

    def timeout(url: str) -> bytes:
        engine = make_engine(normalize_url(url))
        connection = engine.raw_connection()
        try:
            return next(o.val for o in connection.driver_connection.pgconn.info if o.keyword == b"connect_timeout")
        finally:
            connection.close()
            engine.dispose()

    url = postgres_cluster.new_database()
    assert timeout(url) == str(PG_CONNECT_TIMEOUT_S).encode() and PG_CONNECT_TIMEOUT_S != 3
    assert timeout(url + "?connect_timeout=3") == b"3"


def test_the_throttles_sweep_of_forgotten_rows_holds_no_lock_while_an_attempt_waits(postgres_cluster):
    """A login (T1) holds its account's row and is about to lock its address's row, which another login's sweep
    of forgotten failures (T2) finds stale: T2's sweep commits before T2 waits for the account's row, so T1 gets
    its row without a lock cycle (PostgreSQL would end one of them as a deadlock's victim)."""
    import time
    from datetime import timedelta

    from feedback_ui.store import LoginFailure, utcnow
    from feedback_ui.throttle import ThrottlePolicy, begin_attempt

    url = postgres_cluster.new_database()
    init_db(url).close()
    first, second = open_store(url), open_store(url)
    now = utcnow()
    with first.write() as s:
        s.add(LoginFailure(key="account:b", failures=1, window_start=now))
        s.add(LoginFailure(key="address:1", failures=1, window_start=now - timedelta(minutes=16)))  # forgotten
    result = {}

    def other_login():
        result["other"] = begin_attempt(second, ["account:b", "address:2"], ThrottlePolicy())

    with first.engine.connect() as conn, conn.begin():
        conn.execute(sa.select(LoginFailure).where(LoginFailure.key == "account:b").with_for_update())
        waiting = threading.Thread(target=other_login)
        waiting.start()
        time.sleep(1.0)  # the other login has swept and waits for account:b
        conn.execute(sa.select(LoginFailure).where(LoginFailure.key == "address:1").with_for_update())
    waiting.join(30)
    assert result == {"other": None}  # (a deadlock's victim would have been retried: the count below tells)
    for store in (first, second):
        store.close()
    assert deadlocks(url) == 0


def deadlocks(url: str) -> int:
    """Deadlocks PostgreSQL has broken in this database (its statistics, once every backend has reported)."""
    import time

    engine = sa.create_engine(normalize_url(url))
    try:
        time.sleep(1.5)  # backends report their statistics at most once a second
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            return conn.scalar(sa.text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        engine.dispose()


def test_an_interrupted_init_of_an_older_version_is_named_as_such(new_db, capsys):
    """Our tables without a schema version (an older init, which recorded the version in a second transaction,
    stopped between the two): refused, left untouched, and said to be that rather than another application's."""
    from feedback_ui.store import Base
    from rlhf.cli import main

    db = new_db()
    engine = sa.create_engine(normalize_url(db))
    Base.metadata.create_all(engine, tables=[t for name, t in Base.metadata.tables.items() if name != "schema_version"])
    engine.dispose()
    assert main(["label", "init", "--db", db]) == 2
    assert "holds labeling tables but no schema version (an interrupted 'rlhf label init')" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_inits_of_a_new_database_at_once_both_succeed(backend, postgres_cluster, tmp_path):
    """Both find the schema (the second waits for the first and finds its schema) and nothing is deleted: on
    SQLite the losing init used to fail and unlink the database file the winner had just made."""
    from feedback_ui.store import SchemaVersion

    db = str(tmp_path / "new.db") if backend == "sqlite" else postgres_cluster.new_database()
    both = threading.Barrier(2)
    stores = []

    def init():
        both.wait()
        stores.append(init_db(db))

    for _ in range(5):
        run_in_threads(init, init)
        for store in stores:
            store.close()
        with open_store(db) as store, store.read() as s:
            assert s.scalars(sa.select(SchemaVersion.version)).all() == [3]
        stores.clear()
        if backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                (tmp_path / f"new.db{suffix}").unlink(missing_ok=True)
        else:
            postgres_cluster.drop_database(db)
            postgres_cluster._admin(f'CREATE DATABASE "{db.rsplit("/", 1)[1]}"')
