"""Database, accounts, task assignment and voting of the labeling app."""

import random
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from feedback_ui import tasks
from feedback_ui.assign import lock_labeler, next_task, progress, skip_task
from feedback_ui.auth import add_user, check_login, hash_password, set_disabled, verify_password
from feedback_ui.requeue import disable_and_requeue
from feedback_ui.store import (Assignment, Comparison, Response, SchemaVersion, User, Vote, init_db, open_store,
                               utcnow)  # fmt: skip
from feedback_ui.testing import PASSWORD, make_project
from feedback_ui.voting import VoteError, record_vote
from rlhf.errors import UserError


def uid(store, name):
    with store.read() as s:
        return s.scalar(sa.select(User.id).where(User.name == name))


def count(store, model, *where):
    with store.read() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


def statements(store):
    """A list that collects the SQL statements ``store`` runs from now on (SQLite's own BEGIN left out)."""
    seen = []

    def keep(conn, cursor, statement, *rest):
        if not statement.startswith("BEGIN"):
            seen.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", keep)
    return seen


def run_in_threads(*targets, timeout=60.0):
    """Run each callable in its own thread; the first exception raised in any of them (a failed assertion
    too) is raised again here, in the test's thread, so it fails the test."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"a worker thread is still running after {timeout} s"


def label_all(store, user_id, *, gold_rate=0.0, rng=None, choice="A"):
    """Vote on everything the user is given; returns the comparison ids seen."""
    seen = []
    while True:
        with store.write() as s:
            a = next_task(s, user_id, gold_rate=gold_rate, rng=rng)
            if a is None:
                return seen
            seen.append(a.comparison_id)
            kind = s.get(Comparison, a.comparison_id).kind
            positions = list(range(len(a.order)))
            record_vote(s, user_id, a.token, **({"choice": choice} if kind == "pair" else {"positions": positions}))


# store


def test_init_is_idempotent(db_url):
    init_db(db_url)
    store = init_db(db_url)
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(SchemaVersion)) == 1
    assert open_store(db_url).url == store.url


@pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)
def test_sqlite_uses_wal_and_takes_urls(db_url, tmp_path):
    store = init_db(db_url)
    with store.read() as s:
        assert s.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    assert open_store(f"sqlite:///{db_url}").url == store.url
    with pytest.raises(UserError, match="does not exist"):
        open_store(str(tmp_path / "no" / "such.db"))


def test_uninitialised_and_newer_schema_are_refused(new_db):
    with pytest.raises(UserError, match="not initialised"):
        open_store(new_db())
    db = new_db()
    store = init_db(db)
    with store.write() as s:
        s.add(SchemaVersion(version=99))
    with pytest.raises(UserError, match="schema version 99, newer"):
        open_store(db)
    with pytest.raises(UserError, match="newer"):
        init_db(db)


# accounts


def test_password_hashing():
    h1, h2 = hash_password("secret pass", n=2**10), hash_password("secret pass", n=2**10)
    assert h1.startswith("scrypt$1024$8$1$") and h1 != h2  # salted
    assert verify_password("secret pass", h1) and not verify_password("secret pasS", h1)
    assert not verify_password("x", "garbage") and not verify_password("x", "md5$1$1$1$00$00")


def test_users_and_login(db_url):
    store = make_project(db_url, {"ann": "labeler", "root": "admin"}, n_pairs=0)
    assert check_login(store, "ann", PASSWORD)
    assert not check_login(store, "ann", "wrong password")
    assert not check_login(store, "nobody", PASSWORD)
    with pytest.raises(UserError, match="already exists"):
        add_user(store, "ann", PASSWORD)
    with pytest.raises(UserError, match="invalid role"):
        add_user(store, "cy", PASSWORD, "boss")
    with pytest.raises(UserError, match="invalid user name"):
        add_user(store, "<b>", PASSWORD)
    with pytest.raises(UserError, match="at least 8"):
        add_user(store, "cy", "short")
    with store.read() as s:
        stored = s.scalar(sa.select(User.password_hash).where(User.name == "ann"))
    assert PASSWORD not in stored


# assignment


def test_overlap_is_exact_and_nobody_sees_a_comparison_twice(db_url):
    names = {f"u{i}": "labeler" for i in range(3)}
    store = make_project(db_url, names, n_pairs=4, overlap=2)
    seen = {n: label_all(store, uid(store, n)) for n in names}
    for n, ids in seen.items():
        assert len(ids) == len(set(ids)), f"{n} got a comparison twice"
    with store.read() as s:
        per_comparison = s.execute(sa.select(Vote.comparison_id, sa.func.count()).group_by(Vote.comparison_id)).all()
        assert sorted(n for _, n in per_comparison) == [2, 2, 2, 2]
        assert all(c.n_active == 2 for c in s.scalars(sa.select(Comparison)))
    assert progress_of(store, "u0") == (len(seen["u0"]), len(seen["u0"]))


def progress_of(store, name):
    with store.read() as s:
        return progress(s, uid(store, name))


def test_concurrent_labelers_never_overfill(db_url):
    names = {f"u{i}": "labeler" for i in range(8)}
    store = make_project(db_url, names, n_pairs=12, overlap=3)
    run_in_threads(*(lambda n=n: label_all(store, uid(store, n)) for n in names))
    with store.read() as s:
        counts = [n for _, n in s.execute(sa.select(Vote.comparison_id, sa.func.count()).group_by(Vote.comparison_id))]
    assert counts == [3] * 12


def test_two_tabs_of_one_labeler_get_the_same_open_task(db_url):
    """Two requests of one labeler at once (two browser tabs): the second waits for the first one's
    transaction and is served the same task, never a second open assignment."""
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=4)
    ann = uid(store, "ann")
    assigned, release = threading.Event(), threading.Event()
    tokens = {}

    def first_tab():
        with store.write() as s:
            tokens["first"] = next_task(s, ann).token
            assigned.set()
            assert release.wait(30)  # not committed yet while the second tab asks

    def second_tab():
        assert assigned.wait(30)
        with store.write() as s:
            tokens["second"] = next_task(s, ann).token

    def let_the_first_commit():
        assert assigned.wait(30)
        time.sleep(0.5)  # the second tab is inside next_task (or waiting to get there) by now
        release.set()

    run_in_threads(first_tab, second_tab, let_the_first_commit)
    assert tokens["second"] == tokens["first"]
    assert count(store, Assignment, Assignment.user_id == ann, Assignment.status == "open") == 1
    assert count(store, Assignment) == 1


def test_gold_items_are_mixed_in_at_the_rate_and_never_repeated(db_url, new_db):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=60, n_gold=40)
    seen = label_all(store, uid(store, "ann"), gold_rate=0.25, rng=random.Random(0))
    with store.read() as s:
        gold_ids = set(s.scalars(sa.select(Comparison.id).where(Comparison.is_gold)))
    gold_seen = [c for c in seen if c in gold_ids]
    assert len(seen) == len(set(seen))
    assert len(seen) - len(gold_seen) == 60  # all regular work done
    # Bernoulli(0.25) per task while regular work remains: ~20 gold among ~80 tasks
    assert 8 <= len(gold_seen) <= 32
    # no gold after the regular work ran out, none at rate 0
    assert seen[-1] not in gold_ids
    store2 = make_project(new_db(), {"ann": "labeler"}, n_pairs=5, n_gold=5)
    seen2 = label_all(store2, uid(store2, "ann"), gold_rate=0.0)
    with store2.read() as s:
        assert len(seen2) == 5 and not set(seen2) & set(s.scalars(sa.select(Comparison.id).where(Comparison.is_gold)))


def test_the_total_shown_stays_the_same_when_a_gold_item_is_served(db_url):
    """The counter ("12 of 40 done") must not tell hidden gold items from regular ones."""
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=12, n_gold=6)
    ann, rng, shown = uid(store, "ann"), random.Random(0), []
    while True:
        with store.write() as s:
            a = next_task(s, ann, gold_rate=0.4, rng=rng)
            if a is None:
                break
            shown.append((a.is_gold, progress(s, ann)))
            record_vote(s, ann, a.token, choice="A")
    assert sum(gold for gold, _ in shown) >= 2 and len(shown) > 12
    assert {total for _, (_, total) in shown} == {12}
    assert [done for gold, (done, _) in shown if not gold] == list(range(12))  # regular work only
    assert progress_of(store, "ann") == (12, 12)


def test_open_task_is_served_again_and_skip_frees_the_slot(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=1, overlap=1)
    ann, bob = uid(store, "ann"), uid(store, "bob")
    with store.write() as s:
        first = next_task(s, ann)
        again = next_task(s, ann)
        assert again.token == first.token
        assert next_task(s, bob) is None  # the only slot is taken
        assert skip_task(s, ann, first.token)
        assert not skip_task(s, ann, first.token)
        assert next_task(s, ann) is None  # skipped: never again for ann
        assert next_task(s, bob) is not None  # the slot went back to the pool


def test_a_flush_keeps_the_labeler_lock_and_a_skip_takes_one_comparison_row_per_transaction(db_url):
    """The lock order allows one comparison row per transaction: a skip gives its slot back, then the next task
    takes another comparison in a transaction of its own."""
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=3, overlap=1)
    ann = uid(store, "ann")
    with store.write() as s:
        lock_labeler(s, ann)
        sql = statements(store)
        assert next_task(s, ann) is not None  # inserts and flushes the assignment
        assert sql and lock_labeler(s, ann) is False
        assert not any(q.lstrip().startswith("SELECT users.disabled_at") for q in sql)  # no second lock
    per_transaction = [[]]
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: per_transaction[-1].append(args[2]))
    sa.event.listen(store.engine, "commit", lambda conn: per_transaction.append([]))
    first = tasks.serve(store, "ann", 0.0)
    per_transaction[:] = [[]]
    view = tasks.skip(store, "ann", first["token"], 0.0)
    assert view["status"] == "skipped" and view["token"] and view["token"] != first["token"]
    updates = [sum(q.startswith("UPDATE comparisons") for q in t) for t in per_transaction]
    assert sum(updates) == 2 and max(updates) == 1  # the slot given back, then one taken, in two transactions


def test_the_labeler_lock_is_read_once_per_transaction(db_url):
    """A vote and its next task lock the labeler's row once; what was read under the lock is forgotten at commit."""
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=1)
    ann = uid(store, "ann")
    with store.write() as s:
        assert lock_labeler(s, ann) is False
        sql = statements(store)
        assert lock_labeler(s, ann) is False  # the row is still held: no second statement
        assert sql == []
        s.execute(sa.update(User).where(User.id == ann).values(disabled_at=utcnow()))
        s.commit()  # the lock is released here
        assert lock_labeler(s, ann) is True  # read again under a new lock
        assert sum(q.lstrip().startswith("SELECT users.disabled_at") for q in sql) == 1


