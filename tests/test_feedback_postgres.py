"""The labeling store on PostgreSQL (runs when RLHF_TEST_POSTGRES_URL points at a scratch database)."""

import os
import threading

import pytest
import sqlalchemy as sa

from feedback_ui import tasks
from feedback_ui.export import export_preferences
from feedback_ui.stats import collect_stats
from feedback_ui.store import Base, Comparison, Store, Vote, open_store
from feedback_ui.testing import make_project

URL = os.environ.get("RLHF_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set RLHF_TEST_POSTGRES_URL=postgresql://... to test PostgreSQL")


@pytest.fixture
def pg_url():
    pytest.importorskip("psycopg")
    store = Store(URL)
    Base.metadata.drop_all(store.engine)
    store.close()
    return URL


def test_concurrent_votes_idempotency_and_export_on_postgres(pg_url, tmp_path):
    names = {f"u{i}": "labeler" for i in range(6)}
    store = make_project(pg_url, names, n_pairs=10, overlap=3)
    assert open_store(pg_url).url.startswith("postgresql")

    def work(name):
        view = tasks.serve(store, name, 0.0)
        while view["token"]:
            tasks.answer(store, name, view["token"], 0.0, choice="A")
            again = tasks.answer(store, name, view["token"], 0.0, choice="A")  # duplicate submission
            assert again["status"] == "already recorded"
            view = again

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with store.read() as s:
        per = s.execute(sa.select(Vote.comparison_id, sa.func.count()).group_by(Vote.comparison_id)).all()
        assert sorted(n for _, n in per) == [3] * 10
        assert all(c.n_active == 3 for c in s.scalars(sa.select(Comparison)))
    assert export_preferences(store, str(tmp_path / "p.jsonl"), aggregation="all")["rows"] == 30
    assert collect_stats(store)["agreement"]["overlapping_items"] == 10
