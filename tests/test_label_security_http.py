"""The labeling app's defences over HTTP, against a real server: origins, tokens, cookies, throttling,
sessions, uploads, error messages, headers and HTTPS.

Clients set ``X-Forwarded-For`` (trusted from 127.0.0.1 with ``trusted_proxies``, as from a local proxy) to stand
for different client addresses, so the per-address throttle of one test does not reach the others.
"""

import itertools
import re
import shutil
import subprocess
import threading
import time
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa
from gradio_client import Client

from feedback_ui import gate
from feedback_ui.auth import set_disabled
from feedback_ui.http_policy import parse_allowed_origins
from feedback_ui.server import Server, _uvicorn_config
from feedback_ui.store import LoginFailure, LoginSession
from feedback_ui.testing import PASSWORD, make_project
from rlhf.cli import main

USERS = {"ann": "labeler", "bob": "labeler", "carol": "labeler", "dave": "labeler", "erin": "labeler",
         "fred": "labeler", "root": "admin"}  # fmt: skip
EVIL = "https://evil.example"
_addresses = (f"10.9.{i // 250}.{i % 250 + 1}" for i in itertools.count())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("security") / "app.db")
    store = make_project(db, USERS, n_pairs=6)
    server = Server(store, allowed_origins=parse_allowed_origins("https://labels.example.org"),
                    trusted_proxies=("127.0.0.1",)).start()  # fmt: skip
    yield server, store, db
    server.stop()


def http(server, **kwargs):
    return httpx.Client(base_url=server.url, timeout=30, **kwargs)


def login(server, name="ann", password=PASSWORD, address=None) -> httpx.Response:
    with http(server) as c:
        return c.post("login", data={"username": name, "password": password},
                      headers={"X-Forwarded-For": address or next(_addresses)})  # fmt: skip


def session_cookie(server, name="ann") -> str:
    """``Cookie`` header value of a fresh login."""
    r = login(server, name)
    assert r.status_code == 200, r.text
    return "; ".join(f"{k}={v}" for k, v in r.cookies.items())


def cors_headers(r) -> dict:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def failures(store, key) -> int:
    with store.read() as s:
        row = s.get(LoginFailure, key)
        return row.failures if row else 0


def wait_until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def in_threads(calls) -> tuple[list, list]:
    """Start each ``call`` (no arguments) in a thread; returns (threads, results in finishing order)."""
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c()), daemon=True) for c in calls]
    for thread in threads:
        thread.start()
    return threads, results


def held_checks(monkeypatch, answer=None):
    """Replace the password check by one that waits for the returned event (``answer``: what it does then, by
    default the real check); returns (event, the passwords checked so far)."""
    release, checked = threading.Event(), []
    real = gate.check_login

    def held(store, name, password):
        checked.append(password)
        assert release.wait(60)
        return (answer or real)(store, name, password)

    monkeypatch.setattr(gate, "check_login", held)
    return release, checked


# origins


@pytest.mark.parametrize("host", ["labels.internal:7860", "localhost"])
@pytest.mark.parametrize("method, path", [("GET", "config"), ("GET", "gradio_api/info"), ("GET", "gradio_api/token"),
                                          ("GET", ""), ("POST", "login"), ("POST", "gradio_api/queue/join"),
                                          ("POST", "gradio_api/run/vote")])
def test_foreign_origin_with_credentials_gets_no_data(app, host, method, path):
    server, _, _ = app
    cookie = session_cookie(server)
    headers = {"Host": host, "Origin": EVIL, "Cookie": cookie}
    with http(server) as c:
        form = {"username": "ann", "password": PASSWORD} if path == "login" else None
        r = c.request(method, path, headers=headers, data=form)
        assert r.status_code == 403 and cors_headers(r) == {}
        assert "next_task" not in r.text and "pair prompt" not in r.text and "set-cookie" not in r.headers
        # the same request from the app's own origin (as seen through that Host) is served
        same = c.get("config", headers={**headers, "Origin": f"http://{host}"})
        assert same.status_code == 200 and "next_task" in same.text and cors_headers(same) == {}


