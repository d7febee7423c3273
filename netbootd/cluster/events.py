"""Node events shared between replicas, so a node's timeline is whole on every replica.

A Pi's DHCP may be answered by replica A while its TFTP and HTTP go to replica B; each
replica's event log holds only what it saw. With ``cluster.backend: etcd`` every replica
also writes the node events it records (those with a MAC) to etcd, and every replica's
timeline of a node merges its own events with the others', by wall-clock time, each
event naming the replica that saw it.

Bounded by construction. A replica writes a node's events to a ring of keys
``<prefix>events/<mac>/<replica>/<slot>``, slot = the node's sequence number modulo
``cluster.event_ring``, so a node holds at most that many keys per replica however long
it lives. All of a replica's keys sit on one lease of ``cluster.event_ttl`` seconds,
renewed while the replica runs: a dead replica's events vanish when it runs out. A
replica that stops cleanly does not revoke it (what it saw stays true for a restart).

Never on the hot path. ``record()`` runs on the DHCP loop and the TFTP engine; the
listener here only appends to a bounded queue (full: the event is dropped and counted,
``netbootd_cluster_events_dropped``). A task on the etcd client's own loop writes what
queued every :data:`INTERVAL` seconds, one transaction per :data:`BATCH` keys.
While etcd is away the queue keeps the oldest events and drops new ones.

Not published: DHCP "no reply" events whose decision is ``rate-limited`` or
``no-address``. Those two fire once per packet (a client over the rate limit, a request
on an interface without an address) where every other kind fires once per boot step
(DHCP answers are coalesced, TFTP and HTTP record one event per file, not per block);
each replica keeps them in its own log.

Reading follows a watch into a bounded table rather than asking etcd per timeline: the
status page draws the timeline of every node it lists, so a request per node would make
a page view cost hundreds of round trips and wait on etcd; from memory every timeline is
cheap and still answers while etcd is away (with what was last seen). The table holds at
most ``events.max_nodes`` nodes (least recently updated evicted) and ``event_ring``
events per node from the other replicas; at start it loads the newest :data:`LOAD_LIMIT`
events, then follows changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from ..events import Event, EventLog
from ..model import normalise_mac
from .etcd import KV, Etcd, EtcdError, Unreachable, b64, prefix_end, put_op
from .etcd import Event as Change

log = logging.getLogger("netbootd.cluster.events")

#: Seconds between two writes of the queued events (one transaction each).
INTERVAL = 0.25
#: Keys per transaction at most (etcd refuses more than 128 operations by default).
BATCH = 100
#: Events read at start (the newest); later ones come through the watch.
LOAD_LIMIT = 10_000
#: Longest message and encoded event kept in etcd (a timeline line, not a log dump).
MAX_MESSAGE = 500
MAX_VALUE = 4096
#: (kind, decision) of events that fire per packet: kept local (module docstring).
NOISE = frozenset({("dhcp", "rate-limited"), ("dhcp", "no-address")})


class SharedEvents:
    """This replica's events written to etcd, and the other replicas' followed into
    memory (see the module docstring)."""

    def __init__(self, etcd: Etcd, prefix: str, replica: str, *, ring: int = 64,
                 ttl: float = 3600.0, queue: int = 4096, max_nodes: int = 10_000) -> None:
        self.etcd = etcd
        self.prefix = prefix + "events/"
        self.replica = replica
        self.ring = max(1, ring)
        self.ttl = ttl
        self.max_queue = max(1, queue)
        self.max_nodes = max(1, max_nodes)
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, Event]] = deque()  #: (normalised MAC, event)
        #: mac -> the next slot of its ring (bounded like the table).
        self._next: OrderedDict[str, int] = OrderedDict()
        #: mac -> {(replica, slot): event} of the other replicas, least recent first.
        self._table: OrderedDict[str, dict[tuple[str, str], Event]] = OrderedDict()
        self.lease = 0
        self._lease_at = 0.0
        self.loaded = False
        #: Counters (metrics, status): events written, dropped on a full queue, batches
        #: etcd did not take, nodes evicted from the table.
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self.evicted = 0
        #: One writer at a time (the loop's and close()'s): a batch leaves the queue once.
        self._writing = asyncio.Lock()

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, events: EventLog) -> None:
        """Publish what ``events`` records and merge the others into its timelines."""
        events.replica = self.replica
        events.others = self.others
        events.subscribe(self.publish)
        self.etcd.submit(self._run())

    def close(self, timeout: float = 1.0) -> None:
        """Write what is still queued (bounded wait; not at all when etcd just failed to
        answer); the lease is left to run out."""
        if self.etcd.closed or not self.pending() or self.etcd.recently_down(5.0):
            return
        with contextlib.suppress(Exception):
            self.etcd.submit(self._flush()).result(timeout)

    # -- publishing (any thread; memory only) ---------------------------------------------------
    def publish(self, ev: Event) -> None:
        """The event log's listener: queue a node event, or drop and count it."""
        if not ev.mac or (ev.kind, ev.fields.get("decision")) in NOISE:
            return
        try:
            mac = normalise_mac(ev.mac)
        except ValueError:
            return  # not a node's MAC: nothing to key it by
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            self._queue.append((mac, ev))

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- the client's loop --------------------------------------------------------------------
    async def _run(self) -> None:
        """Load and watch once etcd answers, then write the queue every INTERVAL."""
        while not self.etcd.closed:
            await asyncio.sleep(INTERVAL)
            try:
                if not self.loaded:
                    await self._load()
                await self._flush()
                await self._keep_lease()
            except asyncio.CancelledError:
                raise
            except Unreachable:
                continue  # the queue keeps what it holds; the next tick tries again
            except Exception:
                log.exception("cluster events")

    async def _load(self) -> None:
        data = await self.etcd.post("/v3/kv/range", {
            "key": b64(self.prefix), "range_end": prefix_end(self.prefix),
            "limit": str(LOAD_LIMIT), "sort_order": "DESCEND", "sort_target": "MOD"})
        kvs = [KV.parse(kv) for kv in data.get("kvs", [])]
        with self._lock:
            for kv in reversed(kvs):  # oldest first: the newest stay when the table is full
                self._put(kv)
        self.loaded = True
        self.etcd.watch(self.prefix, int(data.get("header", {}).get("revision", 0)),
                        self._on_changes, known=None)  # ring slots: overwritten, expire

    async def _flush(self) -> None:
        """Write the queue, BATCH events per transaction, until it is empty or etcd
        does not take a batch."""
        async with self._writing:
            while await self._write_batch():
                pass

    async def _write_batch(self) -> bool:
        """Write up to BATCH queued events in one transaction; they leave the queue only
        once etcd took them (or refused them for good). True if there may be more."""
        with self._lock:
            batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
        if not batch:
            return False
        if not self.lease:
            await self._grant()
        ops: dict[str, dict[str, Any]] = {}  # one op per key: etcd refuses duplicates
        for mac, ev in batch:
            key = self._key(mac)
            ops[key] = put_op(key, encode(ev, self.replica), self.lease)
        try:
            await self.etcd.post("/v3/kv/txn", {"success": list(ops.values())})
        except EtcdError as exc:
            self.failed += 1
            if "lease" in str(exc):  # expired or revoked: a new one, the batch again
                self.lease = 0
                return False
            log.warning("cluster events: etcd refused %d events: %s", len(batch), exc)
        else:
            self.published += len(batch)
        with self._lock:
            for _ in batch:
                self._queue.popleft()
        return len(batch) == BATCH

    def _key(self, mac: str) -> str:
        """The key of this node's next event: the next slot of this replica's ring."""
        slot = self._next.pop(mac, 0)
        self._next[mac] = (slot + 1) % self.ring
        while len(self._next) > self.max_nodes:
            self._next.popitem(last=False)
        return f"{self.prefix}{mac}/{self.replica}/{slot}"

    async def _grant(self) -> None:
        data = await self.etcd.post("/v3/lease/grant", {"TTL": str(int(self.ttl))})
        self.lease = int(data["ID"])
        self._lease_at = time.monotonic()

    async def _keep_lease(self) -> None:
        """Renew the lease every third of its TTL; a lost lease is granted anew on the
        next write (its keys are gone already)."""
        if not self.lease or time.monotonic() - self._lease_at < self.ttl / 3:
            return
        data = await self.etcd.post("/v3/lease/keepalive", {"ID": str(self.lease)})
        if int(data.get("result", {}).get("TTL", 0)) > 0:
            self._lease_at = time.monotonic()
        else:
            self.lease = 0

    # -- the other replicas' events -----------------------------------------------------------
    def _on_changes(self, changes: list[Change], _revision: int) -> None:
        with self._lock:
            for ch in changes:
                if ch.deleted:
                    self._drop(ch.kv.key)
                else:
                    self._put(ch.kv)

    def _split(self, key: str) -> tuple[str, str, str] | None:
        parts = key[len(self.prefix):].split("/")
        if len(parts) != 3 or parts[1] == self.replica:
            return None  # ours (already in the local log), or not an event key
        return parts[0], parts[1], parts[2]

    def _put(self, kv: KV) -> None:
        where = self._split(kv.key)
        ev = decode(kv.value, where[0], where[1]) if where else None
        if where is None or ev is None:
            return
        mac, replica, slot = where
        node = self._table.pop(mac, None)
        if node is None:
            node = {}
            while len(self._table) >= self.max_nodes:
                self._table.popitem(last=False)
                self.evicted += 1
        node[(replica, slot)] = ev
        if len(node) > self.ring:  # several replicas: keep the newest ring events
            del node[min(node, key=lambda k: node[k].ts)]
        self._table[mac] = node

    def _drop(self, key: str) -> None:
        where = self._split(key)
        if where is None:
            return
        node = self._table.get(where[0])
        if node is not None:
            node.pop((where[1], where[2]), None)
            if not node:
                del self._table[where[0]]

    def others(self, mac: str) -> list[Event]:
        """The other replicas' events of this node, as last seen (memory only)."""
        try:
            mac = normalise_mac(mac)
        except ValueError:
            return []
        with self._lock:
            node = self._table.get(mac)
            return list(node.values()) if node else []

    def health(self) -> dict[str, int]:
        with self._lock:
            nodes, queued = len(self._table), len(self._queue)
        return {"nodes_seen_elsewhere": nodes, "queued": queued, "published": self.published,
                "dropped": self.dropped, "failed_batches": self.failed,
                "nodes_evicted": self.evicted}


