"""The labeling app in a real headless Chromium: login, mouse and keyboard votes, escaping."""

import pytest
import sqlalchemy as sa

from feedback_ui.server import Server
from feedback_ui.store import Assignment, User, Vote
from feedback_ui.testing import HOSTILE, PASSWORD, make_project

pytestmark = pytest.mark.browser



@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("browser") / "ui.db")
    store = make_project(db, {"ann": "labeler", "root": "admin"}, n_pairs=4, n_rank=1, hostile=True)
    server = Server(store).start()
    yield server, store
    server.stop()


def login(browser, url, name):
    page = browser.new_page()
    page.set_default_timeout(15000)
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#btn-skip")
    return page


def wait_done(page, n, total):
    page.wait_for_function(
        "t => document.querySelector('#progress') && document.querySelector('#progress').innerText.includes(t)",
        arg=f"{n} of {total} done",
    )


def ann_votes(store):
    with store.read() as s:
        return s.execute(
            sa.select(Vote, Assignment).join(Assignment).join(User, User.id == Vote.user_id)
            .where(User.name == "ann").order_by(Vote.id)
        ).all()  # fmt: skip


def test_label_with_mouse_and_keyboard(browser, app):
    server, store = app
    page = login(browser, server.url, "ann")
    sent = []
    page.on("request", lambda r: sent.append(r.url))
    wait_done(page, 0, 5)
    # hostile prompt and responses are shown as text and run nothing
    shown = [page.locator(f"#{i} textarea").input_value() for i in ("resp-a", "resp-b")]
    assert sorted(shown) == sorted(HOSTILE)
    assert "<script>window.__pwned=2</script>" in page.locator("#prompt textarea").input_value()
    assert page.locator("#resp-a textarea").is_visible()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img[src='x']").count() == 0 and page.locator("#prompt b").count() == 0
    for role_less in ("A is better", "B is better", "Tie", "Both bad"):
        assert page.get_by_role("button", name=role_less, exact=True).is_visible()
    assert not page.get_by_role("tab", name="Admin").is_visible()

    page.get_by_role("button", name="A is better", exact=True).click()  # mouse
    wait_done(page, 1, 5)
    page.locator("#rationale textarea").click()
    page.keyboard.type("3")  # typing in a text field is not a shortcut
    page.wait_for_timeout(400)
    assert len(ann_votes(store)) == 1
    page.get_by_label("much better").check()
    page.locator("#progress").click()  # leave the text field
    page.keyboard.press("2")  # B is better
    wait_done(page, 2, 5)
    page.keyboard.press("3")  # tie
    wait_done(page, 3, 5)
    page.keyboard.press("s")  # skip
    page.wait_for_selector("#btn-rank", state="visible")
    # ranking task: slot 1 best, then slot 2, then slot 0
    for slot, rank in ((0, "3"), (1, "1"), (2, "2")):
        page.locator(f"#rank-{slot}").get_by_label(rank, exact=True).check()
    page.locator("#btn-rank").click()
    wait_done(page, 4, 4)
    # every click was one request answered on itself (off Gradio's queue: no join, no event stream)
    assert sum("/gradio_api/run/" in url for url in sent) >= 5
    assert not [url for url in sent if "/gradio_api/queue/" in url]

    rows = ann_votes(store)
    outcomes = [(v.outcome, v.picked_position) for v, _ in rows]
    assert outcomes == [("ranked", 0), ("ranked", 1), ("tie", None), ("ranked", 1)]
    first, second, _, ranked = rows
    assert first[0].ranking == first[1].order  # A = first shown
    assert second[0].ranking == second[1].order[::-1] and second[0].strength == "much" and second[0].rationale == "3"
    assert ranked[0].ranking == [ranked[1].order[i] for i in (1, 2, 0)]
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Assignment).where(Assignment.status == "skipped")) == 1

    page.get_by_role("tab", name="My history").click()
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_selector("#history >> text=B is better")
    assert page.locator("#history").get_by_text("<b>not bold</b><script>", exact=False).count() >= 1
    assert page.locator("#history b, #history script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img[src='x']").count() == 0
    page.close()


def test_admin_sees_the_admin_view(browser, app):
    server, _ = app
    page = login(browser, server.url, "root")
    page.get_by_role("tab", name="Admin").click()
    page.locator("#btn-admin").click()
    page.wait_for_selector("text=Krippendorff")
    page.wait_for_selector("#admin-table >> text=ann")
    assert page.locator("#admin-table >> text=root").count() >= 1
    page.close()
