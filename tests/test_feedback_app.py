"""The labeling app over HTTP: gradio_client with a login, and raw requests without one."""

import secrets

import httpx
import pytest
import sqlalchemy as sa
from gradio_client import Client

from feedback_ui.server import Server
from feedback_ui.store import User, Vote
from feedback_ui.testing import PASSWORD, make_project


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("app") / "app.db")
    store = make_project(db, {"ann": "labeler", "bob": "labeler", "root": "admin"}, n_pairs=6, n_rank=1, hostile=True)
    server = Server(store).start()
    yield server, store
    server.stop()


def client(server, name, password=PASSWORD):
    return Client(server.url, auth=(name, password), verbose=False, download_files=False)


def votes(store, name=None):
    with store.read() as s:
        q = sa.select(sa.func.count()).select_from(Vote)
        if name:
            q = q.join(User, User.id == Vote.user_id).where(User.name == name)
        return s.scalar(q)


def test_vote_through_the_api_is_stored_once(app):
    server, store = app
    ann = client(server, "ann")
    task = ann.predict(api_name="/next_task")
    assert task["kind"] == "pair" and len(task["responses"]) == 2 and task["done"] == 0
    before = votes(store, "ann")
    nxt = ann.predict(task["token"], "B", "slightly", "clearer", "", api_name="/vote")
    again = ann.predict(task["token"], "B", "slightly", "clearer", "", api_name="/vote")  # a retried submission
    assert nxt["status"] == "saved" and again["status"] == "already recorded" and again["token"] == nxt["token"]
    assert votes(store, "ann") == before + 1 and nxt["done"] == 1
    skipped = ann.predict(nxt["token"], api_name="/skip")
    assert skipped["status"] == "skipped" and skipped["token"] != nxt["token"]
    assert ann.predict(api_name="/history")[0][2] == "B is better"


def test_a_call_is_answered_on_its_own_request(app):
    """A logged-in POST to ``run/<endpoint>``, the route the page calls, answers and stores the vote once. (That
    the page uses this route and not the queue is the browser test's check: this route answers either way.)"""
    server, store = app
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("login", data={"username": "bob", "password": PASSWORD}).status_code == 200
        call = {"session_hash": secrets.token_hex(8)}
        task = http.post("gradio_api/run/next_task", json={**call, "data": []}).json()["data"][0]
        before = votes(store, "bob")
        answer = http.post("gradio_api/run/vote", json={**call, "data": [task["token"], "A", "", "", ""]})
        assert answer.status_code == 200 and answer.json()["data"][0]["status"] == "saved"
    assert votes(store, "bob") == before + 1


def test_each_labeler_has_their_own_queue(app):
    server, store = app
    ann, bob = client(server, "ann"), client(server, "bob")
    a_task, b_task = ann.predict(api_name="/next_task"), bob.predict(api_name="/next_task")
    assert a_task["token"] != b_task["token"]
    before = votes(store)
    with pytest.raises(Exception, match="unknown task"):
        bob.predict(a_task["token"], "A", api_name="/vote")
    assert votes(store) == before
    assert len(bob.predict(api_name="/history")) == votes(store, "bob")  # only bob's own votes
    assert ann.predict(api_name="/next_task")["token"] == a_task["token"]  # untouched by bob


def test_ranking_task_through_the_api(app):
    server, _ = app
    bob = client(server, "bob")
    task = bob.predict(api_name="/next_task")
    while task["kind"] != "rank":
        task = bob.predict(task["token"], "tie", api_name="/vote")
    with pytest.raises(Exception, match="order all 3"):
        bob.predict(task["token"], [0, 1], api_name="/rank")
    done = bob.predict(task["token"], [2, 1, 0], api_name="/rank")
    assert done["status"] == "saved"


def test_admin_view_is_for_admins_only(app):
    server, _ = app
    with pytest.raises(Exception, match="admins only"):
        client(server, "ann").predict(api_name="/admin_stats")
    stats = client(server, "root").predict(api_name="/admin_stats")
    assert {u["name"] for u in stats["labelers"]} == {"ann", "bob", "root"}


