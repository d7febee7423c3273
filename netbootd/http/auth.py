"""Bearer-token checks for the API.

The token lives in the file ``http.api_token_file`` names; it is re-read on each
check (mutating calls are rare), so rotating it needs no restart. Comparison is
constant-time (``hmac.compare_digest``) so response timing leaks nothing.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from aiohttp import web

from .util import context, json_error

log = logging.getLogger("netbootd.http.auth")


def read_token(path: Path | None) -> str | None:
    """The configured token, or None when unset, unreadable or empty (= API closed)."""
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.warning("api token file %s unreadable: %s", path, exc.strerror)
        return None
    return token or None


def presented(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check(request: web.Request, *, mutating: bool) -> web.Response | None:
    """None when the request may proceed, else the 401/403 answer to send.

    Read-only calls are open when ``http.read_open``; mutating calls always need the
    token, and are refused (403) outright when no token is configured.
    """
    ctx = context(request)
    if not mutating and ctx.settings.http.read_open:
        return None
    token = read_token(ctx.settings.http.api_token_file)
    if token is None:
        ctx.metrics.requests.labels("http", "unauthorized").inc()
        return json_error(403, "API token not configured (http.api_token_file); "
                          "mutating calls are disabled")
    given = presented(request)
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        ctx.metrics.requests.labels("http", "unauthorized").inc()
        resp = json_error(401, "missing or wrong bearer token")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="netbootd"'
        return resp
    return None
