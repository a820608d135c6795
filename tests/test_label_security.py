"""Security pieces of the labeling app without a server: passwords, sessions, throttling, origins, schema upgrade.

Database tests run on SQLite and on PostgreSQL (``db_url``).
"""

from datetime import timedelta

import pytest
import sqlalchemy as sa

from feedback_ui import http_policy, tasks
from feedback_ui.auth import SCRYPT_N, check_login, hash_password, needs_rehash, set_disabled, verify_password
from feedback_ui.sessions import SessionPolicy, end_session, session_user, start_session
from feedback_ui.store import SCHEMA_VERSION, LoginFailure, LoginSession, SchemaVersion, User, open_store, utcnow
from feedback_ui.testing import PASSWORD, make_project
from feedback_ui.throttle import ThrottlePolicy, begin_attempt, locked, record_failure, record_success, throttle_keys
from rlhf.errors import UserError

# helper functions


def user_id(store, name):
    with store.read() as s:
        return s.scalar(sa.select(User.id).where(User.name == name))


def stored_hash(store, name):
    with store.read() as s:
        return s.scalar(sa.select(User.password_hash).where(User.name == name))


def shift(store, table, column, by: timedelta):
    """Move ``column`` of every row of ``table`` back in time by ``by``."""
    with store.write() as s:
        rows = s.scalars(sa.select(table)).all()
        for row in rows:
            setattr(row, column, getattr(row, column) - by)


# passwords


def test_scrypt_uses_owasp_parameters_and_old_hashes_are_rehashed_at_login(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=0)
    current = stored_hash(store, "ann")
    assert SCRYPT_N == 2**17 and current.startswith("scrypt$131072$8$1$") and not needs_rehash(current)
    old = hash_password(PASSWORD, n=2**14)  # what accounts made before the change hold
    assert needs_rehash(old) and verify_password(PASSWORD, old)
    with store.write() as s:
        s.execute(sa.update(User).where(User.name == "ann").values(password_hash=old))
    assert check_login(store, "ann", "wrong password") is None
    assert stored_hash(store, "ann") == old  # a failed login changes nothing
    assert check_login(store, "ann", PASSWORD).name == "ann"
    fresh = stored_hash(store, "ann")
    assert fresh.startswith("scrypt$131072$8$1$") and verify_password(PASSWORD, fresh)
    assert check_login(store, "ann", PASSWORD) is not None
    # a stored hash asking for absurd memory is refused, not computed
    assert not verify_password(PASSWORD, "scrypt$1073741824$8$1$00$00")


# sessions


def test_sessions_end_when_idle_too_long_too_old_logged_out_or_disabled(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=1)
    policy = SessionPolicy(idle=timedelta(minutes=30), lifetime=timedelta(hours=8))
    ann = user_id(store, "ann")
    token = start_session(store, ann, policy)
    with store.read() as s:  # only a hash of the token is stored
        assert s.scalar(sa.select(LoginSession.token_hash)) != token
    assert session_user(store, token, policy) == "ann"
    assert session_user(store, token + "x", policy) is None and session_user(store, "", policy) is None

    def last_seen():
        with store.read() as s:
            return s.scalar(sa.select(LoginSession.last_seen))

    shift(store, LoginSession, "last_seen", timedelta(minutes=20))
    before = last_seen()
    assert session_user(store, token, policy, touch=False) == "ann" and last_seen() == before  # a heartbeat
    assert session_user(store, token, policy) == "ann" and last_seen() > before  # a request of the user's
    shift(store, LoginSession, "last_seen", timedelta(minutes=31))  # idle
    assert session_user(store, token, policy) is None
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(LoginSession)) == 0  # deleted, not just refused

    token = start_session(store, ann, policy)
    shift(store, LoginSession, "created_at", timedelta(hours=8, minutes=1))  # used recently, but too old
    assert session_user(store, token, policy) is None

    token = start_session(store, ann, policy)
    end_session(store, token)  # logout
    assert session_user(store, token, policy) is None

    tokens = [start_session(store, ann, policy) for _ in range(2)]
    bob = start_session(store, user_id(store, "bob"), policy)
    assert set_disabled(store, "ann") == 2  # both of ann's sessions end at once
    assert [session_user(store, t, policy) for t in tokens] == [None, None]
    assert session_user(store, bob, policy) == "bob"
    with pytest.raises(UserError, match="disabled"):
        tasks.serve(store, "ann", 0.0)  # a request already past the gate is refused too
    with pytest.raises(UserError, match="no user named"):
        set_disabled(store, "nobody")
    assert set_disabled(store, "ann", disabled=False) == 0
    assert tasks.serve(store, "ann", 0.0)["token"]