def test_sides_are_randomised_and_recorded(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=40)
    label_all(store, uid(store, "ann"), rng=random.Random(1))
    with store.read() as s:
        orders = [(a.order, c.response_ids) for a, c in s.execute(sa.select(Assignment, Comparison).join(Comparison))]
    swapped = sum(order != ids for order, ids in orders)
    assert 5 <= swapped <= 35


# voting


def test_same_submission_twice_is_stored_once(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=3)
    first = tasks.serve(store, "ann", 0.0)
    after = tasks.answer(store, "ann", first["token"], 0.0, choice="A", strength="much better")
    again = tasks.answer(store, "ann", first["token"], 0.0, choice="A", strength="much better")
    assert after["status"] == "saved" and again["status"] == "already recorded"
    assert again["token"] == after["token"] and (again["done"], again["total"]) == (1, 3)
    assert count(store, Vote) == 1
    with store.read() as s:
        vote = s.scalar(sa.select(Vote))
        assert (vote.idempotency_key, vote.strength, vote.picked_position) == (first["token"], "much", 0)
        # the database itself refuses a second row with the same key
        s.add(Vote(assignment_id=vote.assignment_id + 1, comparison_id=vote.comparison_id, user_id=vote.user_id,
                   idempotency_key=vote.idempotency_key, outcome="tie", ranking=[], seconds=0.0))  # fmt: skip
        with pytest.raises(IntegrityError):
            s.flush()


