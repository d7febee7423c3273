"""The store as a daemon service: recovery, incoming/ watch, periodic GC.

Started first (SERVICE_FACTORIES order): it sets ``app.store`` and makes the
store the planner's resolver before any protocol service answers a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..app import App
from .store import ImageStore
from .watcher import IncomingWatcher

log = logging.getLogger("netbootd.store.service")

#: Event kinds that prove a node is running (or loading) a version: retention keeps it.
BOOT_EVENT_KINDS = frozenset({"tftp", "http", "kernel", "booted", "provisioned", "installed",
                              "joined"})


class StoreService:
    """Owns the ImageStore of one daemon."""

    name = "store"

    def __init__(self, app: App) -> None:
        self.app = app
        self.store: ImageStore | None = None
        self.watcher: IncomingWatcher | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_gc: dict[str, Any] | None = None
        self._recovered: list[str] = []

    async def start(self) -> None:
        # watchfiles logs every batch ("3 changes detected") at INFO: one line per CI drop
        # file event is noise in a daemon log; our own log says what was ingested.
        logging.getLogger("watchfiles.main").setLevel(logging.WARNING)
        s = self.app.settings
        # The daemon is the store's one writer for its whole life: a second daemon on the
        # same images directory fails here (StoreLocked names this one's pid).
        store = ImageStore(s.paths.images, s.paths.state, s.store, events=self.app.events,
                           metrics=self.app.metrics, writer=True,
                           shared=self.app.cluster.store_state()
                           if self.app.cluster is not None else None)
        try:
            self._recovered = await asyncio.to_thread(store.recover)
        except BaseException:
            store.close()
            raise
        self.store = store
        self.app.store = store
        self.app.planner.images = store
        # An activation, pin or ingest must reach a machine that was told "nothing to boot"
        # a moment ago at its very next request.
        store.on_change.append(self.app.planner.changed)
        store.in_use_hook = self.in_use
        self.app.events.subscribe(self._on_event)
        self.watcher = IncomingWatcher(store, settle=s.store.settle_seconds,
                                       on_external_change=store.notify_changed)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._watch_loop(), name="store-watch"),
                       asyncio.create_task(self._gc_loop(), name="store-gc")]
        log.info("image store at %s: %d images, watching %s", s.paths.images,
                 len(store.images()), store.layout.incoming)

    async def stop(self) -> None:
        if self.store is not None:
            self.store.cancel.set()  # a running ingest stops at its next chunk
        self._stop.set()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=1.0)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(t, 0.3)
        self._tasks = []
        if self.store is not None:
            with contextlib.suppress(OSError):
                self.store.flush_booted()
            self.store.close()

    def health(self) -> dict[str, Any]:
        st = self.store
        if st is None:
            return {"ok": False, "error": "not started"}
        w = self.watcher
        return {
            "ok": bool(self._tasks) and all(not t.done() for t in self._tasks)
            and (w is None or w.ready.is_set()),
            "images": len(st.images()),
            "pending": sorted(w.pending) if w else [],
            "waiting_for_marker": sorted(w.in_place) if w else [],
            "last_ingest": w.last_result.to_dict() if w and w.last_result else None,
            "rejected": len(st.rejected()),
            "last_gc": self._last_gc,
            "recovered": self._recovered,
        }

    # -- internals ---------------------------------------------------------------------------
    def _on_event(self, ev: Any) -> None:
        if self.store is None or ev.kind not in BOOT_EVENT_KINDS:
            return
        image, version = ev.fields.get("image"), ev.fields.get("version")
        if image and version:
            self.store.mark_used(str(image), str(version))

    def in_use(self) -> set[tuple[str, str]]:
        """Versions GC must keep besides its own rules: open boot sessions and
        inventory pins (the inventory may pin any image; keep that version everywhere)."""
        used = set(self.app.planner.versions_in_use())
        pins = {n.pin for n in self.app.inventory.nodes.values() if n.pin}
        if pins and self.store is not None:
            for image in self.store.images():
                used.update((image, p) for p in pins)
        return used

    async def _watch_loop(self) -> None:
        """Run the watcher; if it dies (incoming/ removed, inotify limits), recreate the
        layout and restart it after a pause instead of silently never ingesting again."""
        assert self.watcher is not None and self.store is not None
        while not self._stop.is_set():
            try:
                await self.watcher.run(self._stop)
                if not self._stop.is_set():  # incoming/ vanished: re-create, watch again
                    await asyncio.sleep(0.5)
                    self.store.layout.ensure()
            except Exception:  # keep ingesting whatever went wrong once
                log.exception("incoming/ watch failed; restarting in 5 s")
                self.watcher.ready.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=5.0)
                with contextlib.suppress(OSError):
                    self.store.layout.ensure()

    async def run_gc(self, *, dry_run: bool = False) -> list[tuple[str, str]]:
        """One GC pass. With replicas the cluster's leader decides what is retired and
        prunes the shared history; every replica deletes its own copies and prunes its
        own rejected builds (docs/replicas.md)."""
        assert self.store is not None
        cluster = self.app.cluster
        if cluster is None:
            victims = await asyncio.to_thread(self.store.gc, dry_run=dry_run,
                                              in_use=self.in_use())
        elif cluster.gc is None:  # the cluster service has not started (yet)
            victims = []
        else:
            victims = await asyncio.to_thread(cluster.gc.run, self.store, dry_run=dry_run)
        await asyncio.to_thread(self.store.prune_rejected,
                                self.app.settings.store.keep_rejected, dry_run=dry_run)
        if cluster is None or (cluster.leadership is not None
                               and cluster.leadership.is_leader):
            await asyncio.to_thread(self.store.prune_history,
                                    self.app.settings.store.keep_history, dry_run=dry_run)
        await asyncio.to_thread(self.store.flush_booted)
        self._last_gc = {"when": time.time(), "deleted": [list(v) for v in victims],
                         "dry_run": dry_run}
        return victims

    async def _gc_loop(self) -> None:
        """GC every ``gc_interval``; persist "last used" times every 30 s, so a CLI ``gc``
        in another process also keeps what the daemon just planned boots with."""
        interval = self.app.settings.store.gc_interval
        next_gc = time.monotonic() + interval
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=min(30.0, interval))
            if self._stop.is_set():
                return
            try:
                if time.monotonic() >= next_gc:
                    next_gc = time.monotonic() + interval
                    await self.run_gc()
                elif self.store is not None and self.store.booted_dirty:
                    await asyncio.to_thread(self.store.flush_booted)
            except Exception:  # GC must never take the daemon down
                log.exception("retention GC failed")


def create(app: App) -> StoreService:
    return StoreService(app)
