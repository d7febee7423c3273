"""Channel pointers, pins and the activation history in etcd, shared by every replica.

The image store keeps its bytes on each replica's own disk; *which* version a channel
points at, which machine is pinned to what, and how it came to be, is cluster state.
:class:`EtcdChannels` and :class:`EtcdPins` are the store's ``Channels`` and ``Pins``
with that state in etcd (the store builds them through its one seam,
``ImageStore(shared=...)``), so retention, intake, lookup and the API work unchanged.

Keys under ``<prefix>store/``: ``channels/<image>/<channel>`` (the version),
``pins/<mac>`` (JSON), ``history/<time_ns>-<replica>`` (one JSON entry each; the key
orders them). All of it is held in memory, loaded at start and followed by one watch:
the planner resolves a channel on every new boot and never waits for etcd, and an
activation through any replica's API reaches every replica within the watch's delay
(milliseconds on a LAN). An activation is one transaction that checks the pointer is
still what this replica last saw and writes the pointer and its history entry
together; while etcd is unreachable it is refused with a clear error rather than
changing one replica alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from ..store.catalogue import Versions
from ..store.errors import Conflict, valid_mac, valid_name
from ..store.layout import Layout, now_iso
from ..store.pins import Pins
from ..store.pointers import Channels
from ..store.signals import Signals
from .etcd import Etcd, Event, Unreachable, absent, delete_op, mod_is, put_op, range_op

log = logging.getLogger("netbootd.cluster.pointers")


class StoreMirror:
    """This replica's copy of ``<prefix>store/``: loaded once, then watched."""

    def __init__(self, etcd: Etcd, prefix: str, replica: str) -> None:
        self.etcd = etcd
        self.prefix = prefix + "store/"
        self.replica = replica
        self.lock = threading.Lock()
        self.pointers: dict[tuple[str, str], tuple[str, int]] = {}  #: -> (version, mod rev)
        self.pins: dict[str, dict] = {}
        self.history: dict[str, dict] = {}  #: key -> entry (sorted on read)
        #: Called (client thread) with ("channel", image, channel) / ("pin", mac) when
        #: another writer changed something: the store's listeners must hear it.
        self.listeners: list[Any] = []
        #: (image, version) -> why an operator's activation is refused now (too few live
        #: replicas hold it: cluster/quorum.py), or None; set by the cluster service.
        #: Auto-activation at ingest is not held back: the replicas that lack the
        #: version stay silent for it until their copy lands.
        self.gate: Any = None
        #: False until the first full read: a replica started while etcd is unreachable
        #: knows no pointer (boots nothing rather than a guess) and refuses every change.
        self.loaded = False
        try:
            self._load()
        except Unreachable as exc:
            log.warning("channel pointers: %s; nothing is planned until etcd answers", exc)
            threading.Thread(target=self._retry, name="etcd-store-load", daemon=True).start()

    def _load(self) -> None:
        kvs, revision = self.etcd.range_prefix(self.prefix)
        with self.lock:
            for kv in kvs:
                self._apply(kv.key, kv.value, kv.mod_revision, deleted=False)
            self.loaded = True
        self.etcd.watch(self.prefix, revision, self._on_events, known=(kv.key for kv in kvs))

    def _retry(self) -> None:
        while not self.loaded and not self.etcd.closed:
            time.sleep(self.etcd.timeout)
            try:
                self._load()
            except Unreachable:
                continue
            for fn in list(self.listeners):
                try:
                    fn(("channel", "", ""))
                except Exception:
                    log.exception("store change listener failed")

    def _apply(self, key: str, value: bytes, rev: int, *, deleted: bool) -> tuple | None:
        rest = key[len(self.prefix):]
        kind, _, name = rest.partition("/")
        if kind == "channels":
            image, _, channel = name.partition("/")
            have = self.pointers.get((image, channel))
            if have is not None and have[1] > rev:
                return None
            if deleted:
                self.pointers.pop((image, channel), None)
            else:
                self.pointers[(image, channel)] = (value.decode().strip(), rev)
            return ("channel", image, channel)
        if kind == "pins":
            if deleted:
                self.pins.pop(name, None)
            else:
                try:
                    self.pins[name] = json.loads(value)
                except ValueError:
                    return None
            return ("pin", name)
        if kind == "history":
            if deleted:
                self.history.pop(key, None)
            else:
                try:
                    self.history[key] = json.loads(value)
                except ValueError:
                    return None
            return None
        return None

    def _on_events(self, events: list[Event], _revision: int) -> None:
        changes = []
        with self.lock:
            for ev in events:
                c = self._apply(ev.kv.key, ev.kv.value, ev.kv.mod_revision, deleted=ev.deleted)
                if c is not None:
                    changes.append(c)
        for c in changes:
            for fn in list(self.listeners):
                try:
                    fn(c)
                except Exception:
                    log.exception("store change listener failed")

    def need_loaded(self, what: str) -> None:
        if not self.loaded:
            raise self.refused(what, Unreachable("not read from etcd yet"))

    def refused(self, what: str, exc: Exception) -> Conflict:
        return Conflict(f"{what} refused: the cluster's etcd is unreachable from replica "
                        f"{self.replica}, so the other replicas could not see it; nothing "
                        f"was changed ({exc})")