def test_a_vote_on_a_task_closed_in_another_tab_is_not_saved_and_says_why(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=3)
    first = tasks.serve(store, "ann", 0.0)  # shown in two tabs
    second = tasks.skip(store, "ann", first["token"], 0.0)  # tab 2 skips it
    late = tasks.answer(store, "ann", first["token"], 0.0, choice="A")  # tab 1 votes on it
    assert late["status"].startswith("not saved:") and "skipped" in late["status"] and "\n" not in late["status"]
    assert late["token"] == second["token"] and count(store, Vote) == 0
    with store.read() as s:
        assert s.scalar(sa.select(Assignment.status).where(Assignment.token == first["token"])) == "skipped"
    # re-queued by an admin while shown (the account disabled and enabled again meanwhile)
    disable_and_requeue(store, "ann")
    set_disabled(store, "ann", disabled=False)
    requeued = tasks.answer(store, "ann", second["token"], 0.0, choice="B")
    assert requeued["status"].startswith("not saved:") and "back in the pool" in requeued["status"]
    assert count(store, Vote) == 0
    # a task answered already is what "already recorded" means
    done = tasks.answer(store, "ann", requeued["token"], 0.0, choice="A")
    again = tasks.answer(store, "ann", requeued["token"], 0.0, choice="A")
    assert (done["status"], again["status"]) == ("saved", "already recorded") and count(store, Vote) == 1


