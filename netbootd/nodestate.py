"""Runtime node state (the provisioning lifecycle), kept apart from ``nodes.yaml``.

``nodes.yaml`` says what an operator wants by default; this says what happened to
each machine since: it was installed, is installing (with progress), failed, or an
operator asked for a reinstall. The planner reads it (``get``); lifecycle reports
and operator verbs change it (``compare_and_set``), never a protocol service.

One small interface (:class:`NodeState`: get / put / compare-and-set / watch) so a
shared backend (etcd) can replace the local files without touching any service.
:class:`LocalNodeState` keeps one JSON file per node under the state directory,
written the crash-safe way (temp file, fsync, rename, fsync of the directory), so a
power cut leaves either the old or the new record, never half of one. Writers in
other processes (``netbootd nodes reinstall`` beside a running daemon) serialise on
an ``flock``; readers see a change on their next ``get`` (a stat per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from .durable import fsync_dir
from .errors import Conflict
from .model import normalise_mac


class Stage(StrEnum):
    """Where a node is in its provisioning lifecycle."""

    INSTALL = "install"  #: install at the next network boot (operator asked, or retry)
    INSTALLING = "installing"  #: the installer is writing the disk (progress in %)
    INSTALLED = "installed"  #: the disk holds the image; netbootd stays silent
    LOCAL = "local"  #: the node booted from its disk
    FAILED = "install-failed"  #: the installer reported a failure (reason kept)
    NETBOOT = "netboot"  #: the operator asked for network boots whatever nodes.yaml says


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node's lifecycle record. ``rev`` grows by one with every write (CAS)."""

    mac: str
    stage: Stage
    rev: int = 0
    image: str | None = None  #: the disk image installed / being installed
    version: str | None = None
    progress: int | None = None  #: percent, while installing
    reason: str = ""
    since: float = 0.0  #: when the stage was entered
    updated: float = 0.0
    by: str = "node"  #: node | cli | api
    #: The inventory action in force when this was written: an edit of nodes.yaml that
    #: changes the node's action wins over older runtime state (see planner.effective).
    desired: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Stage) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeRecord:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["stage"] = Stage(values["stage"])
        values["mac"] = normalise_mac(values["mac"])
        return cls(**values)


class NodeState(Protocol):
    """The seam for a shared backend: local files today, etcd later."""

    def get(self, mac: str) -> NodeRecord | None:
        ...

    def put(self, record: NodeRecord) -> NodeRecord:
        """Write unconditionally; returns the record with its new ``rev``."""
        ...

    def compare_and_set(self, mac: str, expected_rev: int | None,
                        record: NodeRecord | None) -> NodeRecord | None:
        """Write (or delete, with ``None``) only if the stored rev is ``expected_rev``
        (``None`` = no record yet); raises :class:`errors.Conflict` otherwise."""
        ...

    def all(self) -> list[NodeRecord]:
        ...

    def watch(self) -> AsyncIterator[str]:
        """MACs whose record changed, as they change (any writer, any process)."""
        ...


class LocalNodeState:
    """:class:`NodeState` as one JSON file per node in ``directory``."""

    SUFFIX = ".json"

    def __init__(self, directory: Path, *, max_nodes: int = 100_000, create: bool = True
                 ) -> None:
        self.dir = Path(directory)
        if create:  # readers (``netbootd plan``) leave no trace, not even a directory
            self.dir.mkdir(parents=True, exist_ok=True)
        self.max_nodes = max_nodes
        self._lock = threading.Lock()
        #: mac -> (mtime_ns, size, record): re-read only when the file changed.
        self._cache: dict[str, tuple[int, int, NodeRecord | None]] = {}

    def _path(self, mac: str) -> Path:
        return self.dir / (normalise_mac(mac).replace(":", "-") + self.SUFFIX)

    # -- reading ---------------------------------------------------------------------------
    def get(self, mac: str) -> NodeRecord | None:
        path = self._path(mac)
        try:
            st = path.stat()
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(mac, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(mac)
        if hit is not None and hit[:2] == key:
            return hit[2]
        record = self._read(path)
        with self._lock:
            if len(self._cache) >= self.max_nodes:
                self._cache.clear()
            self._cache[mac] = (*key, record)
        return record

    @staticmethod
    def _read(path: Path) -> NodeRecord | None:
        try:
            return NodeRecord.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # A record we cannot read is treated as absent: the inventory's action
            # applies, which is what a node without history gets.
            return None

    def all(self) -> list[NodeRecord]:
        out = []
        for p in sorted(self.dir.glob("*" + self.SUFFIX)):
            rec = self._read(p)
            if rec is not None:
                out.append(rec)
        return out

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across processes (daemon and CLI)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def put(self, record: NodeRecord) -> NodeRecord:
        with self._locked():
            current = self._read(self._path(record.mac))
            return self._write(record, current)

    def compare_and_set(self, mac: str, expected_rev: int | None,
                        record: NodeRecord | None) -> NodeRecord | None:
        mac = normalise_mac(mac)
        with self._locked():
            current = self._read(self._path(mac))
            have = current.rev if current is not None else None
            if have != expected_rev:
                raise Conflict(f"node {mac} changed meanwhile (rev {have}, expected "
                               f"{expected_rev}); try again")
            if record is None:
                with contextlib.suppress(FileNotFoundError):
                    self._path(mac).unlink()
                    fsync_dir(self.dir)
                return None
            return self._write(record, current)

    def _write(self, record: NodeRecord, current: NodeRecord | None) -> NodeRecord:
        if current is None and self._count() >= self.max_nodes:
            raise Conflict(f"node state holds {self.max_nodes} nodes already")
        now = time.time()
        rec = replace(record, rev=(current.rev + 1) if current else 1, updated=now,
                      since=record.since or now)
        path = self._path(rec.mac)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = json.dumps(rec.to_json(), sort_keys=True).encode()
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)
        return rec

    def _count(self) -> int:
        return sum(1 for _ in self.dir.glob("*" + self.SUFFIX))

    async def watch(self) -> AsyncIterator[str]:
        from watchfiles import awatch

        async for changes in awatch(self.dir, debounce=50, step=20):
            for _, name in changes:
                base = Path(name).name
                if base.endswith(self.SUFFIX) and not base.startswith("."):
                    yield normalise_mac(base[: -len(self.SUFFIX)])
            await asyncio.sleep(0)
