"""Abandoned assignments expire (``assignment_ttl``) and integrity errors are told apart, on SQLite and on a
throwaway PostgreSQL cluster (``db_url`` runs each test on both; see conftest.py)."""

import random
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from test_feedback_store import count, run_in_threads, statements, uid

from feedback_ui import tasks
from feedback_ui.assign import DEFAULT_ASSIGNMENT_TTL, expire_abandoned, next_task, oldest_open_shown
from feedback_ui.db_errors import integrity_violation
from feedback_ui.store import Assignment, Comparison, Response, Vote, utcnow
from feedback_ui.testing import make_project
from feedback_ui.voting import EXPIRED_MESSAGE

TTL = timedelta(minutes=30)


# helper functions


def age(store, name, minutes):
    """Make the user's open assignments look last shown ``minutes`` ago.

    The app only ever writes the present into ``shown_at`` and the process remembers, from it, when the next
    assignment can fall due; a write into the past is none of the app's, so that memory is dropped with it."""
    user_id = uid(store, name)
    with store.write() as s:
        s.execute(sa.update(Assignment).where(Assignment.user_id == user_id, Assignment.status == "open")
                  .values(shown_at=utcnow() - timedelta(minutes=minutes)))  # fmt: skip
    store.memo.clear()



def statuses(store, name):
    with store.read() as s:
        return s.scalars(sa.select(Assignment.status).where(Assignment.user_id == uid(store, name))
                         .order_by(Assignment.id)).all()  # fmt: skip


def slots_match_assignments(store):
    """Each regular comparison's n_active equals its open + done assignments."""
    with store.read() as s:
        held = dict(s.execute(sa.select(Assignment.comparison_id, sa.func.count())
                              .where(Assignment.status.in_(["open", "done"]), ~Assignment.is_gold)
                              .group_by(Assignment.comparison_id)).all())  # fmt: skip
        return {c.id: c.n_active for c in s.scalars(sa.select(Comparison).where(~Comparison.is_gold))} == {
            cid: held.get(cid, 0) for cid in s.scalars(sa.select(Comparison.id).where(~Comparison.is_gold))
        }


# expiry


def test_an_abandoned_assignment_returns_its_slot_and_a_late_vote_is_refused(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=1, overlap=1)
    first = tasks.serve(store, "ann", 0.0, assignment_ttl=TTL)
    assert first["token"] and not tasks.serve(store, "bob", 0.0, assignment_ttl=TTL)["token"]  # the slot is taken
    age(store, "ann", 29)
    assert not tasks.serve(store, "bob", 0.0, assignment_ttl=TTL)["token"]  # not yet abandoned
    age(store, "ann", 31)
    bobs = tasks.serve(store, "bob", 0.0, assignment_ttl=TTL)
    assert bobs["token"] and bobs["prompt"] == first["prompt"]  # the slot went back to the pool
    assert statuses(store, "ann") == ["expired"]
    late = tasks.answer(store, "ann", first["token"], 0.0, choice="A", assignment_ttl=TTL)
    assert late["status"] == EXPIRED_MESSAGE and "not saved" in late["status"] and not late["token"]
    assert count(store, Vote) == 0 and statuses(store, "ann") == ["expired"]
    assert tasks.answer(store, "bob", bobs["token"], 0.0, choice="B", assignment_ttl=TTL)["status"] == "saved"
    assert count(store, Vote) == 1 and slots_match_assignments(store)


def test_a_late_vote_counts_once_while_the_comparison_still_needs_it(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=1, overlap=1)
    first = tasks.serve(store, "ann", 0.0)
    age(store, "ann", 45)
    assert tasks.expire(store, TTL) == 1 and tasks.expire(store, TTL) == 0
    with store.read() as s:
        assert s.scalar(sa.select(Comparison.n_active)) == 0
    late = tasks.answer(store, "ann", first["token"], 0.0, choice="B", assignment_ttl=TTL)
    assert late["status"] == "saved"
    again = tasks.answer(store, "ann", first["token"], 0.0, choice="B", assignment_ttl=TTL)
    assert again["status"] == "already recorded"
    assert count(store, Vote) == 1 and statuses(store, "ann") == ["done"]
    assert not tasks.serve(store, "bob", 0.0, assignment_ttl=TTL)["token"]  # the slot is taken again
    assert slots_match_assignments(store)


