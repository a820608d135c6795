"""The labeling app's defences in a real headless Chromium: the page runs under its Content-Security-Policy,
script cannot reach the session, a page of another origin can neither read the app nor frame it, logout
and the login lock work from the browser."""

import http.server
import threading

import httpx
import pytest

from feedback_ui.server import Server
from feedback_ui.testing import PASSWORD, make_project

pytestmark = pytest.mark.browser



@pytest.fixture
def app(tmp_path):
    store = make_project(str(tmp_path / "ui.db"), {"ann": "labeler"}, n_pairs=3)
    server = Server(store).start()
    yield server, store
    server.stop()
    store.close()


def open_login(browser, url):
    page = browser.new_context().new_page()  # a context of its own: more pages can share its cookies
    page.set_default_timeout(15000)
    problems = []
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    return page, problems


def log_in(page, name="ann", password=PASSWORD):
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


class EvilSite:
    """A page on another origin (``localhost`` instead of ``127.0.0.1``, another port) that tries to read the app."""

    def __init__(self, app_url: str):
        script = f"""<!doctype html><html><body><iframe id="f" src="{app_url}"></iframe><script>
        const tryRead = async (path) => {{
          try {{
            const r = await fetch("{app_url}" + path, {{credentials: "include"}});
            return "read " + r.status + " " + (await r.text()).slice(0, 200);
          }} catch (e) {{ return "blocked"; }}
        }};
        const paths = ["config", "gradio_api/token", "gradio_api/info"];
        Promise.all(paths.map(tryRead)).then(r => {{ window.results = r; }});
        </script></body></html>""".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(script)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://localhost:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_page_runs_under_its_policy_and_script_never_sees_the_session(browser, app):
    server, _ = app
    page, problems = open_login(browser, server.url)
    log_in(page)
    page.wait_for_selector("#btn-skip")
    page.wait_for_function("() => document.querySelector('#progress') && document.querySelector('#progress')"
                           ".innerText.includes('0 of 3 done')")  # fmt: skip
    page.locator("#progress").click()
    page.keyboard.press("1")  # the shortcut script is an allowed file, not inline code
    page.wait_for_function("() => document.querySelector('#progress').innerText.includes('1 of 3 done')")
    cookies = page.context.cookies()
    assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("fetch('gradio_api/token').then(r => r.status)") == 404
    assert problems == []  # Gradio's page needed nothing the policy forbids
    injected = """() => { const s = document.createElement("script"); s.textContent = "window.__ran = 1";
                          document.head.appendChild(s); return typeof window.__ran; }"""
    assert page.evaluate(injected) == "undefined"  # an inline script that is not Gradio's own does not run
    assert len(problems) == 1 and "inline script" in problems[0]

    token = cookies[0]["value"]
    page.get_by_role("link", name="Log out").click()
    page.wait_for_url("**/login")
    page.get_by_label("password").wait_for()
    answer = httpx.get(f"{server.url}config", cookies={cookies[0]["name"]: token}, timeout=10)
    assert answer.status_code == 401  # the session ended on the server, not only in this browser
    page.context.close()


def test_a_page_of_another_origin_can_neither_read_nor_frame_the_app(browser, app):
    server, _ = app
    page, _ = open_login(browser, server.url)
    log_in(page)
    page.wait_for_selector("#btn-skip")
    evil = EvilSite(server.url)
    try:
        attacker = page.context.new_page()  # same browser, logged in to the app
        attacker.goto(evil.url)
        attacker.wait_for_function("() => window.results !== undefined")
        assert attacker.evaluate("window.results") == ["blocked"] * 3
        frame = attacker.frame_locator("#f")
        assert frame.locator("#btn-skip").count() == 0 and frame.locator("input[name=password]").count() == 0
    finally:
        evil.close()
    page.context.close()


def test_the_login_lock_is_explained_on_the_login_page(browser, app):
    server, _ = app
    page, _ = open_login(browser, server.url)
    log_in(page, password="wrong password")
    assert "Wrong user name or password" in page.get_by_role("alert").inner_text()
    for _ in range(9):
        log_in(page, password="wrong password")
        page.get_by_role("alert").wait_for()
    log_in(page)  # the right password, now too late
    message = page.get_by_role("alert").inner_text()
    assert "locked" in message and "try again in 15 minutes" in message
    assert page.locator("#btn-skip").count() == 0
    page.context.close()
