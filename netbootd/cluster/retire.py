"""GC across replicas: the leader decides what is retired, each replica deletes its copy.

Each replica keeps its own store directory, so each must delete its own files; but the
*decision* must be shared. Taken per replica, a version one replica deletes is still
announced by another, and replication copies it straight back; and a replica cannot
see that a version it does not use is still booting elsewhere. So:

- every replica publishes, in its presence record (``cluster/service.py``), the
  versions it keeps because they are used: open boot sessions, inventory pins, booted
  within ``store.keep_booted_hours`` (``keep``);
- the leader (``cluster/leader.py``) runs retention's plan over its store keeping
  those too, and writes each version it retires as ``<prefix>retired/<image>/<version>``;
- every replica (the leader too) deletes the retired versions its own retention plan
  also lets go (never one active, pinned or in use *here*, whatever was decided), and
  no replica copies a retired version from another;
- the leader removes a retired key once no live replica holds the version, so a build
  dropped again under that name later is an ordinary build.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from .etcd import Etcd, Unreachable, delete_op, put_op
from .leader import Leadership

log = logging.getLogger("netbootd.cluster.retire")

Version = tuple[str, str]


class SharedGc:
    def __init__(self, etcd: Etcd, prefix: str, leadership: Leadership,
                 replicas: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.etcd = etcd
        self.prefix = prefix + "retired/"
        self.leadership = leadership
        self._replicas = replicas
        #: The retired versions as last read (the replicator skips them).
        self.retired: set[Version] = set()

    def read(self) -> set[Version]:
        """The retired set from etcd (blocking; raises ``Unreachable``)."""
        kvs, _ = self.etcd.range_prefix(self.prefix)
        out = set()
        for kv in kvs:
            image, _, version = kv.key[len(self.prefix):].partition("/")
            if image and version:
                out.add((image, version))
        self.retired = out
        return out

    def run(self, store: Any, *, dry_run: bool = False) -> list[Version]:
        """One GC pass over ``store`` (blocking): decide first if this replica leads,
        then delete this replica's copies of retired versions. Returns what it deleted
        (or would, with ``dry_run``)."""
        decided: set[Version] = set()
        try:
            if self.leadership.is_leader:
                decided = self._decide(store, dry_run=dry_run)
            retired = self.read() | decided
        except Unreachable as exc:
            # decisions are final: the ones already read still apply; none is taken now
            log.warning("gc: etcd unreachable, applying the retired versions read "
                        "before (%s)", exc)
            retired = self.retired | decided
        return store.gc(dry_run=dry_run, only=retired)

    def _decide(self, store: Any, *, dry_run: bool) -> set[Version]:
        replicas = self._replicas()
        keep = set(store.kept_for_use())
        held: set[Version] = {(r.name, r.version) for r in store.all_refs()}
        for d in replicas.values():
            keep |= _versions(d.get("keep"))
            held |= _versions(d.get("versions"))
        decided = set(store.gc_plan(keep))
        if dry_run:
            return decided
        already = self.read()
        stamp = json.dumps({"by": self.leadership.name, "when": time.time()})
        new = sorted(decided - already)
        gone = sorted(already - held)  # no live replica holds it any more
        ops = [put_op(self._key(v), stamp) for v in new] + \
              [delete_op(self._key(v)) for v in gone]
        for i in range(0, len(ops), 100):
            self.etcd.txn([], ops[i:i + 100])
        if new:
            log.info("gc: retired for the whole cluster: %s",
                     ", ".join(f"{i} {v}" for i, v in new))
        return decided

    def _key(self, v: Version) -> str:
        return f"{self.prefix}{v[0]}/{v[1]}"

    def health(self) -> dict[str, Any]:
        return {"retired": sorted(f"{i} {v}" for i, v in self.retired)}


def _versions(keys: Any) -> set[Version]:
    """{("image", "version")} of a presence list of "image version" strings."""
    out = set()
    for key in keys or []:
        image, _, version = str(key).partition(" ")
        if image and version:
            out.add((image, version))
    return out
