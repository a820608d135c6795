"""What the labeling app allows over HTTP: origins, security headers, the Content-Security-Policy, and how its
events are called (``EVENT_OPTIONS``).

Pure functions and constants (no web framework imported), so ``rlhf label serve`` can check its
flags before the app and its libraries load.

Origins: a request whose ``Origin`` header is not the app's own origin (the scheme of the
connection and the ``Host`` header) and not one of ``--allowed_origins`` is refused with no data.
Browsers send ``Origin`` with every cross-origin request and with every same-origin ``POST``, so a
page on another site can neither read the app's answers nor act as a logged-in user (the session
cookie is ``SameSite=Strict`` as well).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import urllib.parse
from typing import Iterable, Optional

from rlhf.errors import UserError

Origin = tuple  # (scheme, host, port)

DEFAULT_PORTS = {"http": 80, "https": 443}

# How every event of the app is wired: hidden from the API page, and answered on the request itself. Off
# Gradio's queue the page sends one ``POST /gradio_api/run/...`` per click and reads the answer from it, where
# the queue takes a ``queue/join`` plus a message on the page's event stream, and a queue worker's hand-over:
# a fifth of the server's CPU per vote and about 40 % of the p95 latency under load on SQLite (bench/RESULTS.md,
# labeling app). The handlers run in the server's worker threads, at most ``--concurrency`` at once.
EVENT_OPTIONS = {"api_visibility": "private", "queue": False}
HSTS = "max-age=31536000"

# Gradio's page builds itself with JS and injects styles, so styles stay inline; scripts come
# from the app itself, or are inline scripts whose exact text is hashed into the page's policy.
_PAGE_POLICY = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self' 'unsafe-inline'",
    "img-src": "'self' data: blob:",
    "font-src": "'self' data:",
    "connect-src": "'self'",
    "media-src": "'self' blob:",
    "worker-src": "'self' blob:",
    "object-src": "'none'",
    "base-uri": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}


def parse_origin(text: str) -> Optional[Origin]:
    """``scheme://host[:port]`` -> (scheme, host, port), default ports filled in; None if it is not one."""
    try:
        url = urllib.parse.urlsplit(text.strip())
        port = url.port
    except ValueError:
        return None
    if url.scheme not in DEFAULT_PORTS or not url.hostname or url.username is not None or url.password is not None:
        return None
    if url.path not in ("", "/") or url.query or url.fragment:
        return None
    return url.scheme, url.hostname.lower(), port or DEFAULT_PORTS[url.scheme]


def parse_allowed_origins(text: Optional[str]) -> tuple[Origin, ...]:
    """``--allowed_origins`` (comma-separated ``scheme://host[:port]``) -> origins; a bad entry is a UserError."""
    origins = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if item.strip() in ("*", "null"):
            raise UserError(f"--allowed_origins: {item.strip()!r} is not allowed; list each origin (https://host:port)")
        origin = parse_origin(item)
        if origin is None:
            raise UserError(f"--allowed_origins: {item.strip()!r} is not an origin like https://labels.example.org")
        origins.append(origin)
    return tuple(origins)


def parse_trusted_proxies(text: Optional[str]) -> tuple[str, ...]:
    """``--trusted_proxies`` (comma-separated IP addresses or networks) -> entries; a bad entry is a UserError."""
    proxies = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        try:
            parsed = ipaddress.ip_network(item.strip()) if "/" in item else ipaddress.ip_address(item.strip())
        except ValueError:
            raise UserError(f"--trusted_proxies: {item.strip()!r} is not an IP address or network like 127.0.0.1 "
                            "or 10.0.0.0/8") from None  # fmt: skip
        proxies.append(str(parsed))
    return tuple(proxies)


def own_origin(scheme: str, host_header: Optional[str]) -> Optional[Origin]:
    """The origin a request was sent to: its connection's scheme (ws/wss as http/https) and ``Host`` header."""
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return parse_origin(f"{scheme}://{host_header}") if host_header else None


def origin_allowed(origin: str, scheme: str, host_header: Optional[str], allowed: Iterable[Origin]) -> bool:
    """Same origin as the request itself, or listed in ``allowed``; ``null`` and malformed origins never are."""
    parsed = parse_origin(origin)
    return parsed is not None and (parsed == own_origin(scheme, host_header) or parsed in set(allowed))


def inline_script_hashes(html: bytes) -> list[str]:
    """CSP hash sources (``'sha256-...'``) of the inline ``<script>`` elements of ``html``."""
    out = []
    for attrs, body in re.findall(rb"<script\b([^>]*)>(.*?)</script\s*>", html, flags=re.S | re.I):
        if not re.search(rb"\bsrc\s*=", attrs):
            out.append(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'")
    return out


def content_security_policy(script_hashes: Iterable[str] = ()) -> str:
    """The policy of the app's pages and answers; ``script_hashes`` allow those exact inline scripts."""
    policy = dict(_PAGE_POLICY)
    policy["script-src"] = " ".join([policy["script-src"], *dict.fromkeys(script_hashes)])
    return "; ".join(f"{k} {v}" for k, v in policy.items())


def login_page_policy(style_hash: str) -> str:
    """The login page runs no script at all."""
    return (f"default-src 'none'; style-src {style_hash}; img-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip


def security_headers(https: bool) -> list[tuple[str, str]]:
    """Headers every answer carries (besides its Content-Security-Policy)."""
    headers = [
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "same-origin"),  # "no-referrer" would make Chrome send Origin: null
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
    ]
    return headers + [("Strict-Transport-Security", HSTS)] if https else headers
