"""The block-loop threads of one process: up to ``tftp.pump_threads`` C pumps.

Every TFTP transfer runs in a :class:`netbootd.tftp._pump.Pump` (C, GIL released),
whether it runs in a worker process (the default) or in the daemon (``tftp.workers: 0``,
or when no worker is alive). A pump is one thread's epoll set over any number of
transfers; a new transfer goes to the least loaded pump, and a new thread is started
only while every running one is busy and fewer than ``pump_threads`` run. So up to
``pump_threads`` concurrent transfers each get a thread of their own (a blocked thread
per transfer wakes next to its client: 20 x 8 MiB), and more share them, each thread
serving every ready transfer per wake-up (the 100-Pi storm). Measurements:
docs/tftp.md, "The block loop".

Threading: :meth:`add`, :meth:`abort` and :meth:`stop` are called on the owner's
:class:`~netbootd.tftp.engine.EngineLoop` thread; each pump thread blocks in
``serve()`` and passes what it returns to that loop (``call_soon_threadsafe``), where
``on_report`` and ``on_progress`` run. So the owner's bookkeeping needs no locks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from . import codec
from .handoff import Report
from .transfer import Negotiated

log = logging.getLogger("netbootd.tftp")

#: Stack of a pump thread: the C loop needs a few KiB; Python's default is 8 MiB of
#: address space per thread. A worker process sets it for all its threads (it has no
#: others); the daemon keeps the default (its other threads run arbitrary Python).
PUMP_STACK = 256 * 1024


class Loop(Protocol):
    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None: ...


class Content(Protocol):
    """What a transfer sends: a buffer (bytes or a read-only mmap) and its owner."""

    data: Any
    size: int

    def close(self) -> None: ...


def load_pump() -> ModuleType:
    """The C block loop. It is built at install (``setup.py``; gcc and python3-dev),
    and TFTP cannot run without it: say how to fix that instead of a bare ImportError."""
    try:
        from . import _pump
    except ImportError as exc:
        raise RuntimeError(
            "netbootd/tftp/_pump.c is not built (TFTP needs it): install gcc, libc6-dev "
            f"and python3-dev, then reinstall netbootd ({exc})") from exc
    return _pump


class _Thread:
    __slots__ = ("jobs", "pump", "thread")

    def __init__(self, pump: Any) -> None:
        self.pump = pump
        self.jobs = 0
        self.thread: threading.Thread | None = None


class Pumps:
    """Up to ``threads`` pump threads; transfers go to the least loaded."""

    def __init__(self, loop: Loop, threads: int, *, on_report: Callable[[Report], None],
                 on_progress: Callable[[int], None] | None = None, name: str = "tftp") -> None:
        self._mod = load_pump()
        self.loop = loop
        self.max_threads = max(1, threads)
        self.on_report = on_report
        self.on_progress = on_progress
        self.name = name
        self._threads: list[_Thread] = []
        #: transfer id -> (its thread, its content: closed once the pump released it)
        self._jobs: dict[int, tuple[_Thread, Content, int]] = {}
        self.stopping = False
        #: set once stop() was called and every thread has ended (all transfers reported)
        self.idle = threading.Event()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: int, sock_fd: int, stranger_fd: int, content: Content,
            params: Negotiated, *, retries: int, stall_max: float) -> None:
        """Start one transfer. The pump owns both descriptors from here on (the caller
        has detached them); ``content`` is closed after its report. Raises (and owns
        nothing) when it cannot start."""
        if self.stopping:
            raise RuntimeError("the TFTP block loop is stopping")
        t = min(self._threads, key=lambda t: t.jobs, default=None)
        if (t is None or t.jobs > 0) and len(self._threads) < self.max_threads:
            t = self._start_thread()
        assert t is not None
        oack = codec.build_oack(params.oack) if params.oack else None
        t.pump.add(job, sock_fd, stranger_fd, content.data, params.blksize,
                   params.windowsize, params.timeout, retries, oack, stall_max)
        t.jobs += 1
        self._jobs[job] = (t, content, params.blksize)

    def abort(self, job: int, reason: str) -> bool:
        """End one transfer with ERROR 0 ``reason`` (its report follows). False when it
        is not here (already ended)."""
        hit = self._jobs.get(job)
        if hit is None:
            return False
        hit[0].pump.abort(job, reason)
        return True

    def stop(self) -> None:
        """Every transfer ends with ERROR 0 "server stopping" and is reported; then
        :attr:`idle` is set."""
        self.stopping = True
        for t in self._threads:
            t.pump.stop()
        if not self._threads:
            self.idle.set()

    def _start_thread(self) -> _Thread:
        t = _Thread(self._mod.Pump())
        t.thread = threading.Thread(target=self._serve, args=(t,), daemon=True,
                                    name=f"{self.name}-pump-{len(self._threads)}")
        t.thread.start()
        self._threads.append(t)
        return t

    def _serve(self, t: _Thread) -> None:
        """A pump thread: block in C, hand what it reports to the owner's loop."""
        while True:
            try:
                events = t.pump.serve()
            except Exception:  # a bug here must not leave transfers unreported silently
                log.exception("tftp: block loop failed")
                events = None
            try:
                self.loop.call_soon_threadsafe(self._on_events, t, events)
            except (OSError, ValueError):  # the owner's loop is gone (process exiting)
                return
            if events is None:
                return

    def _on_events(self, t: _Thread, events: list[tuple] | None) -> None:
        if events is None:
            if t in self._threads:
                self._threads.remove(t)
            if self.stopping and not self._threads:
                self.idle.set()
            return
        for ev in events:
            if ev[0] == "progress":
                if self.on_progress is not None:
                    self.on_progress(ev[1])
                continue
            _, job, outcome, reason, blocks, payload, packets, malformed, seconds = ev
            hit = self._jobs.pop(job, None)
            size = 0
            if hit is not None:
                thread, content, blksize = hit
                thread.jobs -= 1
                size = min(blocks * blksize, content.size)
                content.close()
            self.on_report(Report(job, outcome, reason, size, payload, packets,
                                  round(seconds, 6), malformed))
