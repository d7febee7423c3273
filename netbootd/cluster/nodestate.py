""":class:`nodestate.NodeState` in etcd: the lifecycle records every replica shares.

One key per node, ``<prefix>nodes/<mac>``, holding the same JSON as a local record.
A record's ``rev`` is the key's etcd *mod revision*, so compare-and-set is one etcd
transaction comparing it (``None``: the key must not exist); revisions grow with every
write, as the interface promises (by more than one: other keys share the counter).

Reads never wait for etcd: the planner asks :meth:`get` on the DHCP path, so every
record is kept in memory, loaded once at start and then followed by a watch. A write
answered by etcd updates the memory at once, so a replica reads its own writes. While
etcd is unreachable the memory keeps serving (known nodes keep booting as they were);
writes fail with :class:`errors.Conflict` saying so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ..errors import Conflict
from ..model import normalise_mac
from ..nodestate import NodeRecord
from .etcd import Etcd, Event, Unreachable, absent, delete_op, mod_is, put_op, range_op

log = logging.getLogger("netbootd.cluster.nodestate")


class EtcdNodeState:
    """The lifecycle records under ``<prefix>nodes/`` (see the module docstring)."""

    def __init__(self, etcd: Etcd, prefix: str, *, max_nodes: int = 100_000) -> None:
        self.etcd = etcd
        self.prefix = prefix + "nodes/"
        self.max_nodes = max_nodes
        self._lock = threading.Lock()
        self._records: dict[str, NodeRecord] = {}
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str]]] = []
        self.loaded = False
        self._load()

    def _key(self, mac: str) -> str:
        return self.prefix + normalise_mac(mac)

    def _parse(self, value: bytes, revision: int) -> NodeRecord | None:
        try:
            return replace(NodeRecord.from_json(json.loads(value)), rev=revision)
        except (ValueError, KeyError, TypeError):
            return None  # unreadable = absent, as for a local file

    def _load(self) -> None:
        """Read every record, then follow changes from that revision on. Without etcd
        at start the memory is empty and a thread retries the read until it answers
        (one warning, not one per try)."""
        try:
            self._read()
        except Unreachable as exc:
            log.warning("node state: %s; starting without records, retrying", exc)
            threading.Thread(target=self._retry_load, daemon=True,
                             name="etcd-nodestate-load").start()

    def _read(self) -> None:
        kvs, revision = self.etcd.range_prefix(self.prefix)
        with self._lock:
            for kv in kvs:
                rec = self._parse(kv.value, kv.mod_revision)
                if rec is not None:
                    self._records[rec.mac] = rec
        self.loaded = True
        self.etcd.watch(self.prefix, revision, self._on_events, known=(kv.key for kv in kvs))

    def _retry_load(self) -> None:
        while not self.loaded and not self.etcd.closed:
            time.sleep(self.etcd.timeout)
            try:
                self._read()
            except Exception as exc:  # noqa: BLE001 - keep trying
                log.debug("node state load: %s", exc)
            else:
                log.info("node state: %d records read from etcd", len(self._records))

    def _on_events(self, events: list[Event], _revision: int) -> None:
        changed = []
        with self._lock:
            for ev in events:
                mac = ev.kv.key[len(self.prefix):]
                have = self._records.get(mac)
                if have is not None and have.rev > ev.kv.mod_revision:
                    continue  # our own newer write got here first
                if ev.deleted:
                    self._records.pop(mac, None)
                else:
                    rec = self._parse(ev.kv.value, ev.kv.mod_revision)
                    if rec is None:
                        continue
                    self._records[rec.mac] = rec
                changed.append(mac)
        self._tell(changed)

    def _tell(self, macs: list[str]) -> None:
        for loop, queue in list(self._listeners):
            for mac in macs:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, mac)
                except RuntimeError:  # that loop is closed
                    pass

    # -- the NodeState interface ---------------------------------------------------------------
    def get(self, mac: str) -> NodeRecord | None:
        with self._lock:
            return self._records.get(normalise_mac(mac))

    def all(self) -> list[NodeRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.mac)

    def put(self, record: NodeRecord) -> NodeRecord:
        mac = normalise_mac(record.mac)
        return self._write(mac, None, replace(record, mac=mac), conditional=False)

    def compare_and_set(self, mac: str, expected_rev: int | None,
                        record: NodeRecord | None) -> NodeRecord | None:
        mac = normalise_mac(mac)
        return self._write(mac, expected_rev, record, conditional=True)

    def _write(self, mac: str, expected_rev: int | None, record: NodeRecord | None, *,
               conditional: bool) -> NodeRecord | None:
        key = self._key(mac)
        current = self.get(mac)
        if record is not None and current is None and len(self._records) >= self.max_nodes:
            raise Conflict(f"node state holds {self.max_nodes} nodes already")
        compare = []
        if conditional:
            compare = [absent(key) if expected_rev is None else mod_is(key, expected_rev)]
        rec = None
        if record is None:
            ops = [delete_op(key)]
        else:
            now = time.time()
            rec = replace(record, mac=mac, updated=now, since=record.since or now)
            ops = [put_op(key, json.dumps(rec.to_json(), sort_keys=True))]
        try:
            ok, revision, responses = self.etcd.txn(compare, ops, [range_op(key)])
        except Unreachable as exc:
            raise Conflict(f"node {mac}: the cluster's etcd is unreachable, nothing was "
                           f"written ({exc})") from exc
        if not ok:
            kvs = (responses[0].get("response_range", {}).get("kvs") or []) if responses else []
            have = int(kvs[0]["mod_revision"]) if kvs else None
            raise Conflict(f"node {mac} changed meanwhile (rev {have}, expected "
                           f"{expected_rev}); try again")
        with self._lock:
            if rec is None:
                self._records.pop(mac, None)
            else:
                rec = replace(rec, rev=revision)
                self._records[mac] = rec
        return rec

    async def watch(self) -> AsyncIterator[str]:
        """MACs whose record changed (any replica, any process), as etcd reports them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        entry = (loop, queue)
        self._listeners.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.remove(entry)
