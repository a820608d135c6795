"""Cross-site scripting in a real headless Chromium: hostile prompts, responses, edits, rationales and user
names in the labeler view (task, ranking, history) and the admin view never execute and are shown as text.

Every vector, if the browser ever parsed it as markup or script, calls ``__xss(n)`` (a function exposed by
the test, so a call from any frame reaches Python) and/or creates an element marked ``data-xss``. The flow
runs twice: under the app's Content-Security-Policy, and with the policy bypassed, so the escaping itself
is tested, not only the policy behind it.
"""

import pytest
import sqlalchemy as sa

from feedback_ui import tasks
from feedback_ui.auth import hash_password
from feedback_ui.candidates import add_candidates
from feedback_ui.server import Server
from feedback_ui.store import User, Vote, init_db
from feedback_ui.testing import PASSWORD

pytestmark = pytest.mark.browser

VECTORS = [
    "<script>__xss(1)</script>",
    '<img src=x onerror="__xss(2)" data-xss>',
    '<svg data-xss onload="__xss(3)"><circle r=1 /></svg>',
    '<iframe data-xss src="javascript:parent.__xss(4)"></iframe>',
    '<a data-xss href="javascript:__xss(5)">click me</a>',
    "[markdown link](javascript:__xss(6))",
    '![markdown image](x" onerror="__xss(7))',
    '<details data-xss open ontoggle="__xss(8)"><summary>s</summary></details>',
    '<style>*{background:url("javascript:__xss(9)")}</style><div data-xss style="width:expression(__xss(9))">',
    '<input data-xss autofocus onfocus="__xss(10)">',
    '"><script>__xss(11)</script>',
    "'><img src=x onerror=__xss(12) data-xss>",
    "</textarea><img src=x onerror=__xss(13) data-xss>",
    '<object data-xss data="javascript:__xss(14)"></object><embed data-xss src="javascript:__xss(14)">',
    "<math><mtext><table><mglyph><style><img src=x onerror=__xss(15) data-xss>",
    "\uff1cscript\uff1e__xss(16)\uff1c/script\uff1e",  # fullwidth < and >
    "\u202e<img src=x onerror=__xss(17) data-xss>\u202c gnp.evil",  # right-to-left override
    "&lt;img src=x onerror=__xss(18) data-xss&gt;",  # already entity-encoded: must stay literal
    '<marquee data-xss onstart="__xss(19)">m</marquee>',
    '<video data-xss><source onerror="__xss(20)"></video>',
    "{{constructor.constructor('__xss(21)')()}} ${__xss(21)}",  # template injection
    '<base data-xss href="javascript:__xss(22)//">',
    '<meta http-equiv="refresh" content="0;url=javascript:__xss(23)">',
    '<form data-xss><button formaction="javascript:__xss(24)">go</button></form>',
    '<!--<img src="--><img src=x onerror=__xss(25) data-xss>',
    "<scr<script>ipt>__xss(26)</scr</script>ipt>",
    "<IMG SRC=JaVaScRiPt:__xss(27) data-xss>",
    '<div data-xss onmouseover="__xss(28)" style="position:fixed;inset:0">hover</div>',
    "javascript:__xss(29)",
    '<body data-xss onload="__xss(30)">',
    "\u003cimg src=x onerror=__xss(31) data-xss\u003e",  # escaped in the Python source, plain < in the text
    "<noscript><p title=\"</noscript><img src=x onerror=__xss(32) data-xss>\">",
]
ALL = "\n".join(VECTORS)
NAMES = [  # user names go straight into the database (the CLI would refuse them), at most 64 characters
    "<img src=x onerror=__xss(40) data-xss>",
    "<svg/onload=__xss(41) data-xss>",
    '"><script>__xss(42)</script>',
    "\uff1cscript\uff1e__xss(43)\uff1c/script\uff1e",
    "\u202e<b data-xss>rtl</b>",
    "[x](javascript:__xss(44))",
]



@pytest.fixture
def app(tmp_path):
    """One history item per vector (its prompt starts with it), then a pair and a 3-way ranking with every
    vector in the prompt and in each response; ann has voted on the history items through the API with the
    vectors as rationale and edit; hostile user names sit beside ann and the admin root."""
    store = init_db(str(tmp_path / "xss.db"))
    with store.write() as s:
        for name, role in [("ann", "labeler"), ("root", "admin"), *((n, "labeler") for n in NAMES)]:
            s.add(User(name=name, role=role, password_hash=hash_password(PASSWORD)))
    for i, v in enumerate(VECTORS):
        add_candidates(store, f"{v} (history {i})", [f"{v} first {i}", f"second {i} {v}"], policy="x", overlap=3)
    add_candidates(store, f"every vector:\n{ALL}", [f"A:\n{ALL}", f"B:\n{ALL}"], policy="x", overlap=3)
    add_candidates(store, f"rank all:\n{ALL}", [f"R{k}:\n{ALL}" for k in range(3)], policy="x", mode="ranking",
                   overlap=3)  # fmt: skip
    view = tasks.serve(store, "ann", 0.0)
    for v in VECTORS:
        view = tasks.answer(store, "ann", view["token"], 0.0, choice="A", rationale=v, edit=f"better: {v}")
    for name in NAMES[:2]:  # hostile names with numbers in the admin table
        view = tasks.serve(store, name, 0.0)
        tasks.answer(store, name, view["token"], 0.0, choice="B", rationale=ALL)
    server = Server(store).start()
    yield server, store
    server.stop()
    store.close()


