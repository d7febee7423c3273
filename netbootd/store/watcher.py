"""Watch the incoming/ *directory* and decide when a dropped build is complete.

Measured (watchfiles 1.x on Linux inotify): a directory or file renamed into
incoming/ shows up as one ``added`` event for its top-level name and nothing
else; a file written in place shows ``added`` then a stream of ``modified``
(no close-write event exists); files created inside a directory show as
``added`` on their deep paths. So:

- a ``<name>.ready`` marker makes ``<name>`` due at once;
- a top-level ``added`` with nothing after it looks like a rename drop: due once
  it is *stable*, its fingerprint (type, size, mtime, inode of the entry and,
  for a directory, of everything in it) unchanged over ``settle_seconds``;
- anything written in place (``modified``, or activity below the top level)
  waits for its marker, however quiet it becomes — a slow writer's pause is
  never mistaken for the end of a build.

Events alone cannot tell a rename from a create (both are ``added``), and
inotify misses what is written in a new directory before its watch exists
(a ``mkdir`` + ``manifest.json`` looks like a rename drop), so the stability
check is what keeps a half-written entry out; the intake re-checks the
fingerprint after copying and leaves an entry that changed meanwhile for later.
Entries found by a scan (start-up, rescan) have no event history: they are
taken only once stable too, never "due at once".

Dotfiles, ``*.tmp`` and ``*.partial`` are ignored (a CI's work in progress). A
rescan of incoming/ at start and every ``rescan`` seconds catches what arrived
while the daemon was down or what an overflowing inotify queue dropped.

The channels/ and state directories are watched too: a pointer or pin changed
by the CLI (another process) fires ``on_external_change`` so exports follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from watchfiles import Change, awatch

from .ingest import IngestResult, fingerprint
from .layout import READY_SUFFIX, is_ignored_name
from .store import ImageStore

log = logging.getLogger("netbootd.store.watcher")


class IncomingWatcher:
    """Feeds complete builds from incoming/ to ``store.ingest_entry``, one at a time."""

    def __init__(self, store: ImageStore, *, settle: float = 1.0, rescan: float = 30.0,
                 on_external_change: Callable[[], None] | None = None,
                 on_result: Callable[[IngestResult], None] | None = None) -> None:
        self.store = store
        self.settle = settle
        self.rescan = rescan
        self.on_external_change = on_external_change
        self.on_result = on_result
        #: name -> monotonic time of its last activity
        self.pending: dict[str, float] = {}
        #: names written in place: they wait for their .ready marker
        self.in_place: set[str] = set()
        self.last_result: IngestResult | None = None
        self._warned: set[str] = set()
        #: name -> fingerprint when its quiet window started (None: take one first)
        self._seen: dict[str, tuple | None] = {}
        #: scans of incoming/ done (start-up + rescans; tests wait on it)
        self.scans = 0
        self.ready = asyncio.Event()  #: set once the watch is running (tests wait on it)

    # -- classification (pure, unit-testable) ----------------------------------------------
    def note(self, change: Change, path: Path, now: float) -> bool:
        """Record one event; return True when it was outside incoming/ (pointer/pin)."""
        incoming = self.store.layout.incoming
        try:
            rel = path.relative_to(incoming)
        except ValueError:  # channels/ or the state dir: only pointers and pins matter
            if path.name.startswith("."):
                return False  # temp files of atomic writes
            return path.name == self.store.layout.pins_file.name or \
                self.store.layout.channels in path.parents
        parts = rel.parts
        if not parts:
            return False
        top, deep = parts[0], len(parts) > 1
        if is_ignored_name(top):
            return False
        if top.endswith(READY_SUFFIX):
            if change != Change.deleted and not deep:
                self.pending[top[: -len(READY_SUFFIX)]] = now
            return False
        if change == Change.deleted and not deep:
            self.pending.pop(top, None)
            self.in_place.discard(top)
            self._warned.discard(top)
            self._seen.pop(top, None)
            return False
        if deep or change == Change.modified:
            self.in_place.add(top)
        self.pending[top] = now
        # something happened: the quiet window starts again, from what it looks like now
        self._seen[top] = None if top in self.in_place else fingerprint(incoming / top)
        return False

    def _stable(self, name: str, path: Path, now: float) -> bool:
        """Unchanged over a whole settle window (re-checked each time it is asked)."""
        fp = fingerprint(path)
        if self._seen.get(name) != fp:
            self._seen[name] = fp
            self.pending[name] = now
            return self.settle <= 0
        return now - self.pending[name] >= self.settle

    def due(self, now: float) -> list[str]:
        out = []
        incoming = self.store.layout.incoming
        for name, t in sorted(self.pending.items(), key=lambda kv: kv[1]):
            if not os.path.lexists(incoming / name):
                # gone (ingested, rejected, moved away); events of one batch come as an
                # unordered set, so a late "modified" may have re-added it
                self.pending.pop(name, None)
                self.in_place.discard(name)
                self._seen.pop(name, None)
                continue
            if (incoming / (name + READY_SUFFIX)).exists():
                out.append(name)
            elif name in self.in_place:
                if name not in self._warned and now - t >= max(self.settle, 5.0):
                    self._warned.add(name)
                    log.warning("incoming/%s was written in place; waiting for %s%s "
                                "(or drop builds by rename)", name, name, READY_SUFFIX)
            elif now - t >= self.settle and self._stable(name, incoming / name, now):
                out.append(name)
        return out

    def scan(self, now: float) -> None:
        """Add what is in incoming/ but not known yet (start-up, periodic rescan). Without
        event history nothing says it is complete: it is taken once stable (see ``due``)."""
        self.scans += 1
        incoming = self.store.layout.incoming
        for name in self.store.incoming_candidates():
            if name not in self.pending and name not in self.in_place:
                self.pending[name] = now
                self._seen[name] = fingerprint(incoming / name)

    # -- the loop ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        L = self.store.layout
        self.scan(time.monotonic())
        last_scan = time.monotonic()
        await self._process(time.monotonic(), stop)
        self.ready.set()
        def relevant(_change: Change, path: str) -> bool:
            # state/store/ holds history and booted.json too; only pins.json matters
            p = Path(path)
            return p.parent != L.state_dir or p.name == L.pins_file.name

        async for changes in awatch(L.incoming, L.channels, L.state_dir, stop_event=stop,
                                    watch_filter=relevant, debounce=100, step=50,
                                    rust_timeout=200, yield_on_timeout=True, recursive=True):
            if not L.incoming.is_dir():  # removed under us: inotify then goes silent
                log.warning("%s disappeared; re-creating it and restarting the watch",
                            L.incoming)
                self.ready.clear()
                return
            now = time.monotonic()
            external = False
            for change, p in changes:
                external |= self.note(change, Path(p), now)
            if external and self.on_external_change is not None:
                self.on_external_change()
            if now - last_scan >= self.rescan:
                self.scan(now)
                last_scan = now
            await self._process(now, stop)

    async def _process(self, now: float, stop: asyncio.Event) -> None:
        for name in self.due(now):
            if stop.is_set():
                return
            self.pending.pop(name, None)
            self.in_place.discard(name)
            self._seen.pop(name, None)
            try:
                result = await asyncio.to_thread(self.store.ingest_entry, name)
            except Exception:  # e.g. an I/O error: keep watching, retry on rescan
                log.exception("ingest of incoming/%s failed; it stays there", name)
                continue
            if result is None and not stop.is_set() and \
                    os.path.lexists(self.store.layout.incoming_entry(name)):
                # it changed while the intake read it: watch it settle again
                self.pending[name] = time.monotonic()
                self._seen[name] = None
                continue
            if result is not None:
                self.last_result = result
                if self.on_result is not None:
                    self.on_result(result)
