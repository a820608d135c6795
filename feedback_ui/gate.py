"""The served ASGI app: everything a request meets before Gradio.

In order, for every HTTP request and WebSocket:

1. **Origin**: a foreign ``Origin`` not in ``--allowed_origins`` is refused (403, no data, no CORS
   headers); Gradio's own CORS headers are removed from every answer, and only an allowed foreign
   origin is echoed back (with credentials).
2. **Headers**: every answer carries a Content-Security-Policy (inline scripts of Gradio's page are
   allowed by hash, nothing else inline), ``X-Frame-Options: DENY``, ``nosniff``, a Referrer-Policy,
   and HSTS over HTTPS.
3. **Login**: ``/login`` and ``/logout`` are served here (the page is in :mod:`feedback_ui.pages`), with
   throttling and the password check in worker threads; sessions live in the database
   (:mod:`feedback_ui.sessions`) under an HttpOnly ``SameSite=Strict`` cookie (``Secure`` and
   ``__Host-`` over HTTPS).
4. Without a live session only static assets are served; the page shows the login form and
   everything else gets 401. With one, the user's name goes to Gradio (``gr.Request.username``)
   through ``auth_dependency``.
5. **Blocked routes**: ``/gradio_api/token`` (it would hand a session to script) and Gradio's routes that take
   files or run code the app does not use (``BLOCKED``, ``BLOCKED_PREFIXES``) answer 404 even with a session;
   any other request with a ``multipart/form-data`` body (the way files are sent) gets 415: the app takes no
   files, whatever route a Gradio version adds. Request bodies are capped.

A login attempt is counted by the throttle before its password is checked (:mod:`feedback_ui.throttle`),
and at most ``LOGINS_WAITING`` logins wait for or hold one of the ``HASHES_AT_ONCE`` scrypt slots: more are
answered 429 at once, so a flood of logins cannot queue honest users' logins behind it.
"""

from __future__ import annotations

import logging
from typing import Optional

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from feedback_ui import http_policy
from feedback_ui.auth import check_login
from feedback_ui.pages import SHORTCUTS_JS, SHORTCUTS_PATH, login_page
from feedback_ui.sessions import SessionPolicy, end_session, session_user, start_session
from feedback_ui.store import Store, User
from feedback_ui.throttle import ThrottlePolicy, begin_attempt, locked, record_failure, record_success, throttle_keys

log = logging.getLogger("feedback_ui")

USER_KEY = "rlhf.user"  # the scope entry that carries the logged-in user's name to Gradio
COOKIE, SECURE_COOKIE = "rlhf_session", "__Host-rlhf_session"
MAX_BODY = 1 << 20  # a vote with a long edit fits many times over
MAX_LOGIN_BODY = 8 << 10
HASHES_AT_ONCE = 2  # concurrent scrypt checks (128 MiB each); more logins wait their turn in the pool
LOGINS_WAITING = 16  # logins waiting for or holding a scrypt slot; more are answered 429 at once
BUSY_MESSAGE = "Too many logins at once: try again in a few seconds."
WRONG_LOGIN = "Wrong user name or password."
NAME_MAX = User.name.type.length  # the column's size (64)

OPEN_EXACT = {"/favicon.ico", "/robots.txt", "/theme.css"}
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/")
AUTOMATIC = ("/gradio_api/heartbeat/", "/gradio_api/queue/data")  # an open tab asks for these by itself: not use
BLOCKED = {"/gradio_api/token", "/gradio_api/upload", "/gradio_api/upload_progress", "/gradio_api/process_recording",
           "/gradio_api/component_server"}  # fmt: skip
BLOCKED_PREFIXES = ("/gradio_api/stream/", "/gradio_api/vibe-", "/gradio_api/undo-vibe-")


def user_of(request) -> Optional[str]:
    """Gradio's ``auth_dependency``: the name the gate put in the request's scope."""
    return request.scope.get(USER_KEY)


def _is_https(scope) -> bool:
    return scope.get("scheme") in ("https", "wss")


def _wants_html(scope) -> bool:
    return "text/html" in Headers(scope=scope).get("accept", "")


def _is_upload(scope) -> bool:
    """A body sent the way files are (``multipart/form-data``), on any route."""
    return Headers(scope=scope).get("content-type", "").lower().lstrip().startswith("multipart/")


class _NotChecked(Exception):
    """A login refused after its attempt was counted but before its password was checked."""


