"""Retention: when each version was last used, which versions GC would delete, and GC.

Kept per image: the newest ``store.keep`` versions, anything active on a channel, pinned,
in ``in_use`` (open boot sessions, inventory pins: the daemon knows them), or used within
``store.keep_booted_hours``. "Used" is recorded by :meth:`Retention.mark_used` -- when a
boot session starts or a boot event names a version -- never by merely resolving what a
machine would get, so asking (CLI ``plan``, the API, the status page) cannot keep a
version alive. Last-used times are persisted to booted.json (the daemon flushes them
every 30 s), so a GC after a restart still honours the window.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..settings import StoreSettings
from .catalogue import Versions
from .layout import Layout, fsync_dir, read_json, remove_tree, write_json_atomic
from .objects import Pool
from .pins import Pins
from .pointers import Channels
from .signals import Signals
from .writer import WriterLock

log = logging.getLogger("netbootd.store")

#: Last-used times closer than this are not worth a booted.json rewrite.
MARK_RESOLUTION = 60.0


class Retention:
    """Last-used times and garbage collection of one store."""

    def __init__(self, layout: Layout, versions: Versions, channels: Channels, pins: Pins,
                 settings: StoreSettings, signals: Signals, writer: WriterLock,
                 lock: threading.RLock, pool: Pool) -> None:
        self.layout = layout
        self.pool = pool
        self.versions = versions
        self.channels = channels
        self.pins = pins
        self.settings = settings
        self.signals = signals
        self.writer = writer
        self._lock = lock
        self._used: dict[str, float] = {
            k: float(v) for k, v in _read_used(layout).items()}
        #: True when last-used times changed since the last :meth:`flush`.
        self.dirty = False

    def mark_used(self, image: str, version: str) -> None:
        """A boot uses this version now: keep it through the ``keep_booted_hours`` window."""
        now = time.time()
        key = _key(image, version)
        with self._lock:
            if now - self._used.get(key, 0.0) >= MARK_RESOLUTION:
                self.dirty = True
            self._used[key] = now

    def flush(self) -> None:
        """Persist last-used times, merged with what other processes wrote."""
        with self._lock:
            merged = {**_read_used(self.layout), **self._used}
            self._used = {k: v for k, v in merged.items()
                          if self.layout.version_dir(*k.split("/", 1)).is_dir()}  # GC'd go
            write_json_atomic(self.layout.booted_file, self._used)
            self.dirty = False

    def recently_used(self) -> set[tuple[str, str]]:
        """Versions this store saw used within ``keep_booted_hours`` (booted.json and the
        marks not flushed yet): what another replica's GC decision must also keep."""
        window = self.settings.keep_booted_hours * 3600
        now = time.time()
        with self._lock:
            used = {**_read_used(self.layout), **self._used}
        out = set()
        for key, last in used.items():
            image, _, version = key.partition("/")
            if now - last < window:
                out.add((image, version))
        return out

    def plan(self, in_use: set[tuple[str, str]] = frozenset(),
             only: set[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """Versions GC would delete: not among the newest ``keep``, not active, not
        pinned, not in ``in_use``, not used within ``keep_booted_hours``, and (when
        ``only`` is given: the cluster's shared decision) in ``only``. No side effects."""
        window = self.settings.keep_booted_hours * 3600
        now = time.time()
        with self._lock:
            used = {**_read_used(self.layout), **self._used}
        victims = []
        for image in self.versions.images():
            versions = self.versions.versions(image)
            active = set(self.channels.channels(image).values())
            pinned = self.pins.pinned_versions(image)
            newest = set(versions[-self.settings.keep:])  # keep >= 1 (settings)
            for v in versions:
                if v in newest or v in active or v in pinned or (image, v) in in_use:
                    continue
                if only is not None and (image, v) not in only:
                    continue
                last = used.get(_key(image, v))
                if last is not None and now - last < window:
                    continue
                victims.append((image, v))
        return victims

    def gc(self, *, dry_run: bool = False, in_use: set[tuple[str, str]] = frozenset(),
           only: set[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """Delete versions not kept (see :meth:`plan`); ``dry_run`` only lists them.

        Needs the writer lock (a daemon's GC and a CLI's must not rename the same version
        away twice): :class:`StoreLocked` when a daemon owns the store. A version is first
        renamed out of store/ (invisible at once, atomically), then listeners re-apply
        exports, then its files are deleted, then the pool's objects no remaining version
        links (a crash in between leaves them to recovery's sweep).
        """
        if dry_run:
            return self.plan(in_use, only)
        with self.writer.held("gc"):
            with self._lock:
                victims = self.plan(in_use, only)
                if not victims:
                    return victims
                trash: list[Path] = []
                for image, version in victims:
                    src = self.layout.version_dir(image, version)
                    dst = self.layout.new_stage(f"gc-{image}-{version}-")
                    os.rename(src, dst / "v")
                    self.versions.forget(image, version)
                    self._used.pop(_key(image, version), None)
                    trash.append(dst)
                    fsync_dir(src.parent)
                    log.info("gc: deleted %s %s", image, version)
            self.signals.changed()
            for d in trash:
                remove_tree(d)
            self.pool.sweep()
        for image, version in victims:
            self.signals.event(f"deleted {image} {version}", image=image, version=version,
                               outcome="deleted")
        return victims


def _key(image: str, version: str) -> str:
    return f"{image}/{version}"


def _read_used(layout: Layout) -> dict[str, float]:
    data = read_json(layout.booted_file, {})
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(k, str) and k.count("/") == 1 and isinstance(v, (int, float))}