def encode(ev: Event, replica: str) -> str:
    """The value of an event key: the event and who saw it (the MAC is in the key)."""
    d = {"ts": ev.ts, "kind": ev.kind, "message": ev.message[:MAX_MESSAGE],
         "fields": ev.fields, "replica": replica}
    value = json.dumps(d, separators=(",", ":"), default=str)
    if len(value) > MAX_VALUE:
        d["fields"] = {k: v for k, v in ev.fields.items() if k in ("outcome", "ip", "image",
                                                                    "version")}
        value = json.dumps(d, separators=(",", ":"), default=str)
    return value


def decode(value: bytes, mac: str, replica: str) -> Event | None:
    try:
        d = json.loads(value)
        return Event(ts=float(d["ts"]), kind=str(d["kind"]), mac=mac,
                     message=str(d.get("message", "")), fields=dict(d.get("fields") or {}),
                     replica=str(d.get("replica") or replica))
    except (ValueError, KeyError, TypeError):
        return None


class SharedEventsCollector:
    """Prometheus view of the publishing (registered with the etcd backend)."""

    def __init__(self, shared: SharedEvents) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._shared
        yield CounterMetricFamily("netbootd_cluster_events_published",
                                  "Node events written to etcd for the other replicas",
                                  value=s.published)
        yield CounterMetricFamily("netbootd_cluster_events_dropped",
                                  "Node events not written to etcd: the queue was full "
                                  "(cluster.event_queue)", value=s.dropped)
        yield GaugeMetricFamily("netbootd_cluster_events_queued",
                                "Node events waiting to be written to etcd",
                                value=s.pending())

    def describe(self) -> list[Any]:
        return []
