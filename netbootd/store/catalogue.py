"""The promoted versions: manifests, ImageRefs, which images and versions exist. Read-only.

A promoted version never changes, so its manifest and ImageRef are cached for ever (a
rootfs may list tens of thousands of artefacts: parsing once matters); the cache entry
goes when the version directory does (GC, or another process's GC).
"""

from __future__ import annotations

import logging
import threading

from ..model import DiskImage, ImageRef
from .errors import NotFound, valid_name
from .layout import Layout
from .manifest import MANIFEST, Manifest, ManifestError, check_name, parse_manifest

log = logging.getLogger("netbootd.store")


class Versions:
    """What is in ``store/``; thread-safe (TFTP/HTTP threads read, ingest adds)."""

    def __init__(self, layout: Layout, lock: threading.RLock) -> None:
        self.layout = layout
        self._lock = lock
        self._manifests: dict[tuple[str, str], tuple[Manifest, bytes]] = {}
        self._refs: dict[tuple[str, str], ImageRef] = {}

    def manifest(self, image: str, version: str) -> Manifest | None:
        """The manifest of a promoted version, or None."""
        hit = self._load(image, version)
        return hit[0] if hit else None

    def manifest_bytes(self, image: str, version: str) -> bytes | None:
        """The exact bytes of a promoted version's manifest (ingest compares them)."""
        hit = self._load(image, version)
        return hit[1] if hit else None

    def _load(self, image: str, version: str) -> tuple[Manifest, bytes] | None:
        key = (image, version)
        with self._lock:
            hit = self._manifests.get(key)
        root = self.layout.version_dir(image, version)
        if not root.is_dir():
            if hit:
                self.forget(image, version)
            return None
        if hit:
            return hit
        try:
            data = (root / MANIFEST).read_bytes()
            m = parse_manifest(data)
        except (OSError, ManifestError) as exc:
            log.error("unreadable manifest in store %s/%s: %s", image, version, exc)
            return None
        with self._lock:
            self._manifests[key] = (m, data)
        return m, data

    def forget(self, image: str, version: str) -> None:
        """Drop the cached manifest and ref (the version is being deleted)."""
        with self._lock:
            self._manifests.pop((image, version), None)
            self._refs.pop((image, version), None)

    def ref(self, image: str, version: str) -> ImageRef | None:
        """ImageRef for a version in the store (no channel, not pinned), or None."""
        try:
            check_name(image), check_name(version)
        except ValueError:
            return None
        m = self.manifest(image, version)
        if m is None:
            return None
        key = (image, version)
        with self._lock:
            hit = self._refs.get(key)
        if hit is None:
            hit = _ref_of(m, self.layout)
            with self._lock:
                self._refs[key] = hit
        return hit

    def images(self) -> list[str]:
        """Every image with a version in the store or a channel pointer."""
        names: set[str] = set()
        for d in (self.layout.store, self.layout.channels):
            if d.is_dir():
                names.update(e.name for e in d.iterdir() if e.is_dir() and not
                             e.name.startswith("."))
        return sorted(names)

    def versions(self, image: str) -> list[str]:
        """Versions of an image, oldest first (by manifest ``created``, then name)."""
        d = self.layout.image_dir(image)
        if not d.is_dir():
            return []
        found = []
        for e in d.iterdir():
            if e.name.startswith(".") or not e.is_dir():
                continue
            m = self.manifest(image, e.name)
            if m is not None:
                found.append((m.created.timestamp(), e.name))
        return [v for _, v in sorted(found)]

    def all_refs(self) -> list[ImageRef]:
        """Every version in the store (NFS exports one rootfs per version)."""
        return [r for img in self.images() for v in self.versions(img)
                if (r := self.ref(img, v)) is not None]

    def need(self, image: str, version: str) -> Manifest:
        """The manifest of ``image``/``version``; :class:`Invalid` for a bad name,
        :class:`NotFound` (listing what exists) when it is not in the store."""
        valid_name(image, "image name")
        valid_name(version, "version")
        m = self.manifest(image, version)
        if m is None:
            if not self.layout.image_dir(image).is_dir():
                raise NotFound(f"unknown image {image!r} (images: "
                               f"{', '.join(self.images()) or 'none'})")
            known = ", ".join(self.versions(image)) or "none"
            raise NotFound(f"unknown version {version!r} of image {image!r} "
                           f"(versions: {known})")
        return m


def _ref_of(m: Manifest, layout: Layout) -> ImageRef:
    disk = None
    if m.disk is not None:
        d = m.disk
        disk = DiskImage(path=d.path, compression=d.compression, size=d.size, sha256=d.sha256,
                         uncompressed_size=d.uncompressed_size,
                         uncompressed_sha256=d.uncompressed_sha256)
    return ImageRef(name=m.image, version=m.version,
                    root=layout.version_dir(m.image, m.version), kind=m.kind,
                    artefacts=tuple(a.path for a in m.artefacts), boards=tuple(m.boards),
                    boot=m.boot_dict(), disk=disk)
