"""The admin view in a real headless Chromium: numbers shown on opening and refreshed on their own,
out-of-range labelers marked, no raw None, and disabling a labeler (with re-queue) from the view."""

import pytest
import sqlalchemy as sa
from playwright.sync_api import expect
from test_feedback_browser import login

from feedback_ui import tasks
from feedback_ui.server import Server
from feedback_ui.store import User, Vote
from feedback_ui.testing import make_project

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("admin") / "admin.db")
    store = make_project(db, {"ann": "labeler", "bob": "labeler", "cid": "labeler", "root": "admin"}, n_pairs=14,
                         overlap=2)  # fmt: skip
    for i in range(12):  # ann always picks A (a side bias); bob alternates
        view = tasks.serve(store, "ann", 0.0)
        tasks.answer(store, "ann", view["token"], 0.0, choice="A")
        view = tasks.serve(store, "bob", 0.0)
        tasks.answer(store, "bob", view["token"], 0.0, choice="AB"[i % 2])
    server = Server(store).start()
    yield server, store
    server.stop()


def text_of(page, selector):
    return page.locator(selector).inner_text()


def test_admin_view_shows_numbers_without_a_click_and_refreshes_itself(browser, app):
    server, store = app
    page = login(browser, server.url, "root")
    page.get_by_role("tab", name="Admin").click()
    page.wait_for_selector("#admin-summary >> text=comparisons complete")  # nothing pressed
    summary = text_of(page, "#admin-summary")
    assert "24 votes counted" in summary and "None" not in summary
    assert "⚠ ann: side bias: picked A in 100% of 12 decisive votes" in summary
    page.wait_for_selector("#admin-table >> text=ann")
    table = text_of(page, "#admin-table")
    assert "side bias" in table and "None" not in table
    assert "ann" in text_of(page, "#admin-pairs") and "bob" in text_of(page, "#admin-pairs")
    page.wait_for_selector("#admin-chart svg polyline", state="attached")  # votes over time
    assert "24 votes counted" in text_of(page, "#admin-chart")

    view = tasks.serve(store, "cid", 0.0)  # a vote from elsewhere shows up by itself
    tasks.answer(store, "cid", view["token"], 0.0, choice="tie")
    page.wait_for_selector("#admin-summary >> text=25 votes counted", timeout=25000)
    page.close()


def test_admin_disables_a_labeler_from_the_view(browser, app):
    server, store = app
    ann = login(browser, server.url, "ann")
    page = login(browser, server.url, "root")
    page.get_by_role("tab", name="Admin").click()
    page.wait_for_selector("#admin-summary >> text=comparisons complete")
    page.locator("#admin-who input").click()
    page.get_by_role("option", name="ann", exact=True).click()
    page.locator("#btn-disable").click()
    page.wait_for_selector("#admin-done >> text=disabled")
    assert "12 vote(s) voided" in text_of(page, "#admin-done")
    expect(page.locator("#admin-table")).to_contain_text("disabled")
    with store.read() as s:
        user = s.scalar(sa.select(User).where(User.name == "ann"))
        kept = s.scalars(sa.select(Vote).where(Vote.user_id == user.id)).all()
    assert user.disabled_at is not None and len(kept) == 12 and all(v.voided_at is not None for v in kept)
    assert "ann: side bias" not in text_of(page, "#admin-summary")  # her votes no longer count
    ann.reload()  # her session ended: back to the login form
    ann.wait_for_selector("#username")
    ann.close()
    page.close()
