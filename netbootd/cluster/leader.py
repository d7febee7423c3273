"""One leader among the replicas, elected on an etcd lease, for jobs that run once.

Most work is per replica (each answers boots, each exports its own copy of the trees
it holds), but a few decisions must be taken once for the whole cluster: which
versions retention retires everywhere, and pruning the shared activation history.
Those run on the leader only.

The election is etcd's usual one, with no consensus of ours: the leader is whoever
holds ``<prefix>leader``. A replica *campaigns* with one transaction

    if <prefix>leader does not exist: put our name on our lease
    else: read who holds it

and keeps its lease alive every ``ttl / 3`` seconds. Every replica watches the key: when
the leader resigns (its lease revoked at stop) the others campaign at once; when it
dies or is cut off, etcd deletes the key as its lease runs out (at most ``ttl`` after
its last keep-alive) and the watchers campaign then. A leader that cannot renew its
lease stops calling itself leader ``ttl`` after the last renewal etcd confirmed, so two
replicas never both act as leader for longer than one network round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from .etcd import KV, Etcd, Event, Unreachable, absent, delete_op, mod_is, put_op, range_op

log = logging.getLogger("netbootd.cluster.leader")


class Leadership:
    """This replica's view of who leads; :meth:`step` campaigns or renews (blocking)."""

    def __init__(self, etcd: Etcd, prefix: str, name: str, ttl: float = 9.0) -> None:
        self.etcd = etcd
        self.key = prefix + "leader"
        self.name = name
        self.ttl = ttl
        self._lease = 0
        self._renewed = 0.0  #: monotonic time of the last renewal etcd confirmed
        self._mine = False
        #: The leader's name as last seen ("" when nobody holds the key).
        self.leader = ""
        #: Set (any thread) when the key changed: the loop campaigns without waiting.
        self.wake = threading.Event()
        self._watching = False

    @property
    def is_leader(self) -> bool:
        """True while this replica holds the key on a lease etcd renewed less than
        ``ttl`` ago (a replica cut off from etcd stops leading before its lease ends)."""
        return self._mine and time.monotonic() - self._renewed < self.ttl

    def step(self) -> bool:
        """Renew our lease, or campaign; returns :attr:`is_leader`. Raises
        :class:`Unreachable` when etcd does not answer (then nobody here leads)."""
        try:
            self._step()
        except Unreachable:
            self._mine = self._mine and self.is_leader
            raise
        return self.is_leader

    async def run(self) -> None:
        """Campaign, then renew, every third of the lease; at once when the key goes
        (the watch sets :attr:`wake`). Runs until cancelled; etcd being away only
        means nobody here leads until it answers."""
        try:
            while not self.etcd.closed:
                self.wake.clear()
                try:
                    await asyncio.to_thread(self.step)
                except Unreachable:
                    pass  # is_leader lapses on its own ttl after the last renewal
                except Exception as exc:  # noqa: BLE001 - a lost lease etc.: try again
                    log.warning("cluster leader election: %s", exc)
                await asyncio.to_thread(self.wake.wait, self.ttl / 3)
        finally:
            self.wake.set()  # cancelled: the waiting thread ends now, not a third of ttl later

    def _step(self) -> None:
        if not self._watching:  # from now on: a read's revision, not the key's history
            kvs, revision = self.etcd.range_prefix(self.key)
            self.leader = next((kv.value.decode(errors="replace") for kv in kvs
                                if kv.key == self.key), "")
            self.etcd.watch(self.key, revision, self._on_events,
                            known=(kv.key for kv in kvs))
            self._watching = True
        t0 = time.monotonic()
        if self._lease and not self.etcd.keepalive(self._lease):
            self._lease, self._mine = 0, False  # expired: the key went with it
        if not self._lease:
            self._lease = self.etcd.grant(self.ttl)
        ok, _rev, responses = self.etcd.txn(
            [absent(self.key)], [put_op(self.key, self.name, self._lease)],
            [range_op(self.key)])
        if ok:
            self._became(True, self.name, t0)
            return
        kvs = ((responses[0].get("response_range") or {}).get("kvs") or []) if responses else []
        held = KV.parse(kvs[0]) if kvs else None
        holder = held.value.decode(errors="replace") if held else ""
        lease, rev = (held.lease, held.mod_revision) if held else (0, 0)
        if lease and lease == self._lease:
            self._became(True, self.name, t0)
        elif holder == self.name and rev:
            # ours from an earlier lease (a restart): give it up and campaign afresh
            self.etcd.txn([mod_is(self.key, rev)],
                          [delete_op(self.key)])
            self._became(False, "", t0)
        else:
            self._became(False, holder or "", t0)

    def _became(self, mine: bool, leader: str, t0: float) -> None:
        if mine and not self._mine:
            log.info("replica %s is the cluster's leader", self.name)
        elif self._mine and not mine:
            log.warning("replica %s is no longer the cluster's leader (%s is)", self.name,
                        leader or "nobody")
        self._mine = mine
        self.leader = leader
        if mine:
            self._renewed = t0  # the lease runs from before the request left

    def _on_events(self, events: list[Event], _revision: int) -> None:
        for ev in events:
            if ev.kv.key != self.key:
                continue  # the watch is on a prefix: <prefix>leader... keys of others
            self.leader = "" if ev.deleted else ev.kv.value.decode(errors="replace")
            if ev.deleted:
                self.wake.set()

    def resign(self) -> None:
        """Give the key up at once (daemon stopping): the others campaign now rather
        than after the lease runs out."""
        lease, self._lease, self._mine = self._lease, 0, False
        if lease:
            with contextlib.suppress(Exception):
                self.etcd.call("/v3/lease/revoke", {"ID": str(lease)})

    def health(self) -> dict[str, object]:
        return {"leader": self.leader if self.leader else None, "is_leader": self.is_leader,
                "ttl": self.ttl}