def _follow(mirror: StoreMirror, signals: Signals, kind: str) -> None:
    """Another writer's change of this ``kind`` ("channel", "pin") reaches the store's
    listeners, as a change made here does."""
    def remote(change: tuple) -> None:
        if change[0] == kind:
            signals.changed()
    mirror.listeners.append(remote)


class EtcdChannels(Channels):
    """``Channels`` with pointers and history in etcd (see the module docstring)."""

    def __init__(self, mirror: StoreMirror, layout: Layout, versions: Versions,
                 signals: Signals, lock: threading.RLock) -> None:
        super().__init__(layout, versions, signals, lock)
        self.mirror = mirror
        _follow(mirror, signals, "channel")

    def _key(self, image: str, channel: str) -> str:
        return f"{self.mirror.prefix}channels/{image}/{channel}"

    def active(self, image: str, channel: str) -> str | None:
        with self.mirror.lock:
            hit = self.mirror.pointers.get((image, channel))
        return hit[0] if hit else None

    def channels(self, image: str) -> dict[str, str]:
        with self.mirror.lock:
            return {c: v for (i, c), (v, _) in sorted(self.mirror.pointers.items())
                    if i == image and v}

    def history(self, image: str | None = None) -> list[dict]:
        with self.mirror.lock:
            rows = [self.mirror.history[k] for k in sorted(self.mirror.history)]
        return [r for r in rows if image is None or r.get("image") == image]

    def activate(self, image: str, version: str, channel: str, *, by: str = "cli",
                 why: str = "") -> None:
        valid_name(channel, "channel")
        self.versions.need(image, version)
        self.mirror.need_loaded(f"activating {image} {version} on {channel}")
        gate = self.mirror.gate
        why_not = gate(image, version) if gate is not None and by != "auto" else None
        if why_not:
            raise Conflict(why_not)
        key = self._key(image, channel)
        with self._lock:
            with self.mirror.lock:
                hit = self.mirror.pointers.get((image, channel))
            previous = hit[0] if hit else None
            if previous == version:
                log.info("%s %s already active on %s", image, version, channel)
                return
            entry = {"when": now_iso(), "image": image, "version": version,
                     "channel": channel, "previous": previous, "by": by, "why": why,
                     "replica": self.mirror.replica}
            hkey = f"{self.mirror.prefix}history/{time.time_ns():020d}-{self.mirror.replica}"
            try:
                ok, revision, _ = self.mirror.etcd.txn(
                    [mod_is(key, hit[1]) if hit else absent(key)],
                    [put_op(key, version + "\n"), put_op(hkey, json.dumps(entry, sort_keys=True))],
                    [range_op(key)])
            except Unreachable as exc:
                raise self.mirror.refused(f"activating {image} {version} on {channel}",
                                          exc) from exc
            if not ok:
                raise Conflict(f"{image}/{channel} was changed by another replica meanwhile "
                               "(see the history); try again")
            with self.mirror.lock:
                self.mirror.pointers[(image, channel)] = (version, revision)
                self.mirror.history[hkey] = entry
        log.info("activated %s %s on %s (was %s) by %s", image, version, channel, previous, by,
                 extra={"image": image, "version": version, "channel": channel})
        self.signals.activation(image, channel)
        self.signals.event(f"activated {image} {version} on {channel}", image=image,
                           version=version, channel=channel, previous=previous, by=by,
                           outcome="activated")
        self.signals.changed()

    def record_recovery(self, image: str, channel: str, version: str | None,
                        previous: str | None, why: str) -> None:
        """Start-up repair is about this replica's disk; the shared pointers are not
        changed by it (a version this replica lacks is simply not planned here)."""
        log.info("recovery: %s/%s: %s (shared pointer left as it is)", image, channel, why)

    def prune_history(self, keep: int, *, dry_run: bool = False) -> int:
        """The same rules as the local file, applied to the history keys."""
        with self.mirror.lock:
            items = sorted(self.mirror.history.items())
        seen: dict[tuple[str, str], int] = {}
        drop = []
        for key, d in reversed(items):
            k = (str(d.get("image")), str(d.get("channel")))
            seen[k] = seen.get(k, 0) + 1
            version = d.get("version")
            exists = isinstance(version, str) and self.versions.manifest(
                str(d.get("image")), version) is not None
            if seen[k] > keep and not exists:
                drop.append(key)
        if drop and not dry_run:
            try:
                for i in range(0, len(drop), 100):
                    self.mirror.etcd.txn([], [delete_op(k) for k in drop[i:i + 100]])
            except Unreachable as exc:
                raise self.mirror.refused("pruning the history", exc) from exc
            with self.mirror.lock:
                for k in drop:
                    self.mirror.history.pop(k, None)
        return len(drop)