def test_listed_origin_is_served_and_echoed(app):
    server, _, _ = app
    headers = {"Origin": "https://labels.example.org", "Cookie": session_cookie(server)}
    with http(server) as c:
        r = c.get("config", headers=headers)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://labels.example.org"
        assert r.headers["access-control-allow-credentials"] == "true"
        pre = c.options("gradio_api/queue/join", headers={**headers, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://labels.example.org"
        for origin in ("null", "https://labels.example.org.evil.example", "http://labels.example.org"):
            assert c.get("config", headers={**headers, "Origin": origin}).status_code == 403


# tokens and cookies


def test_no_route_hands_the_session_token_to_script(app):
    server, _, _ = app
    r = login(server)
    token = next(iter(r.cookies.values()))
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "secure" not in set_cookie  # plain HTTP
    assert token not in r.text
    with http(server, cookies=dict(r.cookies)) as c:
        assert c.get("config").status_code == 200
        for path in ("gradio_api/token", "gradio_api/token/", "config", "gradio_api/info", "", "login"):
            answer = c.get(path)
            assert token not in answer.text, path
        assert c.get("gradio_api/token").status_code == 404


# throttling and the password check


def test_ten_failures_lock_the_account_with_a_clear_message(app):
    server, _, _ = app
    for _ in range(10):  # each from another address: only the account counts up to ten
        assert login(server, "carol", "wrong password").status_code in (401, 429)
    r = login(server, "carol")  # the right password, from a fresh address
    assert r.status_code == 429 and "this account" in r.text and "try again in 15 minutes" in r.text
    assert "set-cookie" not in r.headers
    assert login(server, "ann").status_code == 200  # other accounts are untouched
    browser = httpx.post(f"{server.url}login", data={"username": "carol", "password": PASSWORD},
                         headers={"Accept": "text/html", "X-Forwarded-For": next(_addresses)})  # fmt: skip
    assert browser.status_code == 429 and 'role="alert"' in browser.text and "locked" in browser.text
    with pytest.raises(ValueError, match="login"):
        Client(server.url, auth=("carol", PASSWORD), verbose=False)


def test_ten_failures_from_one_address_lock_that_address(app):
    server, _, _ = app
    address = next(_addresses)
    for i in range(10):
        login(server, f"guess{i}", "wrong password", address=address)
    r = login(server, "ann", address=address)
    assert r.status_code == 429 and "your address" in r.text
    assert login(server, "ann").status_code == 200  # from another address


def test_parallel_attempts_are_counted_before_their_passwords_are_checked(app, monkeypatch):
    """Wrong passwords sent at once, then the right one: at most ten are checked, the right one is refused while
    they are, and the account ends up locked (no success clears a lock)."""
    server, store, _ = app
    release, checked = held_checks(monkeypatch)
    threads, results = in_threads([lambda i=i: login(server, "erin", f"wrong guess {i}") for i in range(14)])
    try:
        wait_until(lambda: failures(store, "account:erin") == 10, "ten attempts are counted")
        right = login(server, "erin")  # while ten wrong ones wait to be checked
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert right.status_code == 429 and "this account" in right.text and "set-cookie" not in right.headers
    assert len(results) == 14 and len(checked) <= 10, f"{len(checked)} passwords checked"
    assert {r.status_code for r in results} <= {401, 429} and sum(r.status_code == 429 for r in results) >= 4
    after = login(server, "erin")  # the right password, from another address
    assert after.status_code == 429 and "this account" in after.text


def test_logins_beyond_the_waiting_limit_are_refused_at_once(app, monkeypatch):
    server, store, _ = app
    monkeypatch.setattr(gate, "LOGINS_WAITING", 3, raising=False)
    release, checked = held_checks(monkeypatch, answer=lambda *args: None)
    threads, results = in_threads([lambda i=i: login(server, f"queued{i}", "wrong password") for i in range(3)])
    try:  # two hold the scrypt slots, the third waits for one
        wait_until(lambda: len(checked) == 2 and sum(failures(store, f"account:queued{i}") for i in range(3)) == 3,
                   "two logins are checked and a third waits")  # fmt: skip
        start = time.monotonic()
        busy = login(server, "ann")
        waited = time.monotonic() - start
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert busy.status_code == 429 and "Too many logins at once" in busy.text and waited < 5
    assert sorted(r.status_code for r in results) == [401, 401, 401]
    monkeypatch.undo()
    assert login(server, "ann").status_code == 200  # the queue is free again


def test_password_checks_run_off_the_event_loop(app, monkeypatch):
    server, _, _ = app
    threads = []

    def slow_check(store, name, password):  # stands for a slow scrypt run
        threads.append(threading.current_thread())
        time.sleep(1.5)

    monkeypatch.setattr(gate, "check_login", slow_check)
    with http(server) as c:
        logins = [threading.Thread(target=login, args=(server, "ann", "wrong password")) for _ in range(4)]
        for t in logins:
            t.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert c.get("login").status_code == 200
        page_time = time.monotonic() - start
        for t in logins:
            t.join()
    assert len(threads) == 4 and server.thread not in threads
    assert page_time < 1.0, f"the login page took {page_time:.2f} s while passwords were checked"


# sessions


def test_logout_ends_the_session_on_the_server(app):
    server, _, _ = app
    cookie = session_cookie(server)
    with http(server) as c:
        assert c.get("config", headers={"Cookie": cookie}).status_code == 200
        out = c.get("logout", headers={"Cookie": cookie, "Accept": "text/html"})
        assert out.status_code == 303 and out.headers["location"] == "login"
        assert "max-age=0" in out.headers["set-cookie"].lower()
        assert c.get("config", headers={"Cookie": cookie}).status_code == 401  # the old cookie is dead


def test_idle_and_old_sessions_end(app):
    server, store, _ = app
    for column, by in (("last_seen", timedelta(minutes=61)), ("created_at", timedelta(hours=12, minutes=1))):
        cookie = session_cookie(server, "bob")
        with http(server) as c:
            assert c.get("config", headers={"Cookie": cookie}).status_code == 200
            with store.write() as s:  # an hour idle (default limit 60 minutes), or 12 hours old (default 12)
                for row in s.scalars(sa.select(LoginSession)):
                    setattr(row, column, getattr(row, column) - by)
            r = c.get("config", headers={"Cookie": cookie})
            assert r.status_code == 401 and "log in again" in r.text


def test_disabling_a_user_ends_their_sessions_at_once(app, capsys):
    server, _, db = app
    cookie = session_cookie(server, "dave")
    dave = Client(server.url, auth=("dave", PASSWORD), verbose=False)
    assert dave.predict(api_name="/next_task")["token"]
    with http(server) as c:
        assert c.get("config", headers={"Cookie": cookie}).status_code == 200
        assert main(["label", "user", "disable", "dave", "--db", db]) == 0
        assert "2 sessions ended" in capsys.readouterr().out
        assert c.get("config", headers={"Cookie": cookie}).status_code == 401
    with pytest.raises(Exception):
        dave.predict(api_name="/next_task")
    r = login(server, "dave")
    assert r.status_code == 401 and "Wrong user name or password" in r.text and "set-cookie" not in r.headers
    assert main(["label", "user", "enable", "dave", "--db", db]) == 0
    assert login(server, "dave").status_code == 200


def test_a_disabled_account_answers_like_a_wrong_password_and_clears_no_count(app):
    server, store, _ = app
    set_disabled(store, "fred")
    wrong, right = login(server, "fred", "wrong password"), login(server, "fred")
    assert wrong.status_code == right.status_code == 401 and wrong.json() == right.json()
    assert "set-cookie" not in right.headers
    assert failures(store, "account:fred") == 2  # both counted: the right password confirmed and cleared nothing
    set_disabled(store, "fred", disabled=False)
    assert login(server, "fred").status_code == 200


# uploads, request size, error messages


def test_uploads_and_oversized_requests_are_refused(app):
    server, _, _ = app
    with http(server, headers={"Cookie": session_cookie(server)}) as c:
        up = c.post("gradio_api/upload", files={"files": ("a.txt", b"hello")})
        assert up.status_code == 404 and "a.txt" not in up.text
        big = c.post("gradio_api/queue/join", content=b"x" * (gate.MAX_BODY + 1),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        assert big.status_code == 413
        assert c.post("login", content=b"u" * (gate.MAX_LOGIN_BODY + 1)).status_code == 413
        for kind in ("multipart/form-data; boundary=x", "multipart/form-data", "application/x-www-form-urlencoded"):
            garbled = c.post("login", content=b"--x\r\n\xff%%nonsense", headers={"Content-Type": kind})
            assert garbled.status_code in (400, 401) and "Traceback" not in garbled.text  # refused, not crashed


@pytest.mark.parametrize("path", ["gradio_api/process_recording", "gradio_api/component_server", "gradio_api/upload/",
                                  "gradio_api/stream/abc", "gradio_api/stream/abc/close", "gradio_api/vibe-edit",
                                  "gradio_api/undo-vibe-edit", "gradio_api/vibe-code"])  # fmt: skip
def test_routes_that_take_files_or_run_code_answer_404(app, path):
    server, _, _ = app
    with http(server, headers={"Cookie": session_cookie(server)}) as c:
        r = c.post(path, files={"video": ("x.mp4", b"NOT A VIDEO " * 100, "video/mp4")})
        assert r.status_code == 404 and b"NOT A VIDEO" not in r.content
        assert c.post(path, json={"data": [], "session_hash": "s"}).status_code == 404


def test_a_file_is_refused_on_every_route(app):
    server, store, _ = app
    with http(server, headers={"Cookie": session_cookie(server)}) as c:
        for path in ("gradio_api/run/vote", "gradio_api/queue/join", "gradio_api/a_route_of_a_later_gradio", ""):
            r = c.post(path, files={"files": ("a.txt", b"hello")}, data={"data": "[]"})
            assert r.status_code == 415 and "takes no files" in r.text, path
        assert c.post("gradio_api/run/next_task", json={"data": [], "session_hash": "s"}).status_code == 200


def test_x_forwarded_for_is_ignored_unless_the_proxy_is_trusted(tmp_path, monkeypatch):
    config = _uvicorn_config(None, "127.0.0.1", 0, None, None, grace=1)
    assert config.proxy_headers is False
    proxied = _uvicorn_config(None, "127.0.0.1", 0, None, None, grace=1, trusted_proxies=("10.0.0.0/8",))
    assert proxied.proxy_headers is True and proxied.forwarded_allow_ips == ["10.0.0.0/8"]
    monkeypatch.setattr(gate, "check_login", lambda store, name, password: None)  # every password is wrong, fast
    store = make_project(str(tmp_path / "xff.db"), {"ann": "labeler"}, n_pairs=0)
    server = Server(store).start()  # no --trusted_proxies
    try:
        for i in range(10):
            assert login(server, f"guess{i}", "wrong password").status_code in (401, 429)  # another address each
        r = login(server, "ann")
        assert r.status_code == 429 and "your address" in r.text  # all came from 127.0.0.1, whatever they claimed
    finally:
        server.stop()
        store.close()


def test_internal_errors_show_a_short_message_and_go_to_the_log(app, monkeypatch, caplog):
    server, _, _ = app

    def broken(*args, **kwargs):
        raise RuntimeError("disk /srv/secret/labels.db is on fire")

    monkeypatch.setattr("feedback_ui.tasks.serve", broken)
    ann = Client(server.url, auth=("ann", PASSWORD), verbose=False)
    with caplog.at_level("ERROR", logger="feedback_ui"), pytest.raises(Exception) as exc:
        ann.predict(api_name="/next_task")
    assert "Something went wrong on the server" in str(exc.value) and "/srv/secret" not in str(exc.value)
    assert "/srv/secret/labels.db is on fire" in caplog.text
    with http(server, headers={"Cookie": session_cookie(server)}) as c:
        assert c.get("config").json()["show_error"] is False


# headers


def test_every_response_carries_the_security_headers(app):
    server, _, _ = app
    with http(server) as anon, http(server, headers={"Cookie": session_cookie(server)}) as c:
        page = c.get("")
        assert page.status_code == 200
        asset = re.search(r'src="\./(assets/[^"]+\.js)"', page.text).group(1)
        responses = [page, c.get("config"), c.get("gradio_api/token"), c.get(asset), c.get("rlhf/shortcuts.js"),
                     anon.get(""), anon.get("login"), anon.get("config"), anon.post("login", data={"username": "x"}),
                     anon.get("config", headers={"Origin": EVIL})]  # fmt: skip
    for r in responses:
        h = r.headers
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff", r.url
        assert h["referrer-policy"] == "same-origin" and "frame-ancestors 'none'" in h["content-security-policy"]
        assert "strict-transport-security" not in h  # plain HTTP
    scripts = page.headers["content-security-policy"].split("script-src ")[1].split(";")[0]
    assert "unsafe-inline" not in scripts and "unsafe-eval" not in scripts
    inline = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", page.text, flags=re.S)
    assert inline and len(set(inline)) == scripts.count("'sha256-")  # each of Gradio's inline scripts, hashed
    login_policy = responses[6].headers["content-security-policy"]
    assert "default-src 'none'" in login_policy and "script-src" not in login_policy  # the login page runs no script


# HTTPS


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the ``openssl`` command."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return str(cert), str(key)


def test_https_serves_secure_cookies_and_hsts(tmp_path):
    cert, key = self_signed(tmp_path)
    store = make_project(str(tmp_path / "tls.db"), {"ann": "labeler"}, n_pairs=1)
    server = Server(store, ssl_certfile=cert, ssl_keyfile=key).start()
    try:
        assert server.url.startswith("https://")
        with httpx.Client(base_url=server.url, verify=cert, timeout=30) as c:
            r = c.post("login", data={"username": "ann", "password": PASSWORD})
            assert r.status_code == 200
            set_cookie = r.headers["set-cookie"]
            assert set_cookie.startswith("__Host-rlhf_session=")
            assert all(flag in set_cookie.lower() for flag in ("secure", "httponly", "samesite=strict", "path=/"))
            assert r.headers["strict-transport-security"].startswith("max-age=")
            assert c.get("config").status_code == 200  # the client keeps the cookie
        with pytest.raises(httpx.TransportError):  # no plain HTTP on that port
            httpx.get(server.url.replace("https", "http"), timeout=10)
    finally:
        server.stop()
        store.close()


# serving


def test_the_server_runs_on_uvloop_and_httptools(app):
    """The C event loop and HTTP parser the project depends on are the ones uvicorn picked."""
    config = app[0].server.config
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    assert config.get_loop_factory().__module__.split(".")[0] == "uvloop"
