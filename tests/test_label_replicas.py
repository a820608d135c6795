"""Two replicas of the labeling app (two ports, two stores) on one PostgreSQL database.

A login made on replica A works on replica B (sessions live in the database), and labelers whose
requests are spread over both replicas (two "tabs" per labeler, one on each) never hold two open
assignments, never get a comparison twice, and every acknowledged vote is stored exactly once.
"""

import collections
import threading

import httpx
import pytest
import sqlalchemy as sa
from gradio_client import Client
from test_feedback_store import run_in_threads

from feedback_ui.server import Server
from feedback_ui.store import Assignment, Comparison, Vote, open_store
from feedback_ui.testing import PASSWORD, make_project

LABELERS = [f"lab{i}" for i in range(6)]
N_PAIRS, OVERLAP = 24, 2


@pytest.fixture(scope="module")
def replicas(postgres_cluster):
    url = postgres_cluster.new_database()
    make_project(url, {**{n: "labeler" for n in LABELERS}, "root": "admin"}, n_pairs=N_PAIRS,
                 overlap=OVERLAP).close()  # fmt: skip
    stores = [open_store(url), open_store(url)]  # one store (engine, pool) per replica, as two processes have
    servers = [Server(store, concurrency=8).start() for store in stores]
    yield servers, stores[0]
    for server in servers:
        server.stop()
    for store in stores:
        store.close()
    postgres_cluster.drop_database(url)


def login(server, name) -> str:
    """``Cookie`` header of a fresh login on ``server``."""
    r = httpx.post(f"{server.url}login", data={"username": name, "password": PASSWORD}, timeout=30)
    assert r.status_code == 200 and r.cookies, r.text
    return "; ".join(f"{k}={v}" for k, v in r.cookies.items())


def client(server, cookie) -> Client:
    return Client(server.url, headers={"Cookie": cookie}, verbose=False, download_files=False)


def test_a_login_on_one_replica_works_on_the_other(replicas):
    (a, b), _ = replicas
    cookie = login(a, "root")
    for server in (a, b):
        assert httpx.get(f"{server.url}config", headers={"Cookie": cookie}, timeout=30).status_code == 200
        assert httpx.get(f"{server.url}config", timeout=30).status_code == 401
    assert client(b, cookie).predict(api_name="/admin_stats")["counts"]["comparisons"] == N_PAIRS
    httpx.get(f"{a.url}logout", headers={"Cookie": cookie}, timeout=30)  # ends the session everywhere
    assert httpx.get(f"{b.url}config", headers={"Cookie": cookie}, timeout=30).status_code == 401


def test_labelers_spread_over_two_replicas_get_nothing_twice(replicas):
    servers, store = replicas
    acked = collections.Counter()  # assignment tokens answered 'saved'
    lock = threading.Lock()
    most_open = []

    def tab(name, server, cookie, first):
        """One browser tab of ``name`` on ``server``: vote on what it is given until nothing is left."""
        api = client(server, cookie)
        task = api.predict(api_name="/next_task")
        for step in range(N_PAIRS * 2):  # bounded: a labeler can vote on at most N_PAIRS items
            if not task["token"]:
                return
            choice = "A" if (step + first) % 3 else "tie"
            task_token = task["token"]
            task = api.predict(task_token, choice, "", "", "", api_name="/vote")
            if task["status"] == "saved":
                with lock:
                    acked[task_token] += 1
        raise AssertionError(f"{name} was still given work after {N_PAIRS * 2} votes")

    def watch(stop):
        """Sample the database while labelers work: nobody ever holds two open assignments."""
        while not stop.is_set():
            with store.read() as s:
                per_user = s.execute(sa.select(Assignment.user_id, sa.func.count())
                                     .where(Assignment.status == "open").group_by(Assignment.user_id)).all()
                most_open.append(max((n for _, n in per_user), default=0))
            stop.wait(0.05)

    workers = []
    for i, name in enumerate(LABELERS):
        cookie = login(servers[i % 2], name)  # logged in on one replica, its session used on both
        workers += [lambda n=name, s=server, c=cookie, f=j: tab(n, s, c, f) for j, server in enumerate(servers)]
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        run_in_threads(*workers, timeout=240)
    finally:
        stop.set()
        watcher.join(10)

    assert most_open and max(most_open) <= 1
    with store.read() as s:
        votes = s.execute(sa.select(Vote.idempotency_key, Vote.comparison_id, Vote.user_id)).all()
        per_pair = s.execute(
            sa.select(Assignment.comparison_id, Assignment.user_id, sa.func.count())
            .group_by(Assignment.comparison_id, Assignment.user_id)
        ).all()  # fmt: skip
        open_left = s.scalar(sa.select(sa.func.count()).select_from(Assignment).where(Assignment.status == "open"))
        n_active = s.scalars(sa.select(Comparison.n_active)).all()
    keys = [v.idempotency_key for v in votes]
    assert max(acked.values()) == 1, "a vote was acknowledged twice"
    assert len(keys) == len(set(keys)) == len(acked) and set(keys) == set(acked)  # every ack stored once
    assert len(votes) == N_PAIRS * OVERLAP  # the work is done, each comparison by OVERLAP labelers
    assert all(n == 1 for *_, n in per_pair)  # nobody got a comparison twice
    assert len({(v.comparison_id, v.user_id) for v in votes}) == len(votes)
    assert collections.Counter(v.comparison_id for v in votes) == {c: OVERLAP for c in {v.comparison_id for v in votes}}
    assert open_left == 0 and n_active == [OVERLAP] * N_PAIRS
