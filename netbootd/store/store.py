"""The image store: one facade over the parts that each do one job.

=================  ==============================================================
``catalogue``      promoted versions: manifests, ImageRefs, images, versions (read)
``pointers``       channel pointers, activation, rollback, history
``pins``           per-MAC pins
``retention``      last-used times, the GC plan, GC
``recovery``       start-up repair after a crash
``intake``         ingest orchestration: incoming/ or upload -> store/ or rejected/
``rejects``        the rejected/ directory
``objects``        the content pool: versions share equal files by hard links
``usage``          logical and physical bytes per image and for the store
``lookup``         resolve (pure) and the overview listing
``writer``         one writer per store (``writer.lock``)
``layout``         every path, and durable writes
=================  ==============================================================

State is the file system, re-read cheaply on every call (matchbox's file store): the
CLI can change a pointer or a pin while the daemon runs, and the daemon sees it on its
next resolve. Thread-safe: TFTP/HTTP threads call ``resolve``, ingest runs in a worker
thread. :class:`ImageStore` keeps the method names the CLI, API, NFS and the store
service have always used; it adds no behaviour of its own beyond wiring.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from ..model import ImageRef
from ..settings import StoreSettings
from . import lookup
from .catalogue import Versions
from .errors import StoreError, StoreLocked
from .ingest import IngestResult
from .intake import Intake
from .layout import Layout
from .lookup import LIST_HISTORY
from .manifest import Manifest
from .objects import Pool
from .pins import Pins
from .pointers import Channels
from .recovery import recover
from .rejects import Rejects
from .retention import Retention
from .signals import Signals
from .usage import Usage
from .writer import WriterLock

__all__ = ["LIST_HISTORY", "ImageStore", "StoreError", "StoreLocked"]


class ImageStore:
    """One image store on disk (see layout.py for the directory structure).

    ``writer=True`` (the daemon) makes this store the one writer of the images
    directory for its lifetime, until :meth:`close`; a second writer gets
    :class:`StoreLocked` naming the holder's pid. Without it (the CLI, tests, tools),
    reading and pointer/pin edits need no lock, and ingest, recovery and GC take the
    writer lock only while they run (refused while a daemon holds it).
    """

    def __init__(self, images_root: Path, state_dir: Path, settings: StoreSettings, *,
                 events: Any = None, metrics: Any = None, writer: bool = False,
                 shared: Any = None) -> None:
        self.layout = Layout(Path(images_root), Path(state_dir))
        self.layout.ensure()
        self.settings = settings
        self.signals = Signals(events, metrics)
        self.writer = WriterLock(self.layout.writer_lock)
        if writer:
            self.writer.acquire("daemon")
        lock = threading.RLock()
        #: Set to make a running ingest stop at its next chunk (daemon shutdown).
        self.cancel = threading.Event()
        self.pool = Pool(self.layout.objects)
        self.catalogue = Versions(self.layout, lock)
        # The one seam for replicas (cluster.backend: etcd): ``shared`` builds channels and
        # pins whose state lives in etcd (cluster/pointers.py); the bytes stay here.
        make_channels = shared.channels if shared is not None else Channels
        make_pins = shared.pins if shared is not None else Pins
        self.pointers = make_channels(self.layout, self.catalogue, self.signals, lock)
        self.pinboard = make_pins(self.layout, self.catalogue, self.signals, lock)
        self.retention = Retention(self.layout, self.catalogue, self.pointers, self.pinboard,
                                   settings, self.signals, self.writer, lock, self.pool)
        self.usage = Usage(self.layout, self.catalogue)
        self.rejects = Rejects(self.layout)
        self.intake = Intake(self.layout, self.catalogue, self.pointers, self.rejects,
                             settings, self.signals, self.writer, self.cancel, self.pool)
        if metrics is not None:  # /metrics reads the store's bytes at each scrape
            metrics.store_bytes.source = self.usage.report
        #: Versions the daemon knows are in use (boot sessions, inventory pins); every GC
        #: keeps them, whoever calls it (API, service). Set by the store service.
        self.in_use_hook: Callable[[], set[tuple[str, str]]] | None = None

    def close(self) -> None:
        """Give up the writer lock (the daemon stopping); reading still works."""
        self.writer.release()

    # -- listeners, events, metrics -----------------------------------------------------------
    @property
    def on_change(self) -> list[Callable[[], None]]:
        """Listeners called (no arguments, any thread) after every change; append to it."""
        return self.signals.on_change

    @property
    def events(self) -> Any:
        return self.signals.events

    @property
    def metrics(self) -> Any:
        return self.signals.metrics

    def notify_changed(self) -> None:
        """Tell listeners the store changed (also for changes another process made)."""
        self.signals.changed()

    # -- reading --------------------------------------------------------------------------------
    def manifest(self, image: str, version: str) -> Manifest | None:
        return self.catalogue.manifest(image, version)

    def ref(self, image: str, version: str) -> ImageRef | None:
        return self.catalogue.ref(image, version)

    def images(self) -> list[str]:
        return self.catalogue.images()

    def versions(self, image: str) -> list[str]:
        return self.catalogue.versions(image)

    def all_refs(self) -> list[ImageRef]:
        return self.catalogue.all_refs()

    def active(self, image: str, channel: str) -> str | None:
        return self.pointers.active(image, channel)

    def channels(self, image: str) -> dict[str, str]:
        return self.pointers.channels(image)

    def history(self, image: str | None = None) -> list[dict]:
        return self.pointers.history(image)

    def pins(self) -> dict[str, dict]:
        return self.pinboard.pins()

    def rejected(self) -> list[dict]:
        return self.rejects.list()

    def list_images(self) -> list[dict]:
        return lookup.overview(self.catalogue, self.pointers, self.pinboard,
                               self.usage.report())

    def bytes_used(self) -> dict[str, int]:
        """The whole store: ``logical_bytes`` (every version a full tree) and
        ``physical_bytes`` (each file shared through the content pool counted once)."""
        return self.usage.report().total.to_dict()

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        """The planner's ImageResolver. Pure: records nothing (see :meth:`mark_used`)."""
        return lookup.resolve(self.catalogue, self.pointers, self.pinboard, image, channel, pin,
                              mac=mac)

    # -- pointers and pins ----------------------------------------------------------------------
    def activate(self, image: str, version: str, channel: str, *, by: str = "cli",
                 why: str = "") -> None:
        self.pointers.activate(image, version, channel, by=by, why=why)

    def rollback(self, image: str, channel: str, *, by: str = "cli") -> str:
        return self.pointers.rollback(image, channel, by=by)

    def prune_history(self, keep: int, *, dry_run: bool = False) -> int:
        return self.pointers.prune_history(keep, dry_run=dry_run)

    def pin(self, mac: str, version: str, image: str | None = None, *, by: str = "cli") -> None:
        self.pinboard.pin(mac, version, image, by=by)

    def unpin(self, mac: str) -> None:
        self.pinboard.unpin(mac)

    # -- retention -------------------------------------------------------------------------------
    def mark_used(self, image: str, version: str) -> None:
        """A boot session on this version started (or a boot event named it): GC keeps
        it for ``store.keep_booted_hours``."""
        self.retention.mark_used(image, version)

    @property
    def booted_dirty(self) -> bool:
        """Last-used times changed since the last :meth:`flush_booted`."""
        return self.retention.dirty

    def flush_booted(self) -> None:
        self.retention.flush()

    def gc_plan(self, in_use: set[tuple[str, str]] = frozenset()) -> list[tuple[str, str]]:
        return self.retention.plan(in_use)

    def gc(self, *, dry_run: bool = False, in_use: set[tuple[str, str]] = frozenset(),
           only: set[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """Delete versions retention does not keep (``in_use`` plus the daemon's hook);
        with ``only`` (the versions a cluster's leader retired), none outside it."""
        return self.retention.gc(dry_run=dry_run, in_use=self.kept_in_use(in_use), only=only)

    def kept_in_use(self, in_use: set[tuple[str, str]] = frozenset()
                    ) -> set[tuple[str, str]]:
        """``in_use`` plus what the daemon's hook says is in use (sessions, pins)."""
        keep = set(in_use)
        if self.in_use_hook is not None:
            keep |= set(self.in_use_hook())
        return keep

    def kept_for_use(self) -> set[tuple[str, str]]:
        """Versions this replica keeps because they are used (open sessions, inventory
        pins, booted within the window): published so the cluster's GC decision keeps
        them too."""
        return self.kept_in_use() | self.retention.recently_used()

    def prune_rejected(self, keep: int, *, dry_run: bool = False) -> list[str]:
        return self.rejects.prune(keep, dry_run=dry_run)

    # -- recovery and ingest ---------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Start-up repair (the daemon, before it watches incoming/); needs the writer lock."""
        with self.writer.held("recovery"):
            return recover(self.layout, self.catalogue, self.pointers, self.pool)

    def incoming_candidates(self) -> list[str]:
        return self.intake.candidates()

    def ingest_entry(self, name: str, *, expect: tuple[str, str] | None = None
                     ) -> IngestResult | None:
        return self.intake.ingest_entry(name, expect=expect)

    async def ingest_upload(self, name: str, version: str,
                            stream: BinaryIO | AsyncIterator[bytes] | Iterable[bytes],
                            *, max_bytes: int | None = None) -> dict[str, Any]:
        return await self.intake.ingest_upload(name, version, stream, max_bytes=max_bytes)
