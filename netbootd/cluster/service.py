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

from .etcd import Unreachable, put_op
from .replication import Replicator, manifest_hash

log = logging.getLogger("netbootd.cluster.service")

#: Seconds between presence writes; the lease is three of them.
BEAT = 3.0


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
        s = app.settings
        self.url = s.cluster.peer_url or \
            f"http://{s.network.advertise or socket.gethostname()}:{s.http.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="cluster-presence")
        if self.app.settings.cluster.replicate:
            self._copier = asyncio.create_task(self._copy_loop(), name="cluster-replication")
        # an activation through the API waits until every live replica holds the version
        self.cluster.store_state().gate = self.lacking

    def lacking(self, image: str, version: str) -> list[str]:
        """Live replicas (as of the last presence read) that do not hold this version."""
        key = f"{image} {version}"
        return sorted(n for n, d in self.replicas.items()
                      if n != self.cluster.name and key not in d.get("versions", []))

    async def _copy_loop(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            try:
                await self.replicator.step(self.replicas)
            except Exception:
                log.exception("replication step failed")

    async def stop(self) -> None:
        for task in (self._task, self._copier):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
        me = {"name": self.cluster.name, "since": self.since, "seen": time.time(),
              "url": self.url, "versions": sorted(held), "hashes": held}
        etcd.txn([], [put_op(prefix + self.cluster.name, json.dumps(me),
                              self._lease)])
        kvs, _ = etcd.range_prefix(prefix)
        replicas = {}
        for kv in kvs:
            with contextlib.suppress(ValueError):
                d = json.loads(kv.value)
                replicas[d.get("name", kv.key[len(prefix):])] = d
        self.replicas = replicas
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
        h["bound"] = [f"replica {self.cluster.name}",
                      f"{len(self.replicas)} replicas live",
                      f"etcd members {', '.join(self.members) or '?'}"]
        return h


def create(app: Any) -> ClusterService:
    return ClusterService(app)
