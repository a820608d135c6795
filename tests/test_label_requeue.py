"""Disabling a labeler and re-queuing their work, on SQLite and PostgreSQL: their votes are kept but
marked and count nowhere, their comparisons return to the pool, and others complete them."""

import pytest
import sqlalchemy as sa

from feedback_ui import tasks
from feedback_ui.auth import get_user
from feedback_ui.export import load_judgements
from feedback_ui.requeue import disable_and_requeue
from feedback_ui.sessions import SessionPolicy, session_user, start_session
from feedback_ui.stats import collect_stats
from feedback_ui.store import Assignment, Comparison, Vote
from feedback_ui.testing import make_project


def vote_all(store, name, limit=None, gold_rate=0.0):
    view, n = tasks.serve(store, name, gold_rate), 0
    while view["token"] and (limit is None or n < limit):
        view, n = tasks.answer(store, name, view["token"], gold_rate, choice="A"), n + 1
    return n


def slots_match_assignments(store):
    """n_active = open + done assignments, for every regular comparison."""
    with store.read() as s:
        live = dict(s.execute(
            sa.select(Assignment.comparison_id, sa.func.count())
            .where(Assignment.status.in_(("open", "done")), ~Assignment.is_gold).group_by(Assignment.comparison_id)
        ).all())  # fmt: skip
        return all(c.n_active == live.get(c.id, 0) for c in s.scalars(sa.select(Comparison).where(~Comparison.is_gold)))


def test_disable_and_requeue(db_url):
    users = {"ann": "labeler", "bob": "labeler", "cid": "labeler", "dan": "labeler"}
    store = make_project(db_url, users, n_pairs=4, overlap=2, n_gold=2)
    policy = SessionPolicy()
    token = start_session(store, get_user(store, "ann").id, policy)
    gold = tasks.serve(store, "ann", 1.0)  # a gold item first
    tasks.answer(store, "ann", gold["token"], 0.0, choice="B")
    assert vote_all(store, "ann", limit=2) == 2  # two regular votes; a third task is left open
    assert vote_all(store, "bob") == 4
    with store.read() as s:
        ann_id = get_user(store, "ann").id
        ann_comparisons = set(s.scalars(sa.select(Assignment.comparison_id).where(
            Assignment.user_id == ann_id, ~Assignment.is_gold)))  # fmt: skip
    assert len(ann_comparisons) == 3 and collect_stats(store)["counts"]["votes"] == 7

    done = disable_and_requeue(store, "ann")
    assert done == {"sessions_ended": 1, "votes_voided": 3, "comparisons_requeued": 3}
    assert session_user(store, token, policy) is None
    with pytest.raises(tasks.NotAllowed, match="disabled"):
        tasks.serve(store, "ann", 0.0)
    with store.read() as s:  # kept, marked
        kept = s.scalars(sa.select(Vote).where(Vote.user_id == ann_id)).all()
        statuses = set(s.scalars(sa.select(Assignment.status).where(Assignment.user_id == ann_id)))
    assert len(kept) == 3 and all(v.voided_at is not None for v in kept) and statuses == {"requeued"}
    assert slots_match_assignments(store)
    stats = collect_stats(store)
    assert stats["counts"]["votes"] == 4 and stats["counts"]["voided"] == 3
    assert stats["counts"]["comparisons_complete"] == 0
    ann = next(u for u in stats["labelers"] if u["name"] == "ann")
    assert ann["disabled"] and ann["done"] == 0 and ann["voided"] == 3 and ann["gold_items"] == 0
    assert all(j.annotator != "ann" for item in load_judgements(store).values() for j in item["judgements"])

    # the freed slots go to others, and the project completes without ann
    assert vote_all(store, "cid") == 4
    assert slots_match_assignments(store)
    with store.read() as s:
        counted = dict(s.execute(sa.select(Vote.comparison_id, sa.func.count()).join(Comparison)
                                 .where(Vote.counted(), ~Comparison.is_gold).group_by(Vote.comparison_id)).all())  # fmt: skip
    assert sorted(counted.values()) == [2, 2, 2, 2]
    assert collect_stats(store)["counts"]["comparisons_complete"] == 4
    assert disable_and_requeue(store, "ann") == {"sessions_ended": 0, "votes_voided": 0, "comparisons_requeued": 0}
    store.close()


def test_requeue_of_an_unknown_user_is_a_clear_error(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=1)
    with pytest.raises(Exception, match="no user named 'nobody'"):
        disable_and_requeue(store, "nobody")
    store.close()


def test_user_disable_requeue_command(db_url, capsys):
    from rlhf.cli import main

    store = make_project(db_url, {"ann": "labeler"}, n_pairs=2)
    assert vote_all(store, "ann", limit=1) == 1
    assert main(["label", "user", "disable", "ann", "--requeue", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "user ann disabled" in out and "1 votes voided" in out and "2 comparisons back in the pool" in out
    assert collect_stats(store)["counts"]["votes"] == 0 and slots_match_assignments(store)
    store.close()


def test_a_request_waiting_on_the_labeler_lock_gets_nothing_once_disabled(db_url):
    """On PostgreSQL a request can check the account just before an admin disables it, then wait on the
    labeler's row; under the lock it sees the account disabled and is given no new task."""
    import threading
    import time

    from feedback_ui.assign import lock_labeler
    from feedback_ui.auth import disable_in
    from test_feedback_store import run_in_threads

    store = make_project(db_url, {"ann": "labeler"}, n_pairs=3)
    holding, replies = threading.Event(), []

    def admin():
        with store.write() as s:
            user, _ = disable_in(s, "ann")
            lock_labeler(s, user.id)
            holding.set()
            time.sleep(0.5)  # the labeler's request reaches the lock meanwhile

    def labeler():
        holding.wait(10)
        try:
            replies.append(tasks.serve(store, "ann", 0.0)["token"])
        except tasks.NotAllowed:  # SQLite: the whole request waits for the admin's transaction
            replies.append("refused")

    run_in_threads(admin, labeler)
    assert replies in (["refused"], [""])
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Assignment)) == 0
    store.close()
