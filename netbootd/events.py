"""The event log and the node state table it feeds.

Every service records what it saw (DHCP answered, file served, kernel handed
over, booted, failed, ...). Events are appended as JSON lines to
``<state>/events.jsonl`` (rotated at a size limit, a bounded number of old
files kept), kept in memory per node (bounded), and folded into a node state
table (last seen, IP, phase, image version) that is rebuilt from the files at
start, so a restart does not forget the fleet.

The file is written by a writer thread, never by the recording thread. ``record()``
runs on the protocol paths (the asyncio loop serving DHCP and HTTP, TFTP admission),
and a ``write()`` to a file can block: under dirty-page throttling while the store
ingests a multi-GB build on the same disk it takes tens to hundreds of ms, and every
DHCP answer would wait that long. So ``record()`` updates memory and queues the JSON
line; the writer wakes at most every ``WRITE_INTERVAL`` seconds and writes what queued
up in one call (the syscall releases the GIL). The cost: a crash loses at most the last
``WRITE_INTERVAL`` of the file (memory is current); ``close()`` writes everything, and
``flush()`` waits for it.

Memory is bounded however many machines talk to us: the node table (and the
timelines) keep at most ``max_nodes`` machines, evicting the least recently seen
one (counted in ``evicted``), and the same bound holds while replaying the files at
start. Machines the daemon ignored (outcome ``ignored``: not in the fleet) get no
row at all (once the daemon tells the log who is in the fleet): they are counted (``ignored_total``) and a small sample of the most
recent is kept (``ignored_recent``). A flood of DHCP packets from random MACs once
grew the daemon by 670 MB in a minute and came back after a restart from the files.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("netbootd.events")

#: Phases that move a node's state forward; other event kinds only update last_seen.
PHASES = (
    "dhcp", "tftp", "http", "kernel", "booted", "provisioned", "installed", "joined", "failed",
)

#: Longest time a recorded event waits in memory before it is written to the file.
WRITE_INTERVAL = 0.05

#: Field names that must never be written to the log (secrets rendered for a node).
_REDACT = frozenset({"token", "secret", "password", "user_data"})


@dataclass(slots=True)
class Event:
    """One thing that happened to one node (or to the daemon, ``mac=None``)."""

    ts: float
    kind: str
    mac: str | None = None
    message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    #: The replica that saw it, in a cluster (``cluster/events.py``); "" with one daemon.
    replica: str = ""

    def to_json(self) -> str:
        # A plain dict, not dataclasses.asdict: asdict deep-copies fields on every event,
        # which was most of the cost of recording on the DHCP hot path.
        d = {"ts": self.ts, "kind": self.kind, "mac": self.mac, "message": self.message,
             "fields": self.fields}
        return json.dumps(d, separators=(",", ":"), default=str)


@dataclass(slots=True)
class NodeState:
    """What the status page shows per node."""

    mac: str
    last_seen: float = 0.0
    ip: str | None = None
    phase: str = "unknown"
    image: str | None = None
    version: str | None = None
    hostname: str | None = None
    message: str = ""

    def apply(self, ev: Event) -> None:
        self.last_seen = max(self.last_seen, ev.ts)
        f = ev.fields
        if f.get("ip"):
            self.ip = str(f["ip"])
        if f.get("image"):
            self.image = str(f["image"])
        if f.get("version"):
            self.version = str(f["version"])
        if f.get("hostname"):
            self.hostname = str(f["hostname"])
        if ev.kind in PHASES and f.get("outcome", "ok") not in ("aborted", "ignored"):
            self.phase = ev.kind
            self.message = ev.message


class EventLog:
    """Append-only, bounded, rotated event log with a node state table.

    Thread-safe: the TFTP/HTTP paths may record from executor threads.
    """

    def __init__(
        self,
        state_dir: Path | None,
        *,
        max_bytes: int = 8 * 1024 * 1024,
        keep_files: int = 3,
        per_node: int = 200,
        max_nodes: int = 10_000,
        ignored_sample: int = 32,
    ) -> None:
        self._dir = state_dir
        self._max_bytes = max_bytes
        self._keep = keep_files
        self._per_node = per_node
        self._max_nodes = max(1, max_nodes)
        self._ignored_sample = max(0, ignored_sample)
        self._lock = threading.Lock()
        self._recent: deque[Event] = deque(maxlen=2000)
        self._by_node: dict[str, deque[Event]] = {}
        #: mac -> state, least recently seen first (the eviction order).
        self.nodes: OrderedDict[str, NodeState] = OrderedDict()
        #: machines evicted from the node table to keep it at ``max_nodes``
        self.evicted = 0
        #: events about ignored machines (not in the fleet), and a sample of recent ones
        self.ignored_total = 0
        self.ignored_recent: OrderedDict[str, float] = OrderedDict()
        #: Whether a MAC is in the fleet (the daemon sets it to look in the inventory);
        #: an ignored machine outside the fleet is counted instead of given a row. None:
        #: not known (while replaying at start), every machine gets a row, bounded.
        self.fleet: Callable[[str], bool] | None = None
        self._listeners: list[Callable[[Event], None]] = []
        #: With ``cluster.backend: etcd``: this replica's name and the node events other
        #: replicas saw (``cluster/events.py``), merged into :meth:`timeline`.
        self.replica = ""
        self.others: Callable[[str], list[Event]] | None = None
        self._fh = None
        #: JSON lines recorded but not yet written, and counts of both (for ``flush``).
        self._pending: list[str] = []
        self._queued = self._written = 0
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._writer: threading.Thread | None = None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._replay()
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="netbootd-events")
            self._writer.start()

    @property
    def path(self) -> Path:
        assert self._dir is not None
        return self._dir / "events.jsonl"

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn`` for every new event (metrics, status page)."""
        self._listeners.append(fn)

    def record(self, kind: str, mac: str | None = None, message: str = "", **fields: Any) -> Event:
        """Record one event. Never raises: a full disk must not stop a boot."""
        clean = {k: v for k, v in fields.items() if k not in _REDACT and v is not None}
        ev = Event(ts=time.time(), kind=kind, mac=mac, message=message, fields=clean,
                   replica=self.replica)
        line = ev.to_json() + "\n" if self._fh is not None else ""
        with self._lock:
            self._remember(ev)
            if line and not self._closing:
                self._pending.append(line)
                self._queued += 1
                if len(self._pending) == 1:
                    self._wake.notify()
        for fn in self._listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("event listener failed")
        return ev

    def timeline(self, mac: str) -> list[Event]:
        """The node's events, oldest first: this daemon's, and in a cluster the other
        replicas' too (each event names its replica), by wall-clock time."""
        with self._lock:
            own = list(self._by_node.get(mac, ()))
        if self.others is None:
            return own
        try:
            theirs = self.others(mac)
        except Exception:
            log.exception("other replicas' events of %s", mac)
            theirs = []
        # events replayed from the files at start were recorded before the name was set
        mine = [e if e.replica else replace(e, replica=self.replica) for e in own]
        return sorted(mine + theirs, key=lambda e: e.ts)

    def recent(self, limit: int = 100) -> list[Event]:
        with self._lock:
            return list(self._recent)[-limit:]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event recorded so far is in the file (tests, CLI)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._queued
            self._wake.notify()
            while self._written < target and self._writer is not None \
                    and self._writer.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, WRITE_INTERVAL))
        return True

    def close(self) -> None:
        """Write what is queued, stop the writer, close the file. Idempotent."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(5.0)
        with self._lock:
            writer_done = self._writer is None or not self._writer.is_alive()
            if self._pending and writer_done:  # the writer never started
                self._write_pending_locked()
            if self._fh and writer_done:
                self._fh.close()
                self._fh = None

    # -- internals -------------------------------------------------------------------------
    def _remember(self, ev: Event) -> None:
        self._recent.append(ev)
        mac = ev.mac
        ignored = ev.fields.get("outcome") == "ignored"
        if not mac:
            other = ev.fields.get("client_mac")
            if ignored and other:
                self._note_ignored(str(other), ev.ts)
            return
        state = self.nodes.get(mac)
        if state is None:
            if ignored and self.fleet is not None and not self.fleet(mac):
                self._note_ignored(mac, ev.ts)  # not in the fleet: a count, not a row
                return
            while len(self.nodes) >= self._max_nodes:
                old, _ = self.nodes.popitem(last=False)
                self._by_node.pop(old, None)
                self.evicted += 1
            state = self.nodes[mac] = NodeState(mac=mac)
            self._by_node[mac] = deque(maxlen=self._per_node)
        else:
            self.nodes.move_to_end(mac)
        self._by_node[mac].append(ev)
        state.apply(ev)

    def _note_ignored(self, mac: str, ts: float) -> None:
        self.ignored_total += 1
        if not self._ignored_sample:
            return
        recent = self.ignored_recent
        recent.pop(mac, None)
        recent[mac] = ts
        while len(recent) > self._ignored_sample:
            recent.popitem(last=False)

    def ignored(self) -> tuple[int, list[tuple[str, float]]]:
        """(events about ignored machines so far, [(mac, last seen)] newest first)."""
        with self._lock:
            return self.ignored_total, list(reversed(self.ignored_recent.items()))

    def _write_loop(self) -> None:
        """The writer thread: batch, write, repeat until ``close()``."""
        with self._lock:
            while True:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._closing:  # let a burst gather: one write for all of it
                    self._wake.wait(WRITE_INTERVAL)
                if self._pending:
                    self._write_pending_locked()
                    self._wake.notify_all()  # flush() waiters
                if self._closing and not self._pending:
                    return

    def _write_pending_locked(self) -> None:
        """Write the queued lines, rotating at ``max_bytes``. Called with the lock held;
        it is dropped around the file work so ``record()`` never waits for the disk. Only
        the writer thread touches the file (``close()`` joins it first)."""
        lines, self._pending = self._pending, []
        if self._fh is None:
            return
        self._lock.release()
        try:
            self._write_lines(lines)
        except (OSError, ValueError) as exc:  # disk full, rename failed
            log.warning("event log write failed: %s", exc)
        finally:
            self._lock.acquire()
        self._written += len(lines)

    def _write_lines(self, lines: list[str]) -> None:
        i = 0
        while i < len(lines) and self._fh is not None:
            room = self._max_bytes - self._fh.tell()
            chunk: list[str] = []
            size = 0
            while i < len(lines) and (size < room or not chunk):
                chunk.append(lines[i])
                size += len(lines[i])
                i += 1
            self._fh.write("".join(chunk))
            self._fh.flush()
            if self._fh.tell() >= self._max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        assert self._fh is not None and self._dir is not None
        self._fh.close()
        for i in range(self._keep - 1, 0, -1):
            src = self._dir / f"events.jsonl.{i}"
            if src.exists():
                os.replace(src, self._dir / f"events.jsonl.{i + 1}")
        os.replace(self.path, self._dir / "events.jsonl.1")
        extra = self._dir / f"events.jsonl.{self._keep + 1}"
        if extra.exists():
            extra.unlink()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def _replay(self) -> None:
        """Rebuild the node table from the rotated files, oldest first."""
        assert self._dir is not None
        files = [self._dir / f"events.jsonl.{i}" for i in range(self._keep, 0, -1)]
        files.append(self.path)
        bad = 0
        for f in files:
            if not f.exists():
                continue
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        d = json.loads(line)
                        ev = Event(ts=float(d["ts"]), kind=str(d["kind"]), mac=d.get("mac"),
                                   message=str(d.get("message", "")),
                                   fields=dict(d.get("fields") or {}))
                    except (ValueError, KeyError, TypeError):
                        bad += 1  # a torn last line after a crash is expected
                        continue
                    self._remember(ev)
        if bad:
            log.info("event log replay skipped %d unreadable lines", bad)


class EventTableCollector:
    """Prometheus view of the bounded tables (registered by the daemon)."""

    def __init__(self, events: EventLog) -> None:
        self._events = events

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ev = self._events
        yield GaugeMetricFamily("netbootd_event_nodes",
                                "Machines in the event log's node table", value=len(ev.nodes))
        yield CounterMetricFamily("netbootd_event_nodes_evicted",
                                  "Machines evicted from the node table (events.max_nodes)",
                                  value=ev.evicted)
        yield CounterMetricFamily("netbootd_ignored_machine_events",
                                  "Events about machines the daemon ignored (not in the fleet)",
                                  value=ev.ignored_total)

    def describe(self) -> list[Any]:
        return []
