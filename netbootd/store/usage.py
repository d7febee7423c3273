"""Logical and physical bytes: what the versions hold, and what the disk holds for them.

*Logical* bytes are what the manifests declare: every version a full tree. *Physical*
bytes count each inode once (versions share files through the content pool, objects.py):
for an image, the distinct files its versions link; for the store, the distinct files of
every version. A file shared by two images counts in both images' physical bytes and
once in the store's. Sizes are file sizes (``st_size``), not blocks: the figure says what
sharing saves, the same on every file system.

A promoted version never changes, so its inodes are read once (an ``lstat`` per
artefact) and cached until the version is gone.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from .catalogue import Versions
from .layout import Layout
from .manifest import MANIFEST

#: (st_dev, st_ino) -> st_size of one version's regular files
Inodes = dict[tuple[int, int], int]


@dataclass(frozen=True)
class Bytes:
    logical: int
    physical: int

    def to_dict(self) -> dict[str, int]:
        return {"logical_bytes": self.logical, "physical_bytes": self.physical}


@dataclass(frozen=True)
class StoreUsage:
    images: dict[str, Bytes]
    total: Bytes


class Usage:
    """Bytes per image and for the whole store, from the promoted versions."""

    def __init__(self, layout: Layout, versions: Versions) -> None:
        self.layout = layout
        self.versions = versions
        self._lock = threading.Lock()
        self._inodes: dict[tuple[str, str], tuple[Inodes, int]] = {}

    def _version(self, image: str, version: str) -> tuple[Inodes, int] | None:
        """(the version's inodes, its logical bytes: artefacts plus manifest.json)."""
        key = (image, version)
        with self._lock:
            hit = self._inodes.get(key)
        if hit is not None:
            return hit
        m = self.versions.manifest(image, version)
        if m is None:
            return None
        root = self.layout.version_dir(image, version)
        out: Inodes = {}
        logical = 0
        for rel in (MANIFEST, *(a.path for a in m.artefacts)):
            try:
                st = os.lstat(root / rel)
            except FileNotFoundError:
                return None  # being deleted
            out[(st.st_dev, st.st_ino)] = st.st_size
            logical += st.st_size
        with self._lock:
            self._inodes[key] = (out, logical)
        return out, logical

    def report(self) -> StoreUsage:
        images: dict[str, Bytes] = {}
        everything: Inodes = {}
        logical_total = 0
        present: set[tuple[str, str]] = set()
        for image in self.versions.images():
            mine: Inodes = {}
            logical = 0
            for v in self.versions.versions(image):
                hit = self._version(image, v)
                if hit is None:
                    continue
                present.add((image, v))
                mine.update(hit[0])
                logical += hit[1]
            images[image] = Bytes(logical, sum(mine.values()))
            everything.update(mine)
            logical_total += logical
        with self._lock:
            for gone in set(self._inodes) - present:
                del self._inodes[gone]
        return StoreUsage(images, Bytes(logical_total, sum(everything.values())))

