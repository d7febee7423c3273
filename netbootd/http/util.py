"""Small helpers every HTTP handler module shares: the App key, errors, addresses.

Kept apart from ``app.py`` so handler modules do not import the service (no cycle).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from aiohttp import web

from ..app import App
from ..model import ClientFacts, ClientKind, normalise_mac
from ..render import ServerInfo

#: The netbootd App inside the aiohttp Application (typed key, no global state).
APP_KEY: web.AppKey[App] = web.AppKey("netbootd_app", App)

SERVICE = "http"

#: Image names and versions are single path components (same rule as the store's).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: What a Host header may contain before we echo it into an iPXE script.
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def the_app(request: web.Request) -> App:
    return request.app[APP_KEY]


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """Every API error has the same shape: ``{"error": "..."}``."""
    return web.json_response({"error": message, **extra}, status=status)


def malformed(request: web.Request, message: str, status: int = 400) -> web.Response:
    """Count a bad input (metrics) and answer it; a bad request never raises."""
    the_app(request).metrics.malformed.labels(SERVICE).inc()
    return json_error(status, message)


def parse_mac(text: str) -> str | None:
    try:
        return normalise_mac(text)
    except ValueError:
        return None


def valid_name(text: str) -> bool:
    return bool(NAME_RE.fullmatch(text)) and text not in (".", "..")


def local_ip(request: web.Request) -> str:
    """The address this request arrived on: what the node can reach us at."""
    app = the_app(request)
    if app.settings.network.advertise:
        return str(app.settings.network.advertise)
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    ip = str(sock[0]) if sock else "127.0.0.1"
    ip = ip.removeprefix("::ffff:")
    if ip in ("0.0.0.0", "::", ""):
        ip = "127.0.0.1"
    return ip


def server_info(request: web.Request) -> ServerInfo:
    """ServerInfo for rendering: arrival address, configured port, public URL if set."""
    app = the_app(request)
    ip = local_ip(request)
    public = app.settings.http.public_url
    if public is None and ":" in ip:  # IPv6 literal needs brackets in a URL
        public = f"http://[{ip}]:{app.settings.http.port}"
    return ServerInfo(ip=ip, http_port=app.settings.http.port, public_url=public)


def base_url(request: web.Request) -> str:
    """Absolute base URL for a client: public_url, else the Host it used, else our address.

    The Host header is validated before use: it ends up inside an iPXE script.
    """
    app = the_app(request)
    if app.settings.http.public_url:
        return app.settings.http.public_url.rstrip("/")
    host = request.headers.get("Host", "")
    if host and _HOST_RE.fullmatch(host):
        return f"http://{host}"
    return server_info(request).base_url


def guess_facts(app: App, mac: str, ip: str | None = None) -> ClientFacts:
    """Facts for a machine we only know by MAC (cloud-init, API).

    The planner picks profiles by client kind, so a Pi must not be asked about as
    an iPXE client: a node with a serial in the inventory, or a Raspberry Pi OUI,
    is treated as a Pi; anything else as iPXE.
    """
    node = app.inventory.nodes.get(mac)
    ouis = {o.lower() for o in app.settings.rpi.ouis}
    if (node is not None and node.serial) or mac[:8] in ouis:
        return ClientFacts(mac=mac, kind=ClientKind.RPI, ip=ip,
                           serial=node.serial if node else None)
    return ClientFacts(mac=mac, kind=ClientKind.IPXE, ip=ip)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