def test_votes_belong_to_their_labeler(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler"}, n_pairs=3)
    ann_task = tasks.serve(store, "ann", 0.0)
    with pytest.raises(VoteError, match="unknown task"):
        tasks.answer(store, "bob", ann_task["token"], 0.0, choice="A")
    with pytest.raises(tasks.NotAllowed):
        tasks.serve(store, "mallory", 0.0)
    with pytest.raises(tasks.NotAllowed, match="admins only"):
        tasks.current_user(store, "ann", role="admin")
    assert count(store, Vote) == 0
    tasks.answer(store, "ann", ann_task["token"], 0.0, choice="B")
    assert [row[2] for row in tasks.history(store, "ann")] == ["B is better"]
    assert tasks.history(store, "bob") == []


def test_vote_validation_and_edit(db_url):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=2, n_rank=1, k_rank=3)
    view = tasks.serve(store, "ann", 0.0)
    bad_answers = [
        ({"choice": "C"}, "choice must be"),
        ({"choice": "tie", "strength": "much"}, "strength"),
        ({"choice": "A", "strength": "huge"}, "strength must"),
        ({"positions": [0, 1]}, "needs a choice"),
        ({"choice": "both_bad", "edit": "better"}, "edit improves"),
        ({"choice": "A", "rationale": "see\x00this"}, "NUL character"),  # PostgreSQL cannot store it: refused on both
        ({"choice": "A", "edit": "a better\x00answer"}, "NUL character"),
    ]
    for bad, match in bad_answers:
        with pytest.raises(VoteError, match=match):
            tasks.answer(store, "ann", view["token"], 0.0, **bad)
    with pytest.raises(VoteError, match="unknown task"):  # a token with NUL: unknown on either database
        tasks.answer(store, "ann", view["token"] + "\x00", 0.0, choice="A")
    assert tasks.skip(store, "ann", view["token"] + "\x00", 0.0)["status"] == "nothing to skip"
    nxt = tasks.answer(store, "ann", view["token"], 0.0, choice="B", edit="  a much better answer  ", rationale="why")
    with store.read() as s:
        vote = s.scalar(sa.select(Vote))
        edited = s.get(Response, vote.edited_response_id)
        assert (edited.text, edited.source, edited.parent_id) == ("a much better answer", "edit", vote.ranking[0])
        assert vote.rationale == "why" and vote.seconds >= 0
    nxt = tasks.answer(store, "ann", nxt["token"], 0.0, choice="tie")
    assert nxt["kind"] == "rank" and len(nxt["responses"]) == 3
    with pytest.raises(VoteError, match="order all 3"):
        tasks.answer(store, "ann", nxt["token"], 0.0, positions=[0, 0, 1])
    done = tasks.answer(store, "ann", nxt["token"], 0.0, positions=[2, 0, 1])
    assert done["token"] == "" and (done["done"], done["total"]) == (3, 3)
    with store.read() as s:
        vote, a = s.execute(sa.select(Vote, Assignment).join(Assignment).order_by(Vote.id.desc())).first()
        assert vote.ranking == [a.order[2], a.order[0], a.order[1]] and vote.picked_position == 2
