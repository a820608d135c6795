"""Serving the labeling app: the gate (:mod:`feedback_ui.gate`) in front of the Gradio Blocks.

Gradio's own ``auth=`` is not used: it keeps sessions in one process's memory and answers
``/gradio_api/token``. The gate logs users in with sessions stored in the database and hands the
user's name to Gradio through ``auth_dependency``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Optional, Sequence

import gradio as gr
import uvicorn
from fastapi import FastAPI
from gradio.routes import App

from feedback_ui.app import build_app
from feedback_ui.assign import DEFAULT_ASSIGNMENT_TTL
from feedback_ui.gate import Gate, user_of
from feedback_ui.pages import SHORTCUTS_HEAD
from feedback_ui.sessions import SessionPolicy
from feedback_ui.db_url import shown_url
from feedback_ui.store import Store, open_store
from feedback_ui.throttle import ThrottlePolicy

AUTH_MESSAGE = "Log in with the account your project admin created."


def _theme():
    """Gradio's default look with system fonts: the page loads nothing from other sites."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])  # fmt: skip


def create_server_app(store: Store, *, gold_rate: Optional[float] = None, concurrency: int = 16,
                      allowed_origins=(), sessions: Optional[SessionPolicy] = None,
                      throttle: Optional[ThrottlePolicy] = None,
                      assignment_ttl: Optional[timedelta] = DEFAULT_ASSIGNMENT_TTL) -> Gate:  # fmt: skip
    """An ASGI app serving the labeling Blocks at ``/`` behind the gate (login, origins, headers, limits)."""
    blocks = build_app(store, gold_rate=gold_rate, assignment_ttl=assignment_ttl)
    # Gradio's queue keeps its last 10,000 events and, by default, rebuilds a pandas summary of all of them
    # after every event (statistics for its API page, which this app does not serve): a cost per vote that
    # grows with every vote (bench/RESULTS.md, labeling app). Keep a few events, summarised rarely.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "200")
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "200")
    # The app's events are off the queue (EVENT_OPTIONS): their handlers run in worker threads, `concurrency` at
    # once. The queue stays for clients that join it (gradio_client does for every call).
    blocks.max_threads = concurrency
    blocks.queue(default_concurrency_limit=concurrency, status_update_rate=5)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        auth_dependency=user_of,
        head=SHORTCUTS_HEAD,
        theme=_theme(),
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=False,
        pwa=False,
    )
    gradio_app = next(r.app for r in app.routes if isinstance(getattr(r, "app", None), App))
    return Gate(app, gradio_app, store, allowed_origins=allowed_origins, sessions=sessions, throttle=throttle,
                auth_message=AUTH_MESSAGE)  # fmt: skip


def _uvicorn_config(app, host: str, port: int, ssl_certfile: Optional[str], ssl_keyfile: Optional[str],
                    grace: int, trusted_proxies: Sequence[str] = ()) -> uvicorn.Config:  # fmt: skip
    """``X-Forwarded-For`` / ``-Proto`` are read only from ``trusted_proxies`` (none: never, whoever connects)."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace,
                          ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, server_header=False,
                          proxy_headers=bool(trusted_proxies), forwarded_allow_ips=list(trusted_proxies) or None)


class Server:
    """The app on ``host:port`` in a background thread (``start()`` / ``stop()``); used by tests and benches."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0, ssl_certfile: Optional[str] = None,
                 ssl_keyfile: Optional[str] = None, trusted_proxies: Sequence[str] = (), **app_kwargs):  # fmt: skip
        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"{'https' if ssl_certfile else 'http'}://{host}:{port}/"
        app = create_server_app(store, **app_kwargs)
        self.server = uvicorn.Server(_uvicorn_config(app, host, port, ssl_certfile, ssl_keyfile, grace=1,
                                                     trusted_proxies=trusted_proxies))  # fmt: skip
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
           concurrency: int = 16, allowed_origins=(), sessions: Optional[SessionPolicy] = None,
           ssl_certfile: Optional[str] = None, ssl_keyfile: Optional[str] = None,
           assignment_ttl: Optional[timedelta] = DEFAULT_ASSIGNMENT_TTL, trusted_proxies: Sequence[str] = ()) -> None:
    """Serve until interrupted (``rlhf label serve``); HTTPS when given a certificate and its key; client addresses
    from ``X-Forwarded-For`` only on connections from ``trusted_proxies``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("feedback_ui").setLevel(logging.INFO)  # logins, refusals, failed requests
    store = open_store(db)
    scheme = "https" if ssl_certfile else "http"
    print(f"labeling app on {scheme}://{host}:{port}/ (database {shown_url(store.url)}); Ctrl+C stops it",
          flush=True)  # fmt: skip
    app = create_server_app(store, gold_rate=gold_rate, concurrency=concurrency, allowed_origins=allowed_origins,
                            sessions=sessions, assignment_ttl=assignment_ttl)  # fmt: skip
    uvicorn.Server(_uvicorn_config(app, host, port, ssl_certfile, ssl_keyfile, grace=2,
                                   trusted_proxies=trusted_proxies)).run()  # fmt: skip
