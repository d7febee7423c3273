"""NFS export management as a daemon service.

Re-applies the desired export set whenever the store changes (``Versions.subscribe``:
ingest, activation, pin, GC, and pointer changes made by the CLI), when the
inventory is reloaded, when a client address is learnt, and every ``REFRESH`` seconds.
Applying is idempotent: backends touch nothing when the set did not change.

A node's state export is read-write with ``no_root_squash``: whoever it is exported to
can rewrite the node's /var. So it follows an address only with evidence
(docs/security.md): the node's static ``ip`` from nodes.yaml at once; a learnt address
only once the kernel neighbour table confirms it (the site server ACKed it to that
MAC *and* the host at that address has that MAC) and it has stayed the same for
``nfs.state_settle_seconds``. Until a new address qualifies, the export stays where it
was: one overheard (or forged) packet never moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from .backends import NfsError, make_backend
from .exports import Export, desired_exports

if TYPE_CHECKING:
    from ..app import App
    from ..interfaces import Addresses, Nodes, Subscribe, Versions
    from ..settings import Settings

log = logging.getLogger("netbootd.nfs")

REFRESH = 30.0


class NfsService:
    name = "nfs"

    def __init__(self, settings: Settings | Any, *, versions: Versions, nodes: Nodes,
                 addresses: Addresses, on_reload: Subscribe) -> None:
        #: ``settings`` is the Settings value or a callable returning the one in force.
        self._settings = settings if callable(settings) else (lambda: settings)
        self.versions = versions
        self.nodes = nodes
        self.addresses = addresses
        self._subscribe_reload = on_reload
        self._unsubscribe: list[Any] = []
        self.backend: Any = None
        self.exports: list[Export] = []
        self.error: str | None = None
        self.applied_at: float | None = None
        #: mac -> the address its state export follows (confirmed and settled)
        self._pinned: dict[str, str] = {}
        self._next_check: float | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def settings(self) -> Settings:
        return self._settings()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.backend = make_backend(self.settings)
        self._unsubscribe = [self.versions.subscribe(self.poke),
                             self._subscribe_reload(self.poke),
                             self.addresses.subscribe(self.poke)]
        await self.apply()  # errors are reported in health(), the daemon keeps running
        self._task = asyncio.create_task(self._run(), name="nfs-apply")

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 1.0)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    def health(self) -> dict[str, Any]:
        return {"ok": self.error is None, "backend": getattr(self.backend, "name", None),
                "exports": [e.to_dict() for e in self.exports], "error": self.error,
                "applied_at": self.applied_at}

    def poke(self) -> None:
        """Something changed (callable from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def state_address(self, mac: str, static: str | None,
                      confirmed: dict[str, tuple[str, float]], now: float) -> str | None:
        """Where node ``mac``'s read-write state is exported: static, else the last
        address that was confirmed and settled (see the module docstring)."""
        if static:
            return static
        hit = confirmed.get(mac)
        if hit is not None and hit[0] != self._pinned.get(mac):
            ip, since = hit
            settle = self.settings.nfs.state_settle_seconds
            if now - since >= settle:
                if mac in self._pinned:
                    log.info("nfs: state of %s follows its address %s (was %s)", mac, ip,
                             self._pinned[mac])
                self._pinned[mac] = ip
            elif self._next_check is None or since + settle < self._next_check:
                self._next_check = since + settle  # look again when it has settled
        return self._pinned.get(mac)

    def desired(self) -> list[Export]:
        members = list(self.nodes.members())
        confirmed = self.addresses.confirmed(mac for _, mac, static in members if not static)
        now = time.monotonic()
        self._next_check = None
        nodes = [(hostname, self.state_address(mac, static, confirmed, now))
                 for hostname, mac, static in members]
        known = {mac for _, mac, _ in members}
        for mac in [m for m in self._pinned if m not in known]:
            del self._pinned[mac]  # bounded by the inventory
        s = self.settings
        return desired_exports(self.versions.refs(), nodes, clients=s.nfs.clients,
                               node_state_dir=s.node_state_dir)

    def _apply_sync(self) -> tuple[list[Export], bool]:
        want = self.desired()
        for e in want:
            if e.rw:
                e.path.mkdir(parents=True, exist_ok=True)
        changed = self.backend.apply(want)
        return want, changed

    async def apply(self) -> None:
        try:
            want, changed = await asyncio.to_thread(self._apply_sync)
        except (NfsError, OSError) as exc:
            if str(exc) != self.error:
                log.error("nfs exports not applied: %s", exc)
            self.error = str(exc)
            return
        self.exports, self.error, self.applied_at = want, None, time.time()
        if changed:
            log.info("nfs exports applied (%s): %d exports", self.backend.name, len(want),
                     extra={"exports": len(want)})

    async def _run(self) -> None:
        while not self._stop.is_set():
            timeout = REFRESH
            if self._next_check is not None:  # an address is settling: look again then
                timeout = min(REFRESH, max(0.05, self._next_check - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            if self._stop.is_set():
                return
            self._wake.clear()
            await asyncio.sleep(0.1)  # coalesce a burst (ingest + activation + GC)
            self._wake.clear()
            await self.apply()


def create(app: App) -> NfsService:
    """Service factory: the one place that reads the App (narrow views only below)."""
    from ..views import InventoryNodes, StoreVersions, hooks

    return NfsService(lambda: app.settings, versions=StoreVersions(lambda: app.store),
                      nodes=InventoryNodes(lambda: app.inventory, app.clients,
                                           lambda: app.settings),
                      addresses=app.clients, on_reload=hooks(app.on_reload))
