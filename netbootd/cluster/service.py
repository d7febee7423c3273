"""The ``cluster`` service: this replica's presence in etcd, and the cluster's health.

Only runs with ``cluster.backend: etcd``. Every few seconds it writes
``<prefix>replicas/<name>`` on a short lease (who is alive, since when, which versions
its store holds) and reads every replica's entry back, so /readyz, the status page and
``/api/v1`` show the cluster: replicas, the versions each holds, etcd's members and
whether this replica reaches etcd. A replica that dies leaves the list when its lease
runs out. /readyz reports *not ready* while etcd is unreachable: the replica still
serves open boots and known nodes from memory, but a load balancer or an operator
should know that activations are refused here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any

from . import quorum
from .addresses import SharedAddresses
from .etcd import Unreachable, put_op
from .leader import Leadership
from .replication import Replicator, manifest_hash
from .retire import SharedGc

log = logging.getLogger("netbootd.cluster.service")

#: Seconds between presence writes; the lease is three of them.
BEAT = 3.0
#: The leader's lease: a dead leader is replaced at most this long after it stopped.
LEADER_TTL = 9.0


class ClusterService:
    name = "cluster"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cluster = app.cluster
        self._task: asyncio.Task | None = None
        self._lease = 0
        self.since = time.time()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.members: list[str] = []
        self._hashes: dict[tuple[str, str], str] = {}
        self.replicator = Replicator(lambda: app.store, self.cluster.name)
        self._copier: asyncio.Task | None = None
        self._leader: asyncio.Task | None = None
        #: Who leads the jobs that run once per cluster (cluster/leader.py).
        self.leadership = Leadership(self.cluster.etcd, self.cluster.prefix, self.cluster.name,
                                     LEADER_TTL)
        self.cluster.leadership = self.leadership
        #: The cluster's GC decision (the leader retires, each replica deletes its copy).
        self.gc = SharedGc(self.cluster.etcd, self.cluster.prefix, self.leadership,
                           lambda: self.replicas)
        self.cluster.gc = self.gc
        s = app.settings
        self.url = s.cluster.peer_url or \
            f"http://{s.network.advertise or socket.gethostname()}:{s.http.port}"
        #: Learnt client addresses, published to and learnt from the other replicas.
        self.addresses = SharedAddresses(self.cluster.etcd, self.cluster.prefix,
                                         self.cluster.name, app.clients,
                                         max_entries=s.network.max_addresses)

    async def start(self) -> None:
        await asyncio.to_thread(self.addresses.start)
        self._task = asyncio.create_task(self._beat(), name="cluster-presence")
        if self.app.settings.cluster.replicate:
            self._copier = asyncio.create_task(self._copy_loop(), name="cluster-replication")
        self._leader = asyncio.create_task(self.leadership.run(), name="cluster-leader")
        # an activation through the API waits until enough live replicas hold the version
        self.cluster.store_state().gate = self.refusal

    def refusal(self, image: str, version: str) -> str | None:
        """Why an operator's activation is refused (too few live replicas hold the
        version, as of the last presence read), or None."""
        return quorum.refusal(image, version, self.replicas, self.cluster.name,
                              self.app.settings.cluster.activation_quorum)

    async def _copy_loop(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            try:
                await self.replicator.step(self.replicas, skip=self.gc.retired)
            except Exception:
                log.exception("replication step failed")

    async def stop(self) -> None:
        self.leadership.wake.set()  # the leader loop's wait ends now
        self.addresses.stop()
        for task in (self._task, self._copier, self._leader):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):  # the others campaign now, not after the lease
            await asyncio.wait_for(asyncio.to_thread(self.leadership.resign), 0.5)
        if self._lease:  # leave the list at once rather than after the lease
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(
                    self.cluster.etcd.call, "/v3/lease/revoke", {"ID": str(self._lease)}),
                    0.5)

    def _held(self) -> dict[str, str]:
        """"image version" -> manifest sha256 of every version this replica holds."""
        store = self.app.store
        if store is None:
            return {}
        out = {}
        for r in store.all_refs():
            digest = self._hashes.get((r.name, r.version))
            if digest is None:
                with contextlib.suppress(OSError):
                    digest = self._hashes[(r.name, r.version)] = manifest_hash(r)
            if digest:
                out[f"{r.name} {r.version}"] = digest
        return out

    def _once(self) -> None:
        """One presence write and read-back (blocking: run in a thread)."""
        etcd = self.cluster.etcd
        prefix = self.cluster.prefix + "replicas/"
        if self._lease and not etcd.keepalive(self._lease):  # expired: start anew
            self._lease = 0
        if not self._lease:
            self._lease = etcd.grant(3 * BEAT)
        held = self._held()
        store = self.app.store
        keep = sorted(f"{i} {v}" for i, v in store.kept_for_use()) if store is not None else []
        me = {"name": self.cluster.name, "since": self.since, "seen": time.time(),
              "url": self.url, "versions": sorted(held), "hashes": held, "keep": keep}
        etcd.txn([], [put_op(prefix + self.cluster.name, json.dumps(me),
                              self._lease)])
        kvs, _ = etcd.range_prefix(prefix)
        replicas = {}
        for kv in kvs:
            with contextlib.suppress(ValueError):
                d = json.loads(kv.value)
                replicas[d.get("name", kv.key[len(prefix):])] = d
        self.replicas = replicas
        self.gc.read()  # the replicator never copies a retired version back
        self.members = sorted(m.get("name", "?") for m in etcd.members())

    async def _beat(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._once)
            except Unreachable:
                self._lease = 0  # it may have expired meanwhile: a new one next time
            except Exception as exc:  # noqa: BLE001 - a lost lease etc.: start over
                log.warning("cluster presence: %s", exc)
                self._lease = 0
            await asyncio.sleep(BEAT)

    def health(self) -> dict[str, Any]:
        h = self.cluster.health()
        h["replicas"] = {n: {"versions": d.get("versions", []), "since": d.get("since")}
                         for n, d in sorted(self.replicas.items())}
        h["etcd_members"] = self.members
        h["replication"] = self.replicator.health()
        h["leader"] = self.leadership.leader or None
        h["is_leader"] = self.leadership.is_leader
        h["activation_quorum"] = self.app.settings.cluster.activation_quorum
        h["gc"] = self.gc.health()
        h["addresses"] = self.addresses.health()
        h["bound"] = [f"replica {self.cluster.name}",
                      f"leader {self.leadership.leader or '(none yet)'}",
                      f"{len(self.replicas)} replicas live",
                      f"etcd members {', '.join(self.members) or '?'}"]
        return h


def create(app: Any) -> ClusterService:
    return ClusterService(app)
