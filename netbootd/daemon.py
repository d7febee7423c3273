"""Wires the services together: build the App, start services in order, reload, stop.

Start order is the registry order (store first: the planner needs images
before the protocol servers answer). A service that fails to start is
reported and the others keep running: a DHCP port already taken must not take
HTTP down with it. SIGTERM/SIGINT stop everything within 2 s; SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from typing import Any

from .app import App, enabled_services, load_factory
from .cluster import open_cluster
from .events import EventLog, EventTableCollector
from .inventory import Inventory
from .metrics import Metrics
from .neighbours import ClientAddresses
from .nodestate import LocalNodeState
from .planner import NoImages, Planner
from .reload import check_started_config, load_config, reload_now, validate_config, watch_config
from .render import Renderer
from .rpi.bootimg import token_hook
from .settings import Settings

log = logging.getLogger("netbootd.daemon")

STOP_BUDGET = 1.5  # seconds for all services together; the contract is 2 s


def build_app(settings: Settings, *, inventory: Inventory | None = None,
              check_later: bool = False) -> App:
    """The App for these settings; raises ``ConfigError`` if inventory/templates are bad.

    ``check_later`` (``netbootd serve``): nodes.yaml is parsed and validated now, but the
    render check of every node's templates is left to ``serve``, which runs it once the
    services answer (``app.config_pending`` until then)."""
    holder: dict[str, Any] = {}
    cluster = open_cluster(settings)  # None on cluster.backend: local
    state = cluster.node_state if cluster is not None else \
        LocalNodeState(settings.lifecycle_dir, max_nodes=settings.provision.max_nodes)
    planner = Planner(lambda: holder["app"].settings, lambda: holder["app"].inventory, NoImages(),
                      state=state)
    metrics = Metrics()
    app = App(
        settings=settings,
        inventory=inventory or Inventory.empty(),
        planner=planner,
        render=Renderer(settings),
        events=EventLog(settings.paths.state, max_nodes=settings.events.max_nodes,
                        ignored_sample=settings.events.ignored_sample),
        metrics=metrics,
        clients=ClientAddresses(max_entries=settings.network.max_addresses,
                                evicted=metrics.table_evictions.labels("addresses").inc),
    )
    holder["app"] = app
    app.metrics.registry.register(EventTableCollector(app.events))
    # who is in the fleet: inventory nodes, or every machine when unknown ones are booted
    app.events.fleet = lambda mac: (app.settings.policy.unknown == "default"
                                    or mac in app.inventory.nodes)
    app.node_state = state
    app.cluster = cluster
    if cluster is not None:
        cluster.share_sessions(planner, lambda: app.settings.boot)
        planner.count_deferred = metrics.unknown_boots_deferred.inc
        from .cluster.events import SharedEventsCollector

        app.metrics.registry.register(
            SharedEventsCollector(cluster.share_events(app.events, settings)))
    # A Pi on HTTP boot gets a boot token stable per version, so its signed boot.img
    # can be built before it asks (netbootd/rpi/bootimg.py).
    planner.token_for = token_hook(lambda: app.settings)
    app.reload = lambda: reload_now(app)
    if inventory is None and check_later:
        # the first load starts from the snapshot the last start saved (inventorycache.py)
        app.inventory_loader.snapshot = settings.paths.state / app.inventory_loader.SNAPSHOT_NAME
        app.inventory, app.render = load_config(app)
        app.config_pending = "templates not yet checked for every node"
    elif inventory is None:
        app.inventory, app.render = validate_config(app)
    app.events.subscribe(_count_phase(app))
    return app


def _count_phase(app: App):
    def on_event(ev: Any) -> None:
        phases = ("dhcp", "kernel", "booted", "provisioned", "installed", "joined", "failed")
        if ev.kind in phases and ev.fields.get("outcome", "ok") == "ok":
            app.metrics.boots.labels(ev.kind).inc()
    return on_event


async def follow_operator_verbs(app: App) -> None:
    """An operator's ``netbootd nodes reinstall|local|netboot`` (another process) takes
    effect at the node's next request: its open sessions are dropped. The daemon's own
    writes (a node's reports, ``by: node``) must not drop the session they belong to."""
    seen: dict[str, int] = {}
    try:
        async for mac in app.node_state.watch():
            rec = app.node_state.get(mac)
            if rec is None or rec.by == "node" or seen.get(mac) == rec.rev:
                continue
            if len(seen) > 10_000:
                seen.clear()
            seen[mac] = rec.rev
            app.planner.forget(mac)
            log.info("lifecycle of %s changed by %s: %s", mac, rec.by, rec.stage.value)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("lifecycle watch stopped")


def _logged(fn: Any, name: str) -> Any:
    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("warm-up of service %s failed", name)
    return run


class Daemon:
    """Runs the enabled services of one App until stopped."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.failed: dict[str, str] = {}

    async def start(self) -> None:
        for name in enabled_services(self.app.settings):
            try:
                factory = load_factory(name)
                if factory is None:
                    continue
                service = factory(self.app)
                await service.start()
            except Exception as exc:  # noqa: BLE001 - report and keep the others running
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                log.error("service %s failed to start: %s", name, self.failed[name])
                self.app.events.record("failed", None, f"service {name} failed to start",
                                       service=name, error=self.failed[name])
                continue
            self.app.services[name] = service
            log.info("service %s started", name)
        for name, service in list(self.app.services.items()):
            warm_up = getattr(service, "warm_up", None)
            if callable(warm_up):  # a daemon thread: a stop never waits for it
                threading.Thread(target=_logged(warm_up, name), name=f"{name}-warm-up",
                                 daemon=True).start()
        self._tasks.append(asyncio.create_task(watch_config(self.app, self._stop),
                                               name="config-watch"))
        self._tasks.append(asyncio.create_task(follow_operator_verbs(self.app),
                                               name="lifecycle-watch"))

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        asyncio.get_running_loop().run_in_executor(None, reload_now, self.app)

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        services = list(self.app.services.items())[::-1]

        async def stop_one(name: str, svc: Any) -> None:
            try:
                await svc.stop()
            except Exception:
                log.exception("service %s failed to stop cleanly", name)

        if services:
            _done, pending = await asyncio.wait(
                [asyncio.create_task(stop_one(n, s)) for n, s in services], timeout=STOP_BUDGET)
            for t in pending:
                t.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.app.services.clear()
        self.app.events.close()
        if self.app.cluster is not None:
            self.app.cluster.close()


#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once the services are up: freeze what start-up made and collect the young
    generation less often.

    Why: everything loaded at start (scapy's layer tables, pydantic schemas, aiohttp)
    is permanent, yet every full collection walks it again, and the per-packet paths
    (proxy-DHCP, TFTP) each allocate a few short-lived tuples, so with the default
    threshold the collector ran dozens of times a second under load. ``gc.freeze()``
    takes the start-up objects out of its view (the pattern CPython's docs give for
    long-running servers) and a higher first threshold makes the young collections
    rarer; memory is unaffected (refcounting frees the short-lived objects, the
    collector only finds cycles). Measured with bench/dhcp_bench.py: see
    docs/benchmarks.md.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class QuietExceptionHandler:
    """The loop's exception handler, logging each kind of message at most once per
    ``interval`` seconds with a count of what it held back.

    Why: when descriptors run out, asyncio reports every failed ``accept()`` through
    the loop's handler with a traceback; slow HTTP clients once made that 204,793
    tracebacks in 18 s, which cost more than the flood itself and buried everything
    else in the log.
    """

    def __init__(self, interval: float = 10.0, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        key = f"{context.get('message', '')}|{type(exc).__name__ if exc else ''}"
        key += f"|{getattr(exc, 'errno', '')}"
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        if len(self._last) > 1024:  # bounded: old kinds are forgotten
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            context = dict(context)
            context["message"] = (f"{context.get('message', '')} (and {held} more like it "
                                  f"in the last {self.interval:.0f} s, not logged)")
        loop.default_exception_handler(context)


async def serve(app: App) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config."""
    daemon = Daemon(app)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(QuietExceptionHandler())
    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGINT, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    await daemon.start()
    if daemon.failed and not app.services:
        log.error("no service could start: %s", daemon.failed)
        await daemon.stop()
        return 1
    settle_heap()
    log.info("netbootd serving: %s", ", ".join(app.services))
    rejected: list[str] = []
    if app.config_pending:
        # every node's templates rendered once, in a thread, while the services answer
        # (a daemon thread: a stop never waits for it); a config that fails stops the
        # daemon, as it would have refused to start
        def check() -> None:
            problems = check_started_config(app)
            if problems:
                rejected.append(problems)
                loop.call_soon_threadsafe(daemon.request_stop)

        threading.Thread(target=check, name="config-check", daemon=True).start()
    await daemon.wait()
    log.info("stopping")
    await daemon.stop()
    return 1 if rejected else 0