def test_session_timeouts_must_be_positive():
    with pytest.raises(UserError, match="> 0"):
        SessionPolicy(idle=timedelta(0))


# throttling


def failures(store, key):
    with store.read() as s:
        row = s.get(LoginFailure, key)
        return row.failures if row else 0


def failed_login(store, keys, policy):
    """An attempt counted before its check, then checked and wrong: the lock message, or None."""
    assert begin_attempt(store, keys, policy) is None
    return record_failure(store, keys, policy)


def test_failures_lock_the_account_and_the_address_until_the_lock_ends(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=0)
    policy = ThrottlePolicy(max_failures=3, window=timedelta(minutes=15), lock=timedelta(minutes=10))
    # three addresses, one failure each: the account locks, the addresses do not
    results = [failed_login(store, throttle_keys("ann", f"10.0.0.{i}"), policy) for i in range(3)]
    assert results[:2] == [None, None] and "this account" in results[2] and "10 minutes" in results[2]
    assert "this account" in locked(store, throttle_keys("ann", "10.0.0.99"))
    assert "this account" in begin_attempt(store, throttle_keys("ann", "10.0.0.99"), policy)  # refused, not counted
    assert failures(store, "account:ann") == 3 and failures(store, "address:10.0.0.99") == 0
    assert locked(store, throttle_keys("bob", "10.0.0.1")) is None
    # one address, three accounts: the address locks
    for name in ("x1", "x2", "x3"):
        failed_login(store, throttle_keys(name, "10.0.1.1"), policy)
    assert "your address" in locked(store, throttle_keys("bob", "10.0.1.1"))
    assert locked(store, throttle_keys("bob", "10.0.1.2")) is None
    # the lock ends on its own
    with store.write() as s:
        s.execute(sa.update(LoginFailure).values(locked_until=utcnow() - timedelta(seconds=1)))
    assert locked(store, throttle_keys("ann", "10.0.1.1")) is None


def test_attempts_count_before_their_check_and_a_success_takes_back_only_its_own(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=0)
    policy = ThrottlePolicy(max_failures=3)
    cy = throttle_keys("cy", "10.0.2.1")
    failed_login(store, cy, policy)
    assert begin_attempt(store, cy, policy) is None  # being checked: counted already
    assert failures(store, "account:cy") == failures(store, "address:10.0.2.1") == 2
    record_success(store, cy)  # the right password takes back its own count, not the earlier failure's
    assert failures(store, "account:cy") == failures(store, "address:10.0.2.1") == 1
    # attempts in flight fill the count: one more is refused before any of them is checked
    assert [begin_attempt(store, throttle_keys("dee", f"10.0.3.{i}"), policy) for i in range(3)] == [None] * 3
    assert "this account" in begin_attempt(store, throttle_keys("dee", "10.0.3.9"), policy)
    # the first of them to fail locks the account, and a right password among the others cannot unlock it
    assert "this account" in record_failure(store, throttle_keys("dee", "10.0.3.0"), policy)
    record_success(store, throttle_keys("dee", "10.0.3.1"))
    assert "this account" in locked(store, throttle_keys("dee", "10.0.3.5"))
    assert "this account" in begin_attempt(store, throttle_keys("dee", "10.0.3.5"), policy)


