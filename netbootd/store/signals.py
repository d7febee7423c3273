"""How the store tells the rest of the daemon what changed: listeners, events, metrics.

Every component that changes the store (pointers, pins, retention, intake) gets the one
:class:`Signals` of its store, so a listener registered on ``ImageStore.on_change`` hears
about every change whichever component made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("netbootd.store")


class Signals:
    """Change listeners, the event log and the metrics of one store (each may be absent)."""

    def __init__(self, events: Any = None, metrics: Any = None) -> None:
        self.events = events
        self.metrics = metrics
        #: Called (no arguments, from any thread) after every change: ingest,
        #: activation, pin, GC. The NFS service re-applies exports from here.
        self.on_change: list[Callable[[], None]] = []

    def event(self, message: str, mac: str | None = None, **fields: Any) -> None:
        """Record an ``image`` event (the status page and the node table read them)."""
        if self.events is not None:
            self.events.record("image", mac=mac, message=message, **fields)

    def changed(self) -> None:
        """Run every listener; one that fails is logged and does not stop the others."""
        for fn in list(self.on_change):
            try:
                fn()
            except Exception:
                log.exception("store on_change listener failed")

    def activation(self, image: str, channel: str) -> None:
        if self.metrics is not None:
            self.metrics.image_activations.labels(image, channel).inc()

    def ingest_failure(self) -> None:
        if self.metrics is not None:
            self.metrics.ingest_failures.inc()