def test_the_clock_alone_expires_a_task_and_no_read_comes_before_one_can_be_due(db_url, monkeypatch):
    """No write into the past here: the app's own clock moves on, as it does for an abandoned browser tab."""
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=1, overlap=1)
    start = utcnow()
    first = tasks.serve(store, "ann", 0.0, assignment_ttl=TTL)
    sql = statements(store)
    assert tasks.expire(store, TTL) == 0 and sql == []  # ann's task was shown just now: nothing to read yet
    monkeypatch.setattr(tasks, "utcnow", lambda: start + timedelta(minutes=29))
    assert tasks.expire(store, TTL) == 0 and sql == []
    assert not tasks.serve(store, "bob", 0.0, assignment_ttl=TTL)["token"]  # the slot is still ann's
    monkeypatch.setattr(tasks, "utcnow", lambda: start + timedelta(minutes=31))
    bobs = tasks.serve(store, "bob", 0.0, assignment_ttl=TTL)
    assert bobs["prompt"] == first["prompt"] and statuses(store, "ann") == ["expired"]
    monkeypatch.undo()  # back to the real clock, in which bob's task was shown just now
    with store.read() as s:
        assert oldest_open_shown(s) >= start
    sql.clear()
    assert tasks.expire(store, TTL) == 0 and len(sql) == 1  # one read, then quiet until bob's task can be due
    assert tasks.expire(store, TTL) == 0 and len(sql) == 1


def test_serving_a_task_again_keeps_it_and_no_ttl_never_expires(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=1, overlap=1)
    first = tasks.serve(store, "ann", 0.0, assignment_ttl=TTL)
    age(store, "ann", 25)
    assert tasks.serve(store, "ann", 0.0, assignment_ttl=TTL)["token"] == first["token"]  # shown again: fresh
    age(store, "ann", 240)
    assert not tasks.serve(store, "bob", 0.0)["token"]  # without a ttl nothing expires
    assert not tasks.skip(store, "bob", "no such token", 0.0)["token"]
    assert statuses(store, "ann") == ["open"]
    assert tasks.skip(store, "bob", "no such token", 0.0, assignment_ttl=TTL)["token"]  # any call sweeps
    assert statuses(store, "ann") == ["expired"] and DEFAULT_ASSIGNMENT_TTL == TTL


def test_expired_gold_items_take_late_votes_and_stay_out_of_the_slot_count(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=1, n_gold=1)
    with store.write() as s:
        gold = next_task(s, uid(store, "ann"), gold_rate=0.99, rng=random.Random(0))
        token, is_gold = gold.token, gold.is_gold
    assert is_gold
    age(store, "ann", 60)
    assert tasks.expire(store, TTL) == 1
    assert tasks.answer(store, "ann", token, 0.0, choice="A", assignment_ttl=TTL)["status"] == "saved"
    with store.read() as s:
        assert s.scalar(sa.select(Comparison.n_active).where(Comparison.is_gold)) == 0
    assert statuses(store, "ann") == ["done", "open"] and slots_match_assignments(store)  # then the regular pair