def test_an_attempt_whose_check_fails_or_is_refused_after_a_wait_is_taken_back(db_url, monkeypatch):
    import anyio

    from feedback_ui import gate

    store = make_project(db_url, {"ann": "labeler"}, n_pairs=0)
    door = gate.Gate(None, None, store, throttle=ThrottlePolicy(max_failures=3))

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(gate, "check_login", broken)
    with pytest.raises(RuntimeError):
        anyio.run(door._check, "ann", PASSWORD, "10.0.4.1")
    assert failures(store, "account:ann") == failures(store, "address:10.0.4.1") == 0  # nothing leaked
    # locked while it waited for a hash slot: refused unchecked, and not counted either
    monkeypatch.setattr(gate, "locked", lambda *args: "Too many failed logins for this account")
    assert anyio.run(door._check, "ann", PASSWORD, "10.0.4.1")[0] == 429
    assert failures(store, "account:ann") == failures(store, "address:10.0.4.1") == 0


# origins and headers


def test_allowed_origins_are_parsed_strictly():
    assert http_policy.parse_allowed_origins("https://a.example, http://b.example:8080/") == (
        ("https", "a.example", 443), ("http", "b.example", 8080))  # fmt: skip
    assert http_policy.parse_allowed_origins("") == ()
    for bad in ("*", "null", "a.example", "ftp://a.example", "https://a.example/path", "https://u:p@a.example",
                "https://a.example:99999"):  # fmt: skip
        with pytest.raises(UserError, match="--allowed_origins"):
            http_policy.parse_allowed_origins(bad)


def test_same_origin_means_scheme_host_and_port():
    allowed = http_policy.parse_allowed_origins("https://labels.example.org")
    ok = http_policy.origin_allowed
    assert ok("http://10.1.2.3:7860", "http", "10.1.2.3:7860", ())
    assert ok("https://labels.example.org", "http", "10.1.2.3:7860", allowed)  # a TLS proxy's public origin
    assert ok("https://app.example", "https", "app.example:443", ())
    assert not ok("http://10.1.2.3:7861", "http", "10.1.2.3:7860", ())
    assert not ok("https://10.1.2.3:7860", "http", "10.1.2.3:7860", ())
    assert not ok("https://evil.example", "http", "10.1.2.3:7860", allowed)
    assert not ok("null", "http", "10.1.2.3:7860", allowed)


def test_trusted_proxies_are_parsed_strictly():
    assert http_policy.parse_trusted_proxies("127.0.0.1, 10.0.0.0/8,::1") == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert http_policy.parse_trusted_proxies("") == ()
    for bad in ("*", "localhost", "10.0.0.1/8", "300.1.1.1"):
        with pytest.raises(UserError, match="--trusted_proxies"):
            http_policy.parse_trusted_proxies(bad)


def test_inline_scripts_are_hashed_and_external_ones_are_not():
    page = b'<script>a()</script><script src="x.js"></script><SCRIPT type="module">b()</script>'
    assert http_policy.inline_script_hashes(page) == [
        "'sha256-qVpDBgj7bpq5hMAcGp3AOc79J3Y1Z4HvySTwKrWDoy4='", "'sha256-cf242PFc/kb7xD0Qzhsmd9vvRkc+cWFmbi+k+YvtdKc='"
    ]  # fmt: skip
    policy = http_policy.content_security_policy(["'sha256-abc='"])
    assert "frame-ancestors 'none'" in policy and "script-src 'self' 'sha256-abc='" in policy
    assert "unsafe-inline" not in policy.split("script-src")[1].split(";")[0] and "unsafe-eval" not in policy


# schema


def test_a_version_1_database_is_upgraded_when_opened(new_db):
    db = new_db()
    store = make_project(db, {"ann": "labeler"}, n_pairs=1)
    with store.write() as s:  # back to what version 1 had
        s.execute(sa.text("DROP TABLE login_sessions"))
        s.execute(sa.text("DROP TABLE login_failures"))
        s.execute(sa.text("ALTER TABLE users DROP COLUMN disabled_at"))
        s.execute(sa.text("ALTER TABLE votes DROP COLUMN voided_at"))
        s.execute(sa.delete(SchemaVersion))
        s.add(SchemaVersion(version=1))
    store.close()
    store = open_store(db)
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.max(SchemaVersion.version))) == SCHEMA_VERSION == 3
    assert check_login(store, "ann", PASSWORD).disabled_at is None
    assert set_disabled(store, "ann") == 0
    open_store(db).close()  # opening it again changes nothing
    store.close()
