"""What the gate serves itself: the login page (no script at all) and the keyboard-shortcut script.

The shortcuts are a file of their own (not inline in the page) so the page's Content-Security-Policy
needs no ``'unsafe-inline'`` for scripts.
"""

from __future__ import annotations

import base64
import hashlib
import html

from starlette.responses import HTMLResponse

from feedback_ui.http_policy import login_page_policy

SHORTCUTS_PATH = "/rlhf/shortcuts.js"
SHORTCUTS_HEAD = '<script src="rlhf/shortcuts.js"></script>'  # relative: the page's <base> is the app root

# 1/2/3/4 = the four pair buttons, s = skip; ignored while typing in a text field
SHORTCUTS_JS = """(() => {
  const keys = {"1": "btn-a", "2": "btn-b", "3": "btn-tie", "4": "btn-both-bad", "s": "btn-skip"};
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target;
    const typing = t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
      (t.tagName === "INPUT" && !["radio", "checkbox", "button", "submit"].includes(t.type)));
    if (typing) return;
    const btn = document.getElementById(keys[(e.key || "").toLowerCase()]);
    if (btn && btn.offsetParent !== null && !btn.disabled) { e.preventDefault(); btn.click(); }
  });
})();
"""

_STYLE = """
body { font-family: system-ui, sans-serif; background: #f6f7f9; color: #1f2937; margin: 0; }
main { max-width: 22rem; margin: 12vh auto; background: #fff; padding: 2rem; border-radius: 0.5rem;
       box-shadow: 0 1px 4px rgba(0, 0, 0, 0.15); }
h1 { font-size: 1.3rem; margin-top: 0; }
label { display: block; margin-top: 1rem; font-weight: 600; }
input { width: 100%; box-sizing: border-box; padding: 0.5rem; margin-top: 0.3rem; font-size: 1rem; }
button { margin-top: 1.5rem; width: 100%; padding: 0.6rem; font-size: 1rem; background: #ea580c; color: #fff;
         border: 0; border-radius: 0.3rem; cursor: pointer; }
.error { background: #fee2e2; color: #991b1b; padding: 0.6rem; border-radius: 0.3rem; }
.note { color: #4b5563; font-size: 0.9rem; }
"""
_STYLE_HASH = f"'sha256-{base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()}'"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in - Preference labeling</title><style>{style}</style></head>
<body><main>
<h1>Preference labeling</h1>
{error}<p class="note">{note}</p>
<form method="post" action="login">
<label for="username">Username</label><input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">Password</label><input id="password" name="password" type="password"
 autocomplete="current-password" required>
<button type="submit">Login</button>
</form>
</main></body></html>
"""


def login_page(note: str, error: str = "", status: int = 200) -> HTMLResponse:
    """The login form; ``error`` (escaped) says why the last try failed."""
    shown = f'<p class="error" role="alert" id="login-error">{html.escape(error)}</p>\n' if error else ""
    body = _PAGE.format(style=_STYLE, error=shown, note=html.escape(note))
    return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": login_page_policy(_STYLE_HASH)})