def test_wrong_password_is_refused(app):
    server, _ = app
    with pytest.raises(ValueError, match="login"):
        client(server, "ann", "wrong password")


ROUTES = [
    ("GET", "config"), ("GET", "gradio_api/info"), ("GET", "gradio_api/openapi.json"), ("GET", "gradio_api/app_id"),
    ("GET", "gradio_api/heartbeat/abc"), ("GET", "gradio_api/startup-events"), ("GET", "gradio_api/queue/data"),
    ("GET", "gradio_api/file=/etc/hostname"), ("GET", "gradio_api/user"), ("GET", "manifest.json"),
    ("POST", "gradio_api/queue/join"), ("POST", "gradio_api/call/vote"), ("POST", "gradio_api/call/next_task"),
    ("POST", "gradio_api/run/vote"), ("POST", "gradio_api/api/vote"), ("POST", "gradio_api/run/predict"),
    ("POST", "gradio_api/cancel"), ("POST", "gradio_api/reset"), ("POST", "gradio_api/upload"),
]  # fmt: skip


def session_cookies(server, name="ann"):
    """The cookies a real login sets: their names carry this server's own id, the value is the session token."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("login", data={"username": name, "password": PASSWORD}).status_code == 200
        return {c.name: c.value for c in http.cookies.jar}


@pytest.mark.parametrize("cookies", ["missing", "forged"])
def test_unauthenticated_requests_get_nothing_and_change_nothing(app, cookies):
    server, store = app
    real = session_cookies(server)
    with httpx.Client(base_url=server.url, cookies=real, timeout=10) as http:
        assert real and http.get("config").status_code == 200  # these names, with the real token, log in
    # the same cookie names with a token of the same shape that no login handed out
    sent = {} if cookies == "missing" else {name: secrets.token_urlsafe(16) for name in real}
    before = votes(store)
    with httpx.Client(base_url=server.url, cookies=sent, timeout=10) as http:
        token = "0" * 32
        body = {"data": [token, "A", "", "", ""], "fn_index": 0, "session_hash": "s", "event_id": "e"}
        for method, path in ROUTES:
            r = http.request(method, path, json=body if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code)
            assert "prompt" not in r.text and "answer" not in r.text
        page = http.get("")
        assert page.status_code == 200 and "pair prompt" not in page.text and "answer 1." not in page.text
        assert 'name="password"' in page.text  # the login form
    assert votes(store) == before


def test_login_form_opens_the_routes(app):
    server, _ = app
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("login", data={"username": "ann", "password": "nope"}).status_code == 401
        assert http.post("login", data={"username": "ann", "password": PASSWORD}).status_code == 200
        assert http.get("config").status_code == 200
        assert "next_task" in http.get("gradio_api/info").text


def test_gold_items_and_rate_stored_while_the_app_runs_are_served_without_a_restart(tmp_path):
    """`rlhf label candidates --gold_file F --gold_rate R` on a database an app already serves: the app reads the
    stored rate whenever it draws a task (it used to keep the rate it read at start, 0 here, until restarted)."""
    from feedback_ui.candidates import import_gold
    from feedback_ui.store import set_setting
    from rlhf.testing import write_jsonl

    store = make_project(str(tmp_path / "app.db"), {"ann": "labeler"}, n_pairs=8)
    server = Server(store).start()
    try:
        ann = client(server, "ann")
        first = ann.predict(api_name="/next_task")
        assert first["prompt"].startswith("pair prompt")  # (no gold item exists yet)
        gold = [{"prompt": f"gold question {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(5)]
        assert import_gold(store, str(write_jsonl(tmp_path / "gold.jsonl", gold))) == 5
        with store.write() as s:
            set_setting(s, "gold_rate", 0.99)
        task, prompts = first, []
        for _ in range(4):
            task = ann.predict(task["token"], "A", "", "", "", api_name="/vote")
            prompts.append(task["prompt"])
        assert sum(p.startswith("gold question") for p in prompts) >= 3, prompts
    finally:
        server.stop()
        store.close()