class Gate:
    """ASGI app in front of the Gradio app (``gradio_app``); ``lifespan`` goes to the FastAPI ``parent``."""

    def __init__(self, parent, gradio_app, store: Store, *, allowed_origins=(),
                 sessions: Optional[SessionPolicy] = None, throttle: Optional[ThrottlePolicy] = None,
                 auth_message: str = "") -> None:  # fmt: skip
        self.parent, self.gradio_app, self.store = parent, gradio_app, store
        self.allowed = tuple(allowed_origins)
        self.sessions, self.throttle = sessions or SessionPolicy(), throttle or ThrottlePolicy()
        self.auth_message = auth_message
        self._hash_slots: Optional[anyio.CapacityLimiter] = None  # made inside the event loop
        self._logins_waiting = 0  # changed only on the event loop: no lock needed

    # the request pipeline

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.parent(scope, receive, send)
        headers = Headers(scope=scope)
        origin, scheme, host = headers.get("origin"), scope.get("scheme", "http"), headers.get("host")
        same = origin is None or http_policy.origin_allowed(origin, scheme, host, ())
        if not same and not http_policy.origin_allowed(origin, scheme, host, self.allowed):
            log.warning("refused a request to %s from origin %r", scope["path"], origin[:200])
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await self._answer(scope, receive, send, None, _refusal(403, "cross-origin request refused"))
        if scope["type"] == "websocket":
            if await self._user(scope) is None:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.gradio_app(scope, receive, send)
        await self._http(scope, receive, send, None if same else origin)

    async def _http(self, scope, receive, send, foreign_origin: Optional[str]) -> None:
        path, method = scope["path"], scope["method"]
        answer = lambda response: self._answer(scope, receive, send, foreign_origin, response)  # noqa: E731
        length = Headers(scope=scope).get("content-length", "0")
        cap = MAX_LOGIN_BODY if path.rstrip("/") == "/login" else MAX_BODY
        if not length.isdigit() or int(length) > cap:
            return await answer(_refusal(413, "request too large"))
        if foreign_origin and method == "OPTIONS":  # preflight of an allowed origin
            return await answer(Response(status_code=204, headers={
                "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": Headers(scope=scope).get("access-control-request-headers", ""),
            }))  # fmt: skip
        if path.rstrip("/") == "/login":
            return await answer(await self._login(scope, receive))
        if path.rstrip("/") == "/logout":
            return await answer(await self._logout(scope))
        if path == SHORTCUTS_PATH:
            return await answer(Response(SHORTCUTS_JS, media_type="text/javascript"))
        user = await self._user(scope)
        if user is None and not (path in OPEN_EXACT or path.startswith(OPEN_PREFIXES)):
            if method in ("GET", "HEAD") and path == "/":  # the app's address shows the login form itself
                return await answer(login_page(self.auth_message))
            return await answer(_refusal(401, "Not authenticated: log in again (the session ended or never began)."))
        if path.rstrip("/") in BLOCKED or path.startswith(BLOCKED_PREFIXES):
            return await answer(_refusal(404, "Not Found"))
        if _is_upload(scope):
            return await answer(_refusal(415, "uploads are refused: this app takes no files"))
        scope[USER_KEY] = user
        await self.gradio_app(scope, _capped(receive, MAX_BODY), self._headers_added(send, scope, foreign_origin))

    async def _answer(self, scope, receive, send, foreign_origin, response: Response) -> None:
        if "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        await response(scope, receive, self._headers_added(send, scope, foreign_origin))

    def _headers_added(self, send, scope, foreign_origin: Optional[str]):
        """``send`` with the security headers set and CORS headers replaced on the response start.

        HTML (Gradio's page) is held until complete, so its inline scripts can be hashed into the policy.
        """
        https, held = _is_https(scope), []

        def start(message, body: bytes) -> dict:
            headers = MutableHeaders(scope=message)
            for name in [k for k in headers.keys() if k.startswith("access-control-")]:
                del headers[name]
            if foreign_origin:
                headers["Access-Control-Allow-Origin"] = foreign_origin
                headers["Access-Control-Allow-Credentials"] = "true"
                headers.append("Vary", "Origin")
            for name, value in http_policy.security_headers(https):
                headers[name] = value
            if "content-security-policy" not in headers:
                headers["Content-Security-Policy"] = http_policy.content_security_policy(
                    http_policy.inline_script_hashes(body))
            return message

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                if Headers(raw=message["headers"]).get("content-type", "").startswith("text/html"):
                    held.append(message)
                    return
                return await send(start(message, b""))
            if message["type"] == "http.response.body" and held:
                held.append(message)
                if message.get("more_body"):
                    return
                body = b"".join(m.get("body", b"") for m in held[1:])
                await send(start(held[0], body))
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        return wrapped

    # sessions and login

    def _token(self, scope) -> Optional[str]:
        return Request(scope).cookies.get(SECURE_COOKIE if _is_https(scope) else COOKIE)

    async def _user(self, scope) -> Optional[str]:
        token = self._token(scope)
        if not token:
            return None
        touch = not scope["path"].startswith(AUTOMATIC)
        return await anyio.to_thread.run_sync(session_user, self.store, token, self.sessions, touch)

    async def _login(self, scope, receive) -> Response:
        method, html = scope["method"], _wants_html(scope)
        if method in ("GET", "HEAD"):
            if await self._user(scope):
                return RedirectResponse("./", status_code=303)
            return login_page(self.auth_message)
        if method != "POST":
            return _refusal(405, "use GET or POST")
        try:
            form = await Request(scope, _capped(receive, MAX_LOGIN_BODY)).form(max_files=0, max_fields=8)
        except Exception as exc:  # a malformed or oversized form (starlette's own errors differ by content type)
            log.warning("unreadable login form: %s", exc)
            return _refusal(400, "unreadable login form")
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        client = scope.get("client")
        status, message, token = await self._check(name, password, client[0] if client else None)
        if token is None:
            return login_page(self.auth_message, message, status) if html else _refusal(status, message)
        response = RedirectResponse("./", status_code=303) if html else JSONResponse({"success": True})
        https = _is_https(scope)
        response.set_cookie(SECURE_COOKIE if https else COOKIE, token, path="/", httponly=True, secure=https,
                            samesite="strict")  # fmt: skip
        return response

    async def _check(self, name: str, password: str, address: Optional[str]) -> tuple[int, str, Optional[str]]:
        """(status, message, session token or None): a place in the bounded queue of logins, then the throttle."""
        if "\x00" in name or len(name) > NAME_MAX:  # no account has such a name, and PostgreSQL cannot compare a NUL
            return 401, WRONG_LOGIN, None
        if self._logins_waiting >= LOGINS_WAITING:
            log.warning("login of %r from %s refused: %d logins already waiting", name, address, LOGINS_WAITING)
            return 429, BUSY_MESSAGE, None
        self._logins_waiting += 1
        try:
            return await self._throttled_check(name, password, address)
        finally:
            self._logins_waiting -= 1

    async def _throttled_check(self, name: str, password: str,
                               address: Optional[str]) -> tuple[int, str, Optional[str]]:  # fmt: skip
        """The attempt is counted before its wait for a scrypt slot, the lock looked at again once it has one."""
        keys = throttle_keys(name, address)
        message = await anyio.to_thread.run_sync(begin_attempt, self.store, keys, self.throttle)
        if message:
            log.warning("login of %r from %s refused: locked", name, address)
            return 429, message, None
        if self._hash_slots is None:
            self._hash_slots = anyio.CapacityLimiter(HASHES_AT_ONCE)
        try:
            async with self._hash_slots:
                message = await anyio.to_thread.run_sync(locked, self.store, keys)  # locked while this one waited
                if message:
                    log.warning("login of %r from %s refused: locked while it waited", name, address)
                    raise _NotChecked(message)
                user = await anyio.to_thread.run_sync(check_login, self.store, name, password)
        except BaseException as exc:  # refused, failed or cancelled before its check ended: the attempt is taken back
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(record_success, self.store, keys)
            if isinstance(exc, _NotChecked):
                return 429, str(exc), None
            raise
        if user is None or user.disabled_at is not None:  # a disabled account says no more than a wrong password
            lock = await anyio.to_thread.run_sync(record_failure, self.store, keys, self.throttle)
            why = "failed login" if user is None else "login of disabled account"
            log.warning("%s of %r from %s%s", why, name, address, "; now locked" if lock else "")
            return (429, lock, None) if lock else (401, WRONG_LOGIN, None)
        await anyio.to_thread.run_sync(record_success, self.store, keys)
        token = await anyio.to_thread.run_sync(start_session, self.store, user.id, self.sessions)
        log.info("login of %r from %s", name, address)
        return 200, "", token

    async def _logout(self, scope) -> Response:
        await anyio.to_thread.run_sync(end_session, self.store, self._token(scope))
        response = RedirectResponse("login", status_code=303) if _wants_html(scope) else JSONResponse({"success": True})
        https = _is_https(scope)
        response.delete_cookie(SECURE_COOKIE if https else COOKIE, path="/", httponly=True, secure=https,
                               samesite="strict")  # fmt: skip
        return response


# helper functions


def _refusal(status: int, message: str) -> Response:
    return JSONResponse({"detail": {"error": message, "auth_message": None}}, status_code=status)


def _capped(receive, limit: int):
    """``receive`` that ends the request (as a disconnect) once the body passes ``limit`` bytes."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return wrapped

