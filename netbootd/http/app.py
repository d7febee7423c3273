"""The HTTP service: one aiohttp Application with the boot chain, files, cloud-init,
the REST API, metrics/health and the status page.

``create(app)`` is the factory the daemon calls (SERVICE_FACTORIES), and the one
place in this package that reads the daemon's ``App``: it builds the handlers'
narrow ``HttpContext`` from it. The Application itself is built by
:func:`build_web_app` from that context.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..settings import Settings
from . import boot, files, rpiboot
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
    from . import api, matchbox, metrics, ui  # late: these import pydantic/jinja2 machinery

    web_app = web.Application(middlewares=[guard], client_max_size=CLIENT_MAX_SIZE)
    web_app[CONTEXT_KEY] = ctx
    web_app[files.REFS_KEY] = files.RefCache()
    web_app[boot.SCRIPTS_KEY] = boot.ScriptCache()
    web_app.add_routes(boot.routes())
    web_app.add_routes(files.routes())
    web_app.add_routes(matchbox.routes())
    web_app.add_routes(api.routes())
    web_app.add_routes(metrics.routes())
    if ctx.settings.cluster.backend == "etcd":  # replicas copy builds from each other
        from . import peers

        web_app.add_routes(peers.routes())
    ui.setup(web_app)
    # last: its pattern (/<path>/boot.img) must never shadow a route above
    web_app[rpiboot.PREBUILDER_KEY] = rpiboot.Prebuilder(ctx)
    web_app.add_routes(rpiboot.routes())
    return web_app


#: What a connection over ``http.max_connections`` gets before it is closed.
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
         b"Connection: close\r\nRetry-After: 1\r\n\r\n")


def connection_cap(configured: int) -> int:
    """``http.max_connections``, but at most half the open-file limit: the other half is
    for TFTP transfers, the store and the event files, which share the process's table."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return configured
    return max(1, min(configured, soft // 2))


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a short 503, closed at once, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            transport.write(_BUSY)  # type: ignore[attr-defined]
        finally:
            transport.close()


class CappedSite(web.TCPSite):
    """A TCP site that admits at most ``cap`` connections at a time.

    The cap is applied where the connection is accepted (the protocol factory), so a
    connection beyond it costs one write and a close, and never a request handler.
    The count is kept here, not read from aiohttp's connection list: asyncio accepts a
    whole backlog of connections, calling the factory for each, before any of them is
    registered there.
    """

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *, cap: int,
                 backlog: int = 1024) -> None:
        super().__init__(runner, host, port, reuse_address=True, backlog=backlog)
        self.cap = cap
        self.open = 0  #: connections admitted and not yet closed
        self.refused = 0

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if self.open >= self.cap:
            self.refused += 1
            return _Refuse()
        self.open += 1
        return server()

    async def start(self) -> None:
        server = self._runner.server
        assert server is not None
        lost = server.connection_lost

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self.open = max(0, self.open - 1)
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign]
        self._runner._reg_site(self)  # BaseSite.start; TCPSite's own would bind unguarded
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address)
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]


class _ConnectionMetrics:
    """netbootd_http_connections{,_refused} from the running site."""

    def __init__(self, service: HttpService) -> None:
        self._service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        site = self._service.site
        open_now = site.open if site else 0
        yield GaugeMetricFamily("netbootd_http_connections", "Open HTTP connections",
                                value=open_now)
        yield CounterMetricFamily(
            "netbootd_http_connections_refused",
            "HTTP connections closed at once because http.max_connections were open",
            value=site.refused if site else 0)

    def describe(self) -> list[Any]:
        return []


class HttpService:
    """Runs the Application on ``settings.http.bind:port``."""

    name = SERVICE

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self._runner: web.AppRunner | None = None
        self.site: CappedSite | None = None
        self.bound: list[str] = []
        self.error: str | None = None
        self._collector: _ConnectionMetrics | None = None
        self._unsubscribe: list[Any] = []
        self._prebuilder: rpiboot.Prebuilder | None = None

    async def start(self) -> None:
        s = self.ctx.settings.http
        # The access log costs nothing unless "netbootd.http.access" is enabled at INFO.
        # keepalive_timeout: aiohttp closes a connection that has no complete request head
        # this long after it opened or after its last response, which covers idle
        # keep-alive connections and clients trickling their headers (slow-header).
        runner = web.AppRunner(build_web_app(self.ctx), handle_signals=False,
                               access_log=logging.getLogger("netbootd.http.access"),
                               shutdown_timeout=SHUTDOWN_TIMEOUT,
                               keepalive_timeout=s.idle_timeout)
        await runner.setup()
        site = CappedSite(runner, s.bind or None, s.port, cap=connection_cap(s.max_connections))
        try:
            await site.start()
        except OSError as exc:
            self.error = f"cannot bind {s.bind or '*'}:{s.port}: {exc.strerror or exc}"
            await runner.cleanup()
            raise RuntimeError(self.error) from exc
        self._runner, self.site = runner, site
        if self._collector is None:
            self._collector = _ConnectionMetrics(self)
            self.ctx.metrics.registry.register(self._collector)
        self.bound = [_fmt(sock.getsockname()) for sock in _sockets(runner)]
        prebuilder = runner.app[rpiboot.PREBUILDER_KEY]
        self._prebuilder = prebuilder
        if self.ctx.versions is not None:
            self._unsubscribe.append(self.ctx.versions.subscribe(prebuilder.changed))
        if self.ctx.on_reload is not None:
            self._unsubscribe.append(self.ctx.on_reload(prebuilder.changed))
        prebuilder.start(asyncio.get_running_loop())
        log.info("http listening on %s (at most %d connections)", ", ".join(self.bound),
                 site.cap)

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._prebuilder is not None:
            await self._prebuilder.stop()
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
    from ..rpi.bootimg import BootImages
    from ..views import InventoryNodes, StoreArtefacts, StoreVersions, hooks

    def settings() -> Settings:
        return app.settings

    nodes = InventoryNodes(lambda: app.inventory, app.clients, settings)
    lifecycle = Lifecycle(
        app.node_state, app.planner, app.events,
        node=lambda mac: nodes.view(nodes.facts_for(mac)),
        owns=nodes.owns,
        refused=app.metrics.requests.labels(SERVICE, "forbidden").inc)
    return HttpContext(
        settings_of=settings, plans=app.planner, nodes=nodes,
        # Before the store is up (or in tests of HTTP alone) the planner's resolver names
        # the versions; both answer ``ref(image, version)``.
        artefacts=StoreArtefacts(lambda: app.store or app.planner.images, lambda: app.render),
        addresses=app.clients, events=app.events, metrics=app.metrics,
        catalogue_of=lambda: app.store, daemon=AppStatus(app), lifecycle=lifecycle,
        node_state=app.node_state, boot_images=BootImages(settings),
        versions=StoreVersions(lambda: app.store), on_reload=hooks(app.on_reload),
        gc_pass=lambda dry_run: (app.services["store"].run_gc(dry_run=dry_run)
                                 if "store" in app.services else None))


def create(app: App) -> HttpService:
    return HttpService(context_for(app))