class Watch:
    """Browser contexts (one per login) whose pages report every ``__xss`` call and every
    Content-Security-Policy complaint."""

    def __init__(self, browser, bypass_csp: bool):
        self.browser, self.bypass_csp = browser, bypass_csp
        self.fired, self.csp, self.contexts = [], [], []

    def login(self, url, name):
        context = self.browser.new_context(bypass_csp=self.bypass_csp)
        context.expose_function("__xss", lambda *args: self.fired.append(args))
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20000)
        page.on("console", lambda m: self.csp.append(m.text) if "Content Security Policy" in m.text else None)
        page.on("dialog", lambda d: (self.fired.append(("dialog", d.message)), d.dismiss()))
        page.goto(url)
        page.get_by_label("username").fill(name)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#btn-skip")
        return page

    def check(self, page):
        """Nothing ran, nothing was parsed as markup: no marked element, no javascript: link or frame."""
        page.mouse.move(200, 200)  # an onmouseover would fire now
        page.wait_for_timeout(300)
        assert self.fired == []
        assert page.locator("[data-xss]").count() == 0
        scripted = "a[href^='javascript' i], iframe[src^='javascript' i], base[href^='javascript' i], meta[http-equiv]"
        assert page.locator(scripted).count() == 0
        assert page.locator("#prompt script, #status script, #history script, #admin-table script").count() == 0

    def close(self):
        for context in self.contexts:
            context.close()


def values(page, *ids):
    return [page.locator(f"#{i} textarea").input_value() for i in ids]


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "csp-bypassed"])
def test_no_vector_executes_in_the_labeler_and_admin_views(browser, app, bypass_csp):
    server, store = app
    watch = Watch(browser, bypass_csp)
    page = watch.login(server.url, "ann")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.startsWith('every vector')")
    watch.check(page)
    # the pair: prompt and both responses shown exactly as stored, as text
    assert values(page, "prompt") == [f"every vector:\n{ALL}"]
    assert sorted(values(page, "resp-a", "resp-b")) == [f"A:\n{ALL}", f"B:\n{ALL}"]
    # a vote from the page with every vector as rationale and as edit
    page.locator("#rationale textarea").fill(ALL)
    page.locator("#edit textarea").fill(f"edited:\n{ALL}")
    page.get_by_role("button", name="A is better", exact=True).click()
    page.wait_for_selector("#btn-rank", state="visible")
    watch.check(page)
    # the ranking: each slot shows its response as text
    assert sorted(values(page, "rank-text-0", "rank-text-1", "rank-text-2")) == [f"R{k}:\n{ALL}" for k in range(3)]
    with store.read() as s:
        vote = s.scalars(sa.select(Vote).order_by(Vote.id.desc())).first()
    assert vote.rationale == ALL  # stored verbatim, not mangled by any filter

    # history: a table of prompts that start with each vector
    page.get_by_role("tab", name="My history").click()
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_selector(f"#history >> text=(history {len(VECTORS) - 1})")
    shown = page.locator("#history").inner_text()  # the rows drawn so far (the table draws what is in view)
    drawn = [i for i, v in enumerate(VECTORS) if f"(history {i})" in shown]
    assert len(drawn) >= 20
    for i in drawn:
        assert f"{VECTORS[i]} (history {i})" in shown, VECTORS[i]  # the markup itself is visible, as text
    watch.check(page)

    # the admin view: hostile user names in the labeler table
    admin = watch.login(server.url, "root")
    watch.check(admin)
    admin.get_by_role("tab", name="Admin").click()
    admin.locator("#btn-admin").click()
    admin.wait_for_selector("#admin-table >> text=ann")
    table = admin.locator("#admin-table").inner_text()
    for name in NAMES:
        assert name in table, name
    watch.check(admin)

    # a hostile user name typed into the login form, then working in the app
    hostile = watch.login(server.url, NAMES[0])
    watch.check(hostile)
    assert values(hostile, "prompt")[0]
    assert watch.csp == []  # under the policy nothing even tried to run

    # the probe itself works: markup that does reach the DOM is seen, and runs once the policy is bypassed
    hostile.evaluate("html => document.body.insertAdjacentHTML('beforeend', html)", VECTORS[1])
    hostile.wait_for_timeout(500)
    assert hostile.locator("[data-xss]").count() == 1
    assert watch.fired == ([(2,)] if bypass_csp else [])
    assert bool(watch.csp) != bypass_csp  # the policy refused the inline handler
    watch.close()