def test_sweeps_and_votes_at_once_keep_every_slot_count_exact(db_url):
    """Labelers vote late on abandoned tasks while others take their slots and sweep, all at once."""
    late, fresh = [f"late{i}" for i in range(4)], [f"new{i}" for i in range(4)]
    store = make_project(db_url, {n: "labeler" for n in late + fresh}, n_pairs=8, overlap=1)
    tokens = {n: tasks.serve(store, n, 0.0)["token"] for n in late}
    for n in late:
        age(store, n, 90)
    with store.read() as s:
        assert oldest_open_shown(s) < utcnow() - TTL

    def label(name, view=None):
        view = view or tasks.serve(store, name, 0.0, assignment_ttl=TTL)
        while view["token"]:
            view = tasks.answer(store, name, view["token"], 0.0, choice="B", assignment_ttl=TTL)

    def vote_late(name):
        reply = tasks.answer(store, name, tokens[name], 0.0, choice="A", assignment_ttl=TTL)
        assert reply["status"] in ("saved", EXPIRED_MESSAGE)
        label(name, reply)

    def sweep():
        for _ in range(5):
            with store.write() as s:
                expire_abandoned(s, utcnow() - TTL)

    run_in_threads(*(lambda n=n: vote_late(n) for n in late), *(lambda n=n: label(n) for n in fresh), sweep, sweep)
    with store.read() as s:
        per = s.execute(sa.select(Vote.comparison_id, sa.func.count()).group_by(Vote.comparison_id)).all()
        assert sorted(n for _, n in per) == [1] * 8  # every comparison answered once: none twice, none lost
        assert s.scalar(sa.select(sa.func.count()).select_from(Assignment).where(Assignment.status == "open")) == 0
    assert slots_match_assignments(store)


# integrity errors


def test_integrity_errors_are_told_apart(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=1)
    view = tasks.serve(store, "ann", 0.0)
    tasks.answer(store, "ann", view["token"], 0.0, choice="A")

    def violation(*rows):
        with store.read() as s:
            s.add_all(rows)
            with pytest.raises(IntegrityError) as caught:
                s.flush()
            s.rollback()
        return integrity_violation(caught.value)

    with store.read() as s:
        v = s.scalar(sa.select(Vote))
        fields = {"assignment_id": v.assignment_id, "comparison_id": v.comparison_id, "user_id": v.user_id,
                  "outcome": "tie", "ranking": [], "seconds": 0.0}  # fmt: skip
    twice = violation(Vote(**{**fields, "assignment_id": v.assignment_id + 1}, idempotency_key=v.idempotency_key))
    assert (twice.kind, twice.table) == ("unique", "votes")
    gone = violation(Response(prompt_id=10**6, text="x", text_key="x", source="edit"))
    assert gone.kind == "foreign_key" and "foreign-key" in gone.describe()
    missing = violation(Vote(**{**fields, "outcome": None}, idempotency_key="k2"))
    assert missing.kind == "not_null"
    with store.write() as s:
        s.execute(sa.text("CREATE TABLE checked (x INTEGER CHECK (x > 0))"))
    with store.read() as s, pytest.raises(IntegrityError) as caught:
        s.execute(sa.text("INSERT INTO checked (x) VALUES (0)"))
    assert integrity_violation(caught.value).kind == "check"


def test_only_a_repeated_vote_is_reported_as_already_recorded(db_url, monkeypatch):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=3)
    view = tasks.serve(store, "ann", 0.0)
    with store.write() as s:  # another tab's identical submission is committing at this moment
        a = s.scalar(sa.select(Assignment).where(Assignment.token == view["token"]))
        s.add(Vote(assignment_id=a.id, comparison_id=a.comparison_id, user_id=a.user_id, outcome="tie",
                   idempotency_key=view["token"], ranking=a.order, seconds=1.0))  # fmt: skip
    assert tasks.answer(store, "ann", view["token"], 0.0, choice="A")["status"] == "already recorded"
    assert count(store, Vote) == 1
    with store.write() as s:  # the other tab's transaction ends
        s.execute(sa.update(Assignment).where(Assignment.token == view["token"]).values(status="done"))

    real = tasks.record_vote

    def refers_to_a_missing_row(s, *args, **kwargs):
        vote = real(s, *args, **kwargs)
        s.add(Response(prompt_id=10**6, text="orphan", text_key="orphan", source="edit"))  # e.g. a deleted prompt
        s.flush()
        return vote

    monkeypatch.setattr(tasks, "record_vote", refers_to_a_missing_row)
    now = tasks.serve(store, "ann", 0.0)
    with pytest.raises(tasks.Refused, match="foreign-key violation"):
        tasks.answer(store, "ann", now["token"], 0.0, choice="A")
    assert count(store, Vote) == 1  # nothing of the refused vote was kept
