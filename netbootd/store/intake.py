"""Ingest orchestration: from an ``incoming/`` entry (or an HTTP upload) to a promoted,
maybe auto-activated version, or to ``rejected/`` with a reason.

ingest.py does the checking and unpacking (pure rules, safe extraction); this module
decides the order of the durable steps, which is what makes kill -9 safe anywhere:
unpack/verify in staging -> fsync -> rename into store/ -> auto-activate -> only then
remove the incoming copy. Runs under the writer lock (one ingesting process per store).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from ..settings import StoreSettings
from .catalogue import Versions
from .errors import Conflict, StoreFull, TooLarge, valid_name
from .importer import import_image, looks_like_disk_image, name_version
from .ingest import (
    DISK_FULL_ERRNOS,
    Budget,
    Cancelled,
    Dedup,
    IngestResult,
    Rejected,
    copy_tree,
    detect_suffix,
    find_root,
    fingerprint,
    fsync_tree,
    unpack_archive,
    validate_build,
)
from .layout import READY_SUFFIX, Layout, fsync_dir, is_ignored_name, remove_tree
from .manifest import MANIFEST, Manifest, ManifestError, load_public_key, parse_manifest
from .objects import Pool
from .pointers import Channels
from .rejects import Rejects
from .signals import Signals
from .writer import WriterLock

log = logging.getLogger("netbootd.store")


class Intake:
    """Takes builds from incoming/ into the store, one at a time."""

    def __init__(self, layout: Layout, versions: Versions, channels: Channels,
                 rejects: Rejects, settings: StoreSettings, signals: Signals,
                 writer: WriterLock, cancel: threading.Event, pool: Pool) -> None:
        self.layout = layout
        #: the content pool: a version's files are links to its objects (objects.py)
        self.pool = pool
        self.versions = versions
        self.channels = channels
        self.rejects = rejects
        self.settings = settings
        self.signals = signals
        self.writer = writer
        #: Set to make a running ingest stop at its next chunk (daemon shutdown).
        self.cancel = cancel
        self._busy = threading.Lock()
        self._keys: list[Any] | None = None

    def candidates(self) -> list[str]:
        """Names in incoming/ that are builds (not dotfiles / *.tmp / *.partial / markers)."""
        out = []
        for e in sorted(self.layout.incoming.iterdir()):
            if is_ignored_name(e.name):
                continue
            if e.name.endswith(READY_SUFFIX):
                base = e.name[: -len(READY_SUFFIX)]
                if self.layout.incoming_entry(base).exists() and base not in out:
                    out.append(base)
                continue
            if e.name not in out:
                out.append(e.name)
        return out

    def ingest_entry(self, name: str, *, expect: tuple[str, str] | None = None
                     ) -> IngestResult | None:
        """Ingest one complete build ``incoming/<name>`` (dir or archive); blocking.

        Returns None when there is nothing to do (already handled, or cancelled).
        """
        name = name.removesuffix(READY_SUFFIX)
        if not name or "/" in name or is_ignored_name(name):
            return None
        with self.writer.held("ingest"), self._busy:
            src = self.layout.incoming_entry(name)
            marker = self.layout.ready_marker(name)
            if not os.path.lexists(src):
                return None
            t0 = time.monotonic()
            before = fingerprint(src)
            stage = self.layout.new_stage("ingest-")
            budget = Budget(self.settings.max_unpacked_bytes,
                            min_free=self.settings.min_free_bytes, where=self.layout.staging)
            m: Manifest | None = None
            dedup = Dedup(self.pool)
            added: list[Path] = []
            try:
                try:
                    unpacked = stage / "build"
                    if src.is_dir() and not src.is_symlink():
                        copy_tree(src, unpacked, allow_devices=self.settings.allow_devices,
                                  cancel=self.cancel, budget=budget, dedup=dedup)
                    elif looks_like_disk_image(src):  # a Raspberry Pi OS .img[.xz] drop
                        image, version = name_version(src.name, src.stat().st_mtime)
                        import_image(src, unpacked, image=image, version=version,
                                     cancel=self.cancel, scratch=stage)
                    elif src.is_file() and not src.is_symlink():
                        unpack_archive(src, unpacked, allow_devices=self.settings.allow_devices,
                                       cancel=self.cancel, budget=budget, dedup=dedup)
                    else:
                        raise Rejected("not a directory or a regular file")
                except OSError as exc:
                    if exc.errno not in DISK_FULL_ERRNOS:
                        raise
                    # the build's failure, with a reason: retrying it would fill the disk
                    # again every rescan (a bomb did, every 30 s, before this)
                    raise Rejected(f"disk full while unpacking ({os.strerror(exc.errno)}) "
                                   f"after {budget.written} bytes of this build") from None
                if fingerprint(src) != before:
                    raise _StillWriting()
                root = find_root(unpacked)
                m = _peek_manifest(root)  # for the reason file, should validation fail
                m = validate_build(root, require_signature=self.settings.require_signature,
                                   keys=self._trusted_keys() if self.settings.require_signature
                                   else [], cancel=self.cancel, hashed=dedup.hashes)
                if expect and (m.image, m.version) != expect:
                    raise Rejected(f"upload names {expect[0]}/{expect[1]} but the manifest "
                                   f"says {m.image}/{m.version}")
                # before promotion: a version is in the store only with its objects
                added = self.pool.adopt_all((root / a.path, a.sha256) for a in m.artefacts
                                            if str(root / a.path) not in dedup.linked_paths)
                t_valid = time.monotonic()  # built, verified, shared: now the swap
                result = self._promote(name, root, m)
                result.shared_files = dedup.shared_files
                # a disk image import writes every file (no sharing until promotion)
                result.written_bytes = dedup.written if dedup.written or dedup.shared_files \
                    else m.total_size
                result.seconds = time.monotonic() - t0
                result.verify_seconds = t_valid - t0
                result.swap_seconds = result.seconds - result.verify_seconds
            except Rejected as exc:
                if fingerprint(src) != before:  # half written, not broken: try again later
                    log.info("incoming/%s changed while it was read; waiting for it to "
                             "settle", name)
                    return None
                manifest_bytes = budget.manifest_bytes or _manifest_in(stage / "build")
                if m is None:
                    m = budget.manifest or (_peek_bytes(manifest_bytes)
                                            if manifest_bytes else None)
                remove_tree(stage)  # first: a disk-full rejection needs the space back
                result = self._reject(name, src, marker, exc.reason, m, manifest_bytes)
                result.seconds = time.monotonic() - t0
                return result
            except _StillWriting:
                log.info("incoming/%s changed while it was read; waiting for it to settle",
                         name)
                return None
            except Cancelled:
                log.info("ingest of %s cancelled (stopping); it stays in incoming/", name)
                return None
            finally:
                remove_tree(stage)
                if added:  # objects only this build's staged copy referenced
                    self.pool.sweep(added)
            self._consume(src, marker)
        log.info("ingested %s %s from %s (%d bytes, %.2f s)%s", result.image, result.version,
                 name, result.bytes, result.seconds,
                 f", active on {result.activated}" if result.activated else "",
                 extra={"image": result.image, "version": result.version})
        if not result.already_present:
            self.signals.event(f"ingested {result.image} {result.version}", image=result.image,
                               version=result.version, bytes=result.bytes,
                               seconds=round(result.seconds, 3), outcome="ingested")
        self.signals.changed()
        return result

    def _promote(self, name: str, root: Path, m: Manifest) -> IngestResult:
        dest = self.layout.version_dir(m.image, m.version)
        new_bytes = (root / MANIFEST).read_bytes()
        already = False
        if dest.exists():
            if self.versions.manifest_bytes(m.image, m.version) != new_bytes:
                raise Rejected(f"version exists: {m.image} {m.version} is already in the store "
                               "with different content (versions are never overwritten)")
            already = True  # a crash after promotion: finish the job
        else:
            fsync_tree(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(dest.parent.parent)
            try:
                os.rename(root, dest)
            except OSError as exc:  # a concurrent ingest of the same version won
                raise Rejected(f"version exists: {m.image} {m.version} ({exc})") from None
            fsync_dir(dest.parent)
        result = IngestResult(name=name, accepted=True, image=m.image, version=m.version,
                              bytes=m.total_size, already_present=already)
        channel = self.settings.auto_activate.get(m.image, self.settings.auto_activate.get("*"))
        if channel and not self.channels.ever_active(m.image, m.version, channel):
            self.channels.activate(m.image, m.version, channel, by="auto",
                                   why=f"auto_activate for {m.image}")
            result.activated = channel
        return result

    def _consume(self, src: Path, marker: Path) -> None:
        """Remove the incoming copy: first renamed to a dot name (atomic, ignored), then
        deleted, so a crash mid-delete never leaves half a build that looks new."""
        gone = self.layout.done_entry(src.name)
        os.rename(src, gone)
        if marker.exists():
            marker.unlink()
        fsync_dir(self.layout.incoming)
        remove_tree(gone)

    def _reject(self, name: str, src: Path, marker: Path, reason: str, m: Manifest | None,
                manifest_bytes: bytes | None = None) -> IngestResult:
        log.warning("rejected %s: %s", name, reason, extra={"build": name})
        image, version = (m.image, m.version) if m else (None, None)
        dest = self.rejects.keep(name, src, reason, image, version,
                                 manifest=manifest_bytes,
                                 max_bytes=self.settings.keep_rejected_max_bytes)
        if marker.exists():
            marker.unlink()
        fsync_dir(self.layout.incoming)
        self.signals.ingest_failure()
        self.signals.event(f"rejected {name}: {reason}", file=name, reason=reason,
                           image=image, version=version, outcome="rejected")
        return IngestResult(name=dest, accepted=False, reason=reason, image=image,
                            version=version)

    async def ingest_upload(self, name: str, version: str,
                            stream: BinaryIO | AsyncIterator[bytes] | Iterable[bytes],
                            *, max_bytes: int | None = None) -> dict[str, Any]:
        """HTTP ``PUT /api/v1/images/<name>/<version>``: store the tarball body in incoming/
        (temp dot name + rename, so a crash mid-upload leaves nothing that looks like a
        build), then ingest it now and return ``IngestResult.to_dict()``.

        :class:`Invalid` for a bad name/version, :class:`TooLarge` (an Invalid) for an
        upload larger than ``max_bytes``,
        :class:`Conflict` when an upload of the same version is already pending.
        """
        valid_name(name, "image name")
        valid_name(version, "version")
        incoming = self.layout.incoming
        tmp = self.layout.upload_temp(name, version)
        reserve = self.settings.min_free_bytes
        fh = await asyncio.to_thread(open, tmp, "wb")  # closed below (also on error)
        head = b""
        total = 0
        try:
            async for chunk in _chunks(stream):
                if not chunk:
                    continue
                if len(head) < 4:
                    head += chunk[: 4 - len(head)]
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise TooLarge(max_bytes)
                if reserve:  # every chunk (1 MiB from aiohttp): never write past it
                    free = _free_bytes(incoming)
                    if free - len(chunk) < reserve:
                        raise StoreFull(total - len(chunk), free, reserve)
                try:
                    await asyncio.to_thread(fh.write, chunk)
                except OSError as exc:
                    if exc.errno in DISK_FULL_ERRNOS:
                        raise StoreFull(total - len(chunk), _free_bytes(incoming),
                                        reserve) from None
                    raise
            await asyncio.to_thread(_flush_sync, fh)
            fh.close()
            final = self.layout.incoming_entry(f"{name}-{version}{detect_suffix(head)}")
            if os.path.lexists(final):
                raise Conflict(f"an upload of {name} {version} is already pending")
            os.rename(tmp, final)
            fsync_dir(incoming)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        result = await asyncio.to_thread(self.ingest_entry, final.name, expect=(name, version))
        if result is None:
            return {"name": final.name, "accepted": False, "reason": "ingest was interrupted; "
                    "the upload stays in incoming/ and is retried", "image": name,
                    "version": version}
        return result.to_dict()

    def _trusted_keys(self) -> list[Any]:
        if self._keys is None:
            keys = []
            for p in self.settings.trusted_keys:
                try:
                    keys.append(load_public_key(p))
                except (OSError, ValueError) as exc:
                    log.error("trusted key %s unusable: %s", p, exc)
            self._keys = keys
        return self._keys


class _StillWriting(Exception):
    """The incoming entry changed while it was copied: a writer is still at it."""


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _manifest_in(unpacked: Path) -> bytes | None:
    """The manifest of a half-unpacked build, if there is one (for the reason file)."""
    try:
        cands = [unpacked / MANIFEST, *(e / MANIFEST for e in unpacked.iterdir()
                                        if e.is_dir() and not e.is_symlink())]
    except OSError:
        return None
    for c in cands:
        try:
            if c.is_file() and not c.is_symlink() and c.stat().st_size <= 16 << 20:
                return c.read_bytes()
        except OSError:
            return None
    return None


def _peek_bytes(data: bytes) -> Manifest | None:
    try:
        return parse_manifest(data)
    except ManifestError:
        return None


def _peek_manifest(root: Path) -> Manifest | None:
    try:
        return parse_manifest((root / MANIFEST).read_bytes())
    except (OSError, ManifestError):
        return None


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    if hasattr(stream, "__aiter__"):
        async for chunk in stream:
            yield bytes(chunk)
    elif hasattr(stream, "read"):
        while True:
            chunk = await asyncio.to_thread(stream.read, 1 << 20)
            if not chunk:
                break
            yield chunk
    else:
        for chunk in stream:
            yield bytes(chunk)


def _flush_sync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
