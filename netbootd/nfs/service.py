"""NFS export management as a daemon service.

Re-applies the desired export set whenever the store changes (``store.on_change``:
ingest, activation, pin, GC, and pointer changes made by the CLI), when the
inventory is reloaded, and every ``REFRESH`` seconds (a node's address may only be
learnt by DHCP after start). Applying is idempotent: backends touch nothing when
the set did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..app import App
from .backends import NfsError, make_backend
from .exports import Export, desired_exports

log = logging.getLogger("netbootd.nfs")

REFRESH = 30.0


class NfsService:
    name = "nfs"

    def __init__(self, app: App) -> None:
        self.app = app
        self.backend: Any = None
        self.exports: list[Export] = []
        self.error: str | None = None
        self.applied_at: float | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.backend = make_backend(self.app.settings)
        if self.app.store is not None:
            self.app.store.on_change.append(self.poke)
        self.app.on_reload.append(self.poke)
        await self.apply()  # errors are reported in health(), the daemon keeps running
        self._task = asyncio.create_task(self._run(), name="nfs-apply")

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.app.store is not None and self.poke in self.app.store.on_change:
            self.app.store.on_change.remove(self.poke)
        if self.poke in self.app.on_reload:
            self.app.on_reload.remove(self.poke)
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

    def desired(self) -> list[Export]:
        app = self.app
        refs = app.store.all_refs() if app.store is not None else []
        nodes = []
        inv = app.inventory
        for mac, node in inv.nodes.items():
            hostname = node.hostname or "node-" + mac.replace(":", "")[6:]
            nodes.append((hostname, node.ip or app.clients.ip_for(mac)))
        return desired_exports(refs, nodes, clients=app.settings.nfs.clients,
                               node_state_dir=app.settings.node_state_dir)

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
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=REFRESH)
            if self._stop.is_set():
                return
            self._wake.clear()
            await asyncio.sleep(0.1)  # coalesce a burst (ingest + activation + GC)
            self._wake.clear()
            await self.apply()


def create(app: App) -> NfsService:
    return NfsService(app)
