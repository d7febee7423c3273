"""Learnt client addresses shared by replicas: evidence one replica saw, known to all.

Why: a proxy learns that MAC M holds address A only from the site DHCP server's ACKs
it happens to see (``dhcp/acks.py``), and with replicas the ACK of a node's address is
often seen by one replica only. Without sharing, a request for that node's files
(cloud-init, its state export) that reaches another replica is not attributed to the
node there. So every replica publishes the evidence it learns, and learns what the
others published.

What is shared is **evidence**, never ownership: a binding learnt from etcd goes into
this replica's :class:`~netbootd.neighbours.ClientAddresses` like one it saw itself, and
``owner_of`` still requires this replica's own kernel neighbour table to name that MAC
for the address (docs/security.md, "Address binding"). A binding learnt from etcd is
never published again (no echo between replicas).

One key per address, ``<prefix>addresses/<ip>``, holding JSON: ``mac``, ``expires``
(wall clock, seconds since the epoch: each replica translates it to its own monotonic
clock), ``lease`` (seconds it was valid for when written), ``written``, ``replica``
(who saw it) and ``evidence`` (``dhcp-ack``). Keys live on etcd leases that end when
the binding does (one lease per expiry slot, shared by the bindings that end in it),
so stale entries vanish by themselves.

Nothing on the DHCP path waits for etcd: :meth:`SharedAddresses.offer` (called by
``learn()``) only decides in memory whether etcd needs a write and queues it; the
writes are made on the etcd client's own loop, many per transaction. A renewing client
is coalesced: the key is rewritten only when the binding is new, moved, or more than
half of what was written has passed. Bounded: at most ``network.max_addresses``
bindings are loaded and remembered, and at most as many writes wait (more are dropped
and counted; the binding is offered again at the client's next ACK).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from ..model import normalise_mac
from ..neighbours import ClientAddresses, usable_ipv4
from .etcd import KV, Etcd, EtcdError, Event, Unreachable, b64, prefix_end, put_op, unb64

log = logging.getLogger("netbootd.cluster.addresses")

#: The kind of evidence a replica publishes (the only one learnt at run time).
EVIDENCE = "dhcp-ack"
#: Puts per transaction (etcd refuses more than 128 operations in one by default).
BATCH = 64
#: A value longer than this is not ours: ignored.
MAX_VALUE = 1024
#: Leases remembered for reuse at most (each covers one expiry slot).
MAX_LEASES = 256


@dataclass(frozen=True, slots=True)
class Shared:
    """One binding as written in etcd (times are wall-clock seconds)."""

    mac: str
    expires: float
    written: float
    replica: str
    evidence: str = EVIDENCE

    def due(self, now: float) -> bool:
        """Is a rewrite worth an etcd write: more than half of the written lease passed?"""
        return now - self.written > (self.expires - self.written) / 2

    def encode(self) -> str:
        d = asdict(self)
        d["lease"] = round(self.expires - self.written, 3)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def decode(cls, value: bytes) -> Shared | None:
        """The binding in a key's value, or None for anything malformed (etcd is shared:
        a value is checked like input, not trusted like our own memory)."""
        if len(value) > MAX_VALUE:
            return None
        try:
            d = json.loads(value)
            expires, written = float(d["expires"]), float(d.get("written", 0.0))
            if not (math.isfinite(expires) and math.isfinite(written)):
                return None
            return cls(mac=normalise_mac(d["mac"]), expires=expires, written=written,
                       replica=str(d.get("replica", ""))[:64],
                       evidence=str(d.get("evidence", EVIDENCE))[:32])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def lease_slot(expires: float, now: float) -> int:
    """The wall-clock second at which the lease for a binding ending at ``expires`` ends:
    bindings that end close together share one lease (a lease per write would double
    the round trips and leave thousands of leases alive). The slot is a tenth of the
    binding's remaining time wide (1 to 60 s), so a key outlives its binding by that
    much at most; readers ignore a binding past its ``expires`` anyway."""
    grain = min(60.0, max(1.0, (expires - now) / 10))
    return int(math.ceil(expires / grain) * grain)


class SharedAddresses:
    """This replica's side of ``<prefix>addresses/`` (see the module docstring)."""

    def __init__(self, etcd: Etcd, prefix: str, replica: str, clients: ClientAddresses,
                 *, max_entries: int, queue_max: int | None = None) -> None:
        self.etcd = etcd
        self.prefix = prefix + "addresses/"
        self.replica = replica
        self.clients = clients
        self.max_entries = max_entries
        self.queue_max = queue_max if queue_max is not None else max_entries
        self._lock = threading.Lock()
        #: ip -> the binding etcd holds as far as we know (our writes, the watch): what
        #: a renewal is compared with.
        self._known: OrderedDict[str, Shared] = OrderedDict()
        #: ip -> the binding waiting to be written (a newer offer replaces an older one).
        self._pending: OrderedDict[str, Shared] = OrderedDict()
        self._leases: dict[int, int] = {}  #: slot end (wall second) -> lease id
        self._scheduled = False
        self._stopped = False
        self.loaded = False
        #: Counters (status page, tests).
        self.written = 0
        self.coalesced = 0
        self.dropped = 0
        self.failed = 0
        self.learnt = 0

    # -- start and stop ----------------------------------------------------------------------
    def start(self) -> None:
        """Publish what this replica learns from now on; load what etcd holds, then
        follow it. Blocking (bounded by the client's timeout); without etcd the load is
        retried in the background and the evidence learnt meanwhile waits (bounded)."""
        self.clients.publish = self.offer
        try:
            self._load()
        except (Unreachable, EtcdError) as exc:  # never a reason to refuse the service
            log.warning("shared addresses: %s; retrying", exc)
            threading.Thread(target=self._retry_load, daemon=True,
                             name="etcd-addresses-load").start()

    def stop(self) -> None:
        """Publish nothing more and learn nothing more from etcd."""
        self._stopped = True
        if self.clients.publish == self.offer:
            self.clients.publish = None
        with self._lock:
            self._pending.clear()

    def _retry_load(self) -> None:
        while not self.loaded and not self._stopped and not self.etcd.closed:
            time.sleep(self.etcd.timeout)
            with contextlib.suppress(Exception):
                self._load()

    def _load(self) -> None:
        """The most recently written ``max_entries`` bindings (one bounded range, so a
        huge table in etcd costs this replica nothing more), then a watch from there."""
        data = self.etcd.call("/v3/kv/range", {
            "key": b64(self.prefix), "range_end": prefix_end(self.prefix),
            "limit": str(self.max_entries), "sort_order": "DESCEND", "sort_target": "MOD"})
        revision = int(data.get("header", {}).get("revision", 0))
        for kv in reversed([KV.parse(kv) for kv in data.get("kvs", [])]):  # oldest first
            self._take(kv, own_too=True)  # our own too: this process's memory is new
        with self._lock:
            self.loaded = True
            go = bool(self._pending) and not self._scheduled and not self._stopped
            self._scheduled = self._scheduled or go
        self.etcd.watch(self.prefix, revision, self._on_events,
                        known=(unb64(kv.get("key")).decode() for kv in data.get("kvs", [])))
        if go:
            self._schedule()

    # -- learning what the others saw ------------------------------------------------------------
    def _on_events(self, events: list[Event], _revision: int) -> None:
        if self._stopped:
            return
        for ev in events:
            if ev.deleted:  # the lease ended: the binding expired (it expires here too)
                with self._lock:
                    self._known.pop(ev.kv.key[len(self.prefix):], None)
                continue
            self._take(ev.kv, own_too=False)

    def _take(self, kv: KV, *, own_too: bool) -> None:
        """Remember what etcd holds for an address and learn it as evidence from a peer
        (our own writes are in memory already, except at load)."""
        ip = kv.key[len(self.prefix):]
        shared = Shared.decode(kv.value)
        if shared is None or not usable_ipv4(ip) and not ip.startswith("127."):
            return
        self._remember(ip, shared)
        if shared.replica == self.replica and not own_too:
            return
        remaining = shared.expires - time.time()
        if remaining <= 0:
            return  # expired, its lease just has not ended yet
        self.clients.learn(ip, shared.mac, lease=remaining, from_peer=True)
        self.learnt += 1

    def _remember(self, ip: str, shared: Shared) -> None:
        with self._lock:
            self._known[ip] = shared
            self._known.move_to_end(ip)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)

    # -- publishing what this replica saw --------------------------------------------------------
    def offer(self, ip: str, mac: str, seconds: float) -> None:
        """``ClientAddresses.publish``: evidence learnt here (new, moved or refreshed).
        Memory only: queue a write when etcd does not hold this binding already with
        more than half of its lease to go."""
        now = time.time()
        entry = Shared(mac=mac, expires=now + seconds, written=now, replica=self.replica)
        with self._lock:
            have = self._known.get(ip)
            if have is not None and have.mac == mac and not have.due(now):
                self.coalesced += 1
                return
            if ip not in self._pending and len(self._pending) >= self.queue_max:
                self.dropped += 1
                return
            self._pending[ip] = entry
            go = self.loaded and not self._scheduled and not self._stopped
            self._scheduled = self._scheduled or go
        if go:
            self._schedule()

    def _schedule(self) -> None:
        try:
            self.etcd.submit(self._flush())
        except Unreachable:  # the client is closed: the daemon is stopping
            with self._lock:
                self._scheduled = False

    async def _flush(self) -> None:
        """Write the queued bindings, a batch per transaction, until none is left (on
        the etcd client's loop). What fails is forgotten, so the client's next ACK
        offers it again."""
        while True:
            with self._lock:
                batch = [self._pending.popitem(last=False)
                         for _ in range(min(BATCH, len(self._pending)))]
                if not batch or self._stopped:
                    self._scheduled = False
                    return
                for ip, shared in batch:  # a renewal meanwhile is coalesced
                    self._known[ip] = shared
                    self._known.move_to_end(ip)
            try:
                if self.etcd.recently_down(self.etcd.timeout * 5):
                    raise Unreachable("etcd did not answer moments ago")
                await self._write(batch)
                self.written += len(batch)
            except asyncio.CancelledError:
                with self._lock:
                    self._scheduled = False
                raise
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failure
                self._forget(batch)
                self.failed += len(batch)
                log.debug("publishing %d addresses: %s", len(batch), exc)

    def _forget(self, batch: list[tuple[str, Shared]]) -> None:
        with self._lock:
            for ip, shared in batch:
                if self._known.get(ip) is shared:
                    del self._known[ip]

    async def _write(self, batch: list[tuple[str, Shared]]) -> None:
        """One transaction; a lease etcd no longer knows is granted anew, once."""
        for attempt in (1, 2):
            ops = [put_op(self.prefix + ip, shared.encode(),
                          await self._lease_for(shared.expires)) for ip, shared in batch]
            try:
                await self.etcd.post("/v3/kv/txn", {"compare": [], "success": ops,
                                                    "failure": []})
                return
            except EtcdError:
                self._leases.clear()
                if attempt == 2:
                    raise

    async def _lease_for(self, expires: float) -> int:
        """The lease that ends with ``expires``'s slot (granted on first use)."""
        now = time.time()
        for slot in [s for s in self._leases if s <= now + 1]:
            del self._leases[slot]  # over, or too close to it to carry a new key
        slot = lease_slot(expires, now)
        lease = self._leases.get(slot)
        if lease is None:
            data = await self.etcd.post("/v3/lease/grant",
                                        {"TTL": str(max(1, math.ceil(slot - now)))})
            lease = int(data["ID"])
            if len(self._leases) >= MAX_LEASES:
                self._leases.pop(min(self._leases))
            self._leases[slot] = lease
        return lease

    def health(self) -> dict[str, Any]:
        with self._lock:
            known, pending = len(self._known), len(self._pending)
        return {"loaded": self.loaded, "known": known, "pending": pending,
                "written": self.written, "coalesced": self.coalesced,
                "dropped": self.dropped, "failed": self.failed,
                "learnt_from_peers": self.learnt}
