"""The HTTP service: one aiohttp Application with the boot chain, files, cloud-init,
the REST API, metrics/health and the status page.

``create(app)`` is the factory the daemon calls (SERVICE_FACTORIES), and the one
place in this package that reads the daemon's ``App``: it builds the handlers'
narrow ``HttpContext`` from it. The Application itself is built by
:func:`build_web_app` from that context.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..settings import Settings
from . import boot, files
from .context import HttpContext
from .util import CONTEXT_KEY, SERVICE, json_error

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("netbootd.http")

#: Bodies read into memory (API JSON) are small; image uploads are streamed instead.
CLIENT_MAX_SIZE = 1024 * 1024
#: Seconds in-flight requests get at stop; the daemon's whole budget is 2 s, ours < 1 s.
SHUTDOWN_TIMEOUT = 0.25  # aiohttp may wait twice (graceful, then cancel): <= 0.5 s


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every failure into a counted, well-formed answer; a bug never kills the server.

    API paths answer errors as JSON ``{"error": ...}`` (also aiohttp's own 404/405).
    """
    ctx = request.app[CONTEXT_KEY]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status in (400, 404, 405, 411, 413, 414, 415, 431):
            ctx.metrics.malformed.labels(SERVICE).inc()
        ctx.metrics.requests.labels(SERVICE, "client_error").inc()
        if request.path.startswith("/api/"):
            resp = json_error(exc.status, exc.reason or "error")
            if "Allow" in exc.headers:  # 405 must say what is allowed (RFC 9110)
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        raise
    except (ConnectionError, TimeoutError):  # client went away mid-answer: not our bug
        raise
    except Exception:
        ctx.metrics.errors.labels(SERVICE).inc()
        ctx.metrics.requests.labels(SERVICE, "error").inc()
        log.exception("http handler failed: %s %s", request.method, request.path)
        return json_error(500, "internal error (logged)")


def build_web_app(ctx: HttpContext) -> web.Application:
    """The aiohttp Application for one daemon."""
    from . import api, metrics, ui  # late: these import pydantic/jinja2 machinery

    web_app = web.Application(middlewares=[guard], client_max_size=CLIENT_MAX_SIZE)
    web_app[CONTEXT_KEY] = ctx
    web_app[files.REFS_KEY] = files.RefCache()
    web_app[boot.SCRIPTS_KEY] = boot.ScriptCache()
    web_app.add_routes(boot.routes())
    web_app.add_routes(files.routes())
    web_app.add_routes(api.routes())
    web_app.add_routes(metrics.routes())
    ui.setup(web_app)
    return web_app


class HttpService:
    """Runs the Application on ``settings.http.bind:port``."""

    name = SERVICE

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self._runner: web.AppRunner | None = None
        self.bound: list[str] = []
        self.error: str | None = None

    async def start(self) -> None:
        s = self.ctx.settings.http
        # The access log costs nothing unless "netbootd.http.access" is enabled at INFO.
        runner = web.AppRunner(build_web_app(self.ctx), handle_signals=False,
                               access_log=logging.getLogger("netbootd.http.access"),
                               shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, host=s.bind or None, port=s.port, reuse_address=True,
                           backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            self.error = f"cannot bind {s.bind or '*'}:{s.port}: {exc.strerror or exc}"
            await runner.cleanup()
            raise RuntimeError(self.error) from exc
        self._runner = runner
        self.bound = [_fmt(sock.getsockname()) for sock in _sockets(runner)]
        log.info("http listening on %s", ", ".join(self.bound))

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.bound = []

    def health(self) -> dict[str, Any]:
        ok = self._runner is not None
        out: dict[str, Any] = {"ok": ok, "bound": list(self.bound)}
        if not ok:
            out["error"] = self.error or "not running"
        return out


def _sockets(runner: web.AppRunner) -> list[Any]:
    out: list[Any] = []
    for site in runner.sites:
        srv = getattr(site, "_server", None)
        out.extend(getattr(srv, "sockets", None) or ())
    return out


def _fmt(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def context_for(app: App) -> HttpContext:
    """The handlers' narrow views of this daemon (the only place that reads the App)."""
    from ..app import AppStatus
    from ..lifecycle import Lifecycle
    from ..views import InventoryNodes, StoreArtefacts, owns_address

    def settings() -> Settings:
        return app.settings

    nodes = InventoryNodes(lambda: app.inventory, app.clients, settings)
    lifecycle = Lifecycle(
        app.node_state, app.planner, app.events,
        node=lambda mac: nodes.view(nodes.facts_for(mac)),
        owns=lambda mac, ip: owns_address(nodes, app.clients, mac, ip),
        refused=app.metrics.requests.labels(SERVICE, "forbidden").inc)
    return HttpContext(
        settings_of=settings, plans=app.planner, nodes=nodes,
        # Before the store is up (or in tests of HTTP alone) the planner's resolver names
        # the versions; both answer ``ref(image, version)``.
        artefacts=StoreArtefacts(lambda: app.store or app.planner.images, lambda: app.render),
        addresses=app.clients, events=app.events, metrics=app.metrics,
        catalogue_of=lambda: app.store, daemon=AppStatus(app), lifecycle=lifecycle,
        node_state=app.node_state)


def create(app: App) -> HttpService:
    return HttpService(context_for(app))
