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
import time
from typing import Any

from .etcd import Unreachable, put_op

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

    async def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="cluster-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._lease:  # leave the list at once rather than after the lease
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(
                    self.cluster.etcd.call, "/v3/lease/revoke", {"ID": str(self._lease)}),
                    0.5)

    def _held(self) -> list[str]:
        store = self.app.store
        if store is None:
            return []
        return sorted(f"{r.name} {r.version}" for r in store.all_refs())

    def _once(self) -> None:
        """One presence write and read-back (blocking: run in a thread)."""
        etcd = self.cluster.etcd
        prefix = self.cluster.prefix + "replicas/"
        if not self._lease:
            self._lease = etcd.grant(3 * BEAT)
        me = {"name": self.cluster.name, "since": self.since, "seen": time.time(),
              "versions": self._held()}
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
        h["bound"] = [f"replica {self.cluster.name}",
                      f"{len(self.replicas)} replicas live",
                      f"etcd members {', '.join(self.members) or '?'}"]
        return h


def create(app: Any) -> ClusterService:
    return ClusterService(app)