class EtcdPins(Pins):
    """``Pins`` with one etcd key per pinned MAC."""

    def __init__(self, mirror: StoreMirror, layout: Layout, versions: Versions,
                 signals: Signals, lock: threading.RLock) -> None:
        super().__init__(layout, versions, signals, lock)
        self.mirror = mirror
        _follow(mirror, signals, "pin")

    def pins(self) -> dict[str, dict]:
        with self.mirror.lock:
            return {k: dict(v) for k, v in self.mirror.pins.items()
                    if isinstance(v, dict) and v.get("version")}

    def pin(self, mac: str, version: str, image: str | None = None, *, by: str = "cli") -> None:
        mac = valid_mac(mac)
        image = self.image_of(version, image)
        self.mirror.need_loaded(f"pinning {mac}")
        value = {"version": version, "image": image, "by": by, "when": now_iso()}
        try:
            self.mirror.etcd.put(f"{self.mirror.prefix}pins/{mac}",
                                 json.dumps(value, sort_keys=True))
        except Unreachable as exc:
            raise self.mirror.refused(f"pinning {mac}", exc) from exc
        with self.mirror.lock:
            self.mirror.pins[mac] = value
        self.signals.event(f"pinned {mac} to {image} {version}", mac=mac, image=image,
                           version=version, by=by, outcome="pinned")
        self.signals.changed()

    def unpin(self, mac: str) -> None:
        mac = valid_mac(mac)
        if mac not in self.pins():
            raise Conflict(f"{mac} is not pinned")
        try:
            self.mirror.etcd.delete(f"{self.mirror.prefix}pins/{mac}")
        except Unreachable as exc:
            raise self.mirror.refused(f"unpinning {mac}", exc) from exc
        with self.mirror.lock:
            self.mirror.pins.pop(mac, None)
        self.signals.event(f"unpinned {mac}", mac=mac, outcome="unpinned")
        self.signals.changed()


class SharedStoreState:
    """What ``ImageStore(shared=...)`` takes: factories for its channels and pins."""

    def __init__(self, etcd: Etcd, prefix: str, replica: str) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._replica = replica
        self._mirror: StoreMirror | None = None
        self.gate: Any = None  #: handed to the mirror (see StoreMirror.gate)

    def mirror(self) -> StoreMirror:
        if self._mirror is None:
            self._mirror = StoreMirror(self._etcd, self._prefix, self._replica)
        self._mirror.gate = self._gate
        return self._mirror

    def _gate(self, image: str, version: str) -> str | None:
        return self.gate(image, version) if self.gate is not None else None

    def channels(self, layout: Layout, versions: Versions, signals: Signals,
                 lock: threading.RLock) -> Channels:
        return EtcdChannels(self.mirror(), layout, versions, signals, lock)

    def pins(self, layout: Layout, versions: Versions, signals: Signals,
             lock: threading.RLock) -> Pins:
        return EtcdPins(self.mirror(), layout, versions, signals, lock)
