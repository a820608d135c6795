"""Serving the labeling app: Gradio's login page in front of every route.

Gradio's ``auth=`` protects the page, ``/config`` and the API routes; a few of
its routes answer without a session (``/gradio_api/cancel``, ``/reset``,
``/heartbeat``, ``/app_id``, ``/manifest.json``, ...). The served ASGI app
(:class:`LoginRequired`) therefore adds one rule in front of Gradio: without a
valid session cookie only the login page and its static assets are served;
anything else gets 401 and no data.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Optional

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from gradio.routes import App

from feedback_ui.app import SHORTCUTS_HEAD, build_app
from feedback_ui.auth import check_login
from feedback_ui.store import Store, open_store

# reachable before login: the login page itself, the login form target and static files
OPEN_EXACT = {"/", "/login", "/login/", "/logout", "/logout/", "/theme.css", "/favicon.ico", "/robots.txt"}
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/gradio_api/login_check")


class LoginRequired:
    """The served ASGI app: without a valid Gradio session cookie only ``OPEN_*`` paths are served.

    Requests go straight to the Gradio app (one routing and middleware stack
    instead of two); ``lifespan`` goes to the FastAPI parent, which starts
    Gradio's queue.
    """

    def __init__(self, parent: FastAPI, gradio_app: App):
        self.parent, self.gradio_app = parent, gradio_app

    def user(self, scope) -> Optional[str]:
        cookies = Request(scope).cookies
        cid = self.gradio_app.cookie_id
        token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
        return self.gradio_app.tokens.get(token) if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.parent(scope, receive, send)
        path = scope["path"]
        if path in OPEN_EXACT or path.startswith(OPEN_PREFIXES) or self.user(scope):
            return await self.gradio_app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        refused = JSONResponse({"detail": {"error": "Not authenticated", "auth_message": None}}, status_code=401)
        await refused(scope, receive, send)


def create_server_app(store: Store, *, gold_rate: Optional[float] = None, concurrency: int = 16) -> LoginRequired:
    """An ASGI app serving the labeling Blocks at ``/`` behind the login."""
    blocks = build_app(store, gold_rate=gold_rate)
    blocks.queue(default_concurrency_limit=concurrency, status_update_rate=5)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        auth=lambda name, password: check_login(store, name, password),
        auth_message="Log in with the account your project admin created.",
        head=SHORTCUTS_HEAD,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=True,
    )
    gradio_app = next(r.app for r in app.routes if isinstance(getattr(r, "app", None), App))
    return LoginRequired(app, gradio_app)


class Server:
    """The app on ``host:port`` in a background thread (``start()`` / ``stop()``); used by tests and benches."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0, **app_kwargs):
        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/"
        app = create_server_app(store, **app_kwargs)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the labeling app did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop now: open event streams (browsers, gradio_client) are cancelled, not waited for."""
        log = logging.getLogger("uvicorn.error")
        level = log.level
        log.setLevel(logging.CRITICAL)  # the cancelled streams would each log a CancelledError traceback
        try:
            self.server.should_exit = self.server.force_exit = True
            self.thread.join(timeout=10)
        finally:
            log.setLevel(level)


def launch(db: str, host: str = "127.0.0.1", port: int = 7860, gold_rate: Optional[float] = None,
           concurrency: int = 16) -> None:  # fmt: skip
    """Serve until interrupted (``rlhf label serve``)."""
    store = open_store(db)
    print(f"labeling app on http://{host}:{port}/ (database {store.url}); Ctrl+C stops it", flush=True)
    app = create_server_app(store, gold_rate=gold_rate, concurrency=concurrency)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
