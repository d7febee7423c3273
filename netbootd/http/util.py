"""Small helpers every HTTP handler module shares: the context key, errors, addresses.

Kept apart from ``app.py`` so handler modules do not import the service (no cycle).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from aiohttp import web

from ..model import normalise_mac
from ..render import ServerInfo
from .context import HttpContext

#: The handlers' narrow views inside the aiohttp Application (typed key, no global state).
CONTEXT_KEY: web.AppKey[HttpContext] = web.AppKey("netbootd_http", HttpContext)

SERVICE = "http"

#: Image names and versions are single path components (same rule as the store's).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: What a Host header may contain before we echo it into an iPXE script.
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def context(request: web.Request) -> HttpContext:
    return request.app[CONTEXT_KEY]


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """Every API error has the same shape: ``{"error": "..."}``."""
    return web.json_response({"error": message, **extra}, status=status)


def malformed(request: web.Request, message: str, status: int = 400) -> web.Response:
    """Count a bad input (metrics) and answer it; a bad request never raises."""
    context(request).metrics.malformed.labels(SERVICE).inc()
    return json_error(status, message)


def parse_mac(text: str) -> str | None:
    try:
        return normalise_mac(text)
    except ValueError:
        return None


def valid_name(text: str) -> bool:
    return bool(NAME_RE.fullmatch(text)) and text not in (".", "..")


def who_is(ctx: HttpContext, ip: str) -> str | None:
    """Which machine is probably at ``ip`` (a node's static address, else what DHCP and
    the neighbour table say). Attribution only: secrets and lifecycle reports also ask
    ``nodes.owns``."""
    if not ip:
        return None
    return ctx.nodes.find(ip=ip) or ctx.addresses.mac_for(ip)


def local_ip(request: web.Request) -> str:
    """The address this request arrived on: what the node can reach us at."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sock[0]) if sock else ""


def server_info(request: web.Request) -> ServerInfo:
    """ServerInfo for rendering (``ServerInfo.for_arrival``: the one place for it)."""
    return ServerInfo.for_arrival(context(request).settings, local_ip(request))


def base_url(request: web.Request) -> str:
    """Absolute base URL for a client: public_url, else the Host it used, else our address.

    The Host header is validated before use: it ends up inside an iPXE script.
    """
    ctx = context(request)
    if ctx.settings.http.public_url:
        return ctx.settings.http.public_url.rstrip("/")
    host = request.headers.get("Host", "")
    if host and _HOST_RE.fullmatch(host):
        return f"http://{host}"
    return server_info(request).base_url


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
