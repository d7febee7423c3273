"""Turning a dropped build into a verified tree in staging: unpack, copy, validate.

No store state here: these functions take a source and a staging directory and
either return a validated :class:`Manifest` or raise :class:`Rejected` with a
reason a human can act on. ``store.py`` decides what to do with the result.

Why a custom tar filter instead of ``tarfile.data_filter``: ``data_filter`` is
the right safety net for data archives but it *strips* owners, setuid bits and
device nodes and silently removes leading slashes. A rootfs needs owners and
modes kept (``/usr/bin/sudo``), and a build with an absolute or ``..`` path is a
broken build that must be *rejected*, not repaired. So the filter below keeps
metadata, rejects what escapes, and still uses tarfile for all the unpacking.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import stat
import struct
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .manifest import (
    DETACHED_SIG,
    MANIFEST,
    Manifest,
    ManifestError,
    check_relpath,
    parse_manifest,
    verify_signature,
)
from .objects import Meta, Pool, read_xattrs

log = logging.getLogger("netbootd.store.ingest")

CHUNK = 1 << 20
#: Errors of this machine, not of the build: the build stays in incoming/ for a retry.
_SYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM,
                            errno.EMFILE, errno.ENFILE})
#: A full disk during an ingest: the build fails with a reason (retrying cannot help it).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: linux/fs.h FICLONE (fcntl.FICLONE only exists from Python 3.12)
FICLONE = 0x40049409
#: Room for manifest.json.sig beyond the manifest's declared sizes.
SIG_SLACK = 64 << 10
#: How often (bytes written) free space is checked against ``store.min_free_bytes``.
SPACE_CHECK_EVERY = 8 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


class Rejected(Exception):
    """The build is broken; ``reason`` goes into ``rejected/<name>.reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Cancelled(Exception):
    """The daemon is stopping; the build stays in incoming/ and is retried at start-up."""


@dataclass
class IngestResult:
    """What happened to one dropped build (returned to the HTTP upload and the CLI)."""

    name: str
    accepted: bool
    image: str | None = None
    version: str | None = None
    reason: str = ""
    activated: str | None = None
    already_present: bool = False
    bytes: int = 0
    #: files linked from the content pool instead of written, and the bytes written
    shared_files: int = 0
    written_bytes: int = 0
    seconds: float = 0.0
    #: unpack + checksums + sharing; then promotion + activation ("build complete ->
    #: pointer swapped")
    verify_seconds: float = 0.0
    swap_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "accepted": self.accepted, "image": self.image,
                "version": self.version, "reason": self.reason, "activated": self.activated,
                "already_present": self.already_present, "bytes": self.bytes,
                "shared_files": self.shared_files, "written_bytes": self.written_bytes,
                "seconds": round(self.seconds, 3)}


class Progress:
    """Logs "n / total bytes" every ``interval`` seconds for builds that take a while."""

    def __init__(self, label: str, total: int, *, interval: float = 3.0,
                 cancel: threading.Event | None = None,
                 sink: Callable[[str, int, int], None] | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self._interval = interval
        self._cancel = cancel
        self._sink = sink
        self._t0 = self._last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled(self.label)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-6) / 1e6
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            log.info("%s: %d / %d bytes%s, %.1f MB/s", self.label, self.done, self.total,
                     pct, rate, extra={"bytes": self.done, "total": self.total})
            if self._sink:
                self._sink(self.label, self.done, self.total)


class _CountingReader:
    """A file wrapper that reports bytes read (archive unpack progress + cancellation)."""

    def __init__(self, fh: IO[bytes], progress: Progress) -> None:
        self._fh = fh
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._progress.add(len(data))
        return data

    def readable(self) -> bool:  # zstandard / tarfile probe this
        return True


class Budget:
    """What one build may write into staging, enforced while it is written.

    Two bounds: ``store.max_unpacked_bytes`` from the first byte, and, once the build's
    manifest.json has been read, the sizes it declares (the sum of its artefacts, plus the
    manifest and room for a detached signature). A regular file is charged its size
    *before* it is written (a tar member's header, a dropped file's ``st_size``), so a
    zip bomb is refused before it writes its payload, not after it filled the disk.
    ``min_free_bytes`` is checked with ``statvfs`` on the staging file system before
    each file and every ``SPACE_CHECK_EVERY`` bytes.
    """

    def __init__(self, limit: int, *, min_free: int = 0, where: Path | None = None) -> None:
        self.limit = limit
        self.min_free = min_free
        self.where = where
        self.written = 0
        self.declared: int | None = None
        self.manifest_bytes: bytes | None = None
        self.manifest: Manifest | None = None
        self._since_check = 0

    @property
    def bound(self) -> int:
        return self.limit if self.declared is None else min(self.limit, self.declared)

    def declare(self, data: bytes) -> None:
        """The build's manifest arrived: its sizes bound the rest (if it parses)."""
        self.manifest_bytes = data
        try:
            m = parse_manifest(data)
        except ManifestError:
            return  # validation rejects it with the parser's message
        self.manifest = m
        self.declared = m.total_size + len(data) + SIG_SLACK
        self._over()

    def charge(self, n: int, what: str) -> None:
        """``n`` more bytes are about to be written for ``what``."""
        self.written += n
        self._over(what)
        self._since_check += n
        if n and self.min_free and self.where is not None \
                and (self._since_check >= SPACE_CHECK_EVERY or n >= SPACE_CHECK_EVERY):
            self._since_check = 0
            self.check_space(n)

    def check_space(self, coming: int = 0) -> None:
        if not self.min_free or self.where is None:
            return
        st = os.statvfs(self.where)
        free = st.f_bavail * st.f_frsize
        if free - coming < self.min_free:
            raise Rejected(f"disk full: {free} bytes free on the store's file system, "
                           f"{coming} more needed, store.min_free_bytes is {self.min_free} "
                           f"(after {self.written - coming} bytes of this build)")

    def _over(self, what: str = "") -> None:
        if self.written <= self.bound:
            return
        at = f" at {what!r}" if what else ""
        if self.declared is not None and self.declared <= self.limit:
            raise Rejected(f"build unpacks to more than its manifest declares: over "
                           f"{self.declared} bytes{at} (a zip bomb, or a manifest that "
                           "does not match the build)")
        raise Rejected(f"build unpacks to more than store.max_unpacked_bytes "
                       f"({self.limit} bytes){at}")


class _BoundedStream:
    """The decompressed tar stream, capped: headers and padding beyond what the budget's
    files may write are a small overhead, never gigabytes (a bomb of headers)."""

    def __init__(self, fh: Any, budget: Budget) -> None:
        self._fh = fh
        self._budget = budget
        self.members = 0
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.read_bytes += len(data)
        cap = self._budget.bound + (1 << 20) + 1536 * (self.members + 1)
        if self.read_bytes > cap:
            raise Rejected(f"archive stream longer than the build may unpack to "
                           f"({self._budget.bound} bytes of files): a zip bomb?")
        return data

    def readable(self) -> bool:
        return True


@dataclass
class Dedup:
    """Sharing while a build is unpacked or copied: only content the store lacks is written.

    Once the build's manifest has been read (a directory drop's first, an archive's first
    member as ``netbootd.store.build.pack`` writes it), each regular file has an
    expected sha256. When the pool holds an object of that content *and* of the
    metadata the file would get, the file's bytes are read and hashed but not written,
    and the staged path becomes a link to the object; other files are written (and
    hashed while written). Either way every byte is hashed once, and the verified
    digests go into ``hashes`` so validation does not read the files again.
    """

    pool: Pool | None = None
    #: absolute staged path -> sha256 of its bytes, computed while they were written/read
    hashes: dict[str, str] = field(default_factory=dict)
    #: path relative to the unpack directory -> (sha256, size) the manifest declares
    expected: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: staged paths that are links to pool objects already (nothing left to share)
    linked_paths: set[str] = field(default_factory=set)
    shared_files: int = 0
    shared_bytes: int = 0
    #: bytes of regular files written into staging (an archive's or a directory drop's)
    written: int = 0

    def expect(self, manifest: Manifest | None, prefix: str) -> None:
        """The manifest of the build at ``prefix`` (relative to the unpack directory)."""
        if manifest is None:
            return
        top = prefix.strip("/")
        self.expected = {(f"{top}/{a.path}" if top else a.path): (a.sha256, a.size)
                         for a in manifest.artefacts}

    def find(self, rel: str, meta: Meta) -> tuple[str, Path | None]:
        """(expected sha256 or "", the pool object to link or None)."""
        want = self.expected.get(rel)
        if want is None:
            return "", None
        sha, size = want
        if self.pool is None:
            return sha, None
        return sha, self.pool.find(sha, meta, size)

    def linked(self, dest: Path, sha: str, size: int) -> None:
        self.hashes[str(dest)] = sha
        self.linked_paths.add(str(dest))
        self.shared_files += 1
        self.shared_bytes += size


def _hash_through(reader: Any, cancel: threading.Event | None, what: str) -> str:
    """sha256 of a stream read to its end, written nowhere."""
    h = hashlib.sha256()
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(what)
        chunk = reader.read(CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _write_regular(reader: Any, dest: Path, meta: Meta, keep_owner: bool,
                   cancel: threading.Event | None) -> str:
    """Write a stream to a new file, hashing it on the way; fsync it; give it ``meta``
    (owner before mode: a chown clears setuid; xattrs after both; mtime last). Returns
    the sha256 of what was written."""
    if os.path.lexists(dest) and not os.path.isdir(dest):
        os.unlink(dest)  # never write through a path that may be a link to a pool object
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    h = hashlib.sha256()
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(str(dest))
            chunk = reader.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        if keep_owner:
            os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, meta.mode)
        for name, value in meta.xattrs:
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                log.debug("xattr %s on %s not kept: %s", name, dest, exc)
    finally:
        os.close(fd)
    os.utime(dest, ns=(meta.mtime_ns, meta.mtime_ns), follow_symlinks=False)
    return h.hexdigest()


def _tar_mtime_ns(mtime: float) -> int:
    return int(mtime) * 1_000_000_000 if isinstance(mtime, int) else round(mtime * 1e9)


def _pax_xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    return [(k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
            for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")]


def _extract_regular(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path,
                     keep_owner: bool, dedup: Dedup, cancel: threading.Event | None) -> None:
    """One regular tar member: linked from the pool when it holds this content with this
    metadata (its bytes hashed, not written), else written and hashed."""
    target = dest / member.name
    if not os.path.isdir(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)  # as tarfile: parents not listed
    meta = Meta(member.mode & 0o7777,
                member.uid if keep_owner else os.geteuid(),
                member.gid if keep_owner else os.getegid(),
                _tar_mtime_ns(member.mtime),
                tuple(sorted(_pax_xattrs(member))) if keep_owner else ())
    sha, obj = dedup.find(member.name, meta)
    data = tf.extractfile(member)
    assert data is not None  # a regular member always has a data stream
    if obj is not None:
        got = _hash_through(data, cancel, member.name)
        if got != sha:
            raise Rejected(f"checksum mismatch for {member.name!r}")
        if os.path.lexists(target) and not os.path.isdir(target):
            os.unlink(target)
        if dedup.pool is not None and dedup.pool.link(obj, target):
            dedup.linked(target, sha, member.size)
            return
        with open(obj, "rb") as src:  # no hard links here: a private copy of the object
            got = _write_regular(src, target, meta, keep_owner, cancel)
    else:
        got = _write_regular(data, target, meta, keep_owner, cancel)
    dedup.hashes[str(target)] = got
    dedup.written += member.size


def fingerprint(path: Path) -> tuple:
    """What an incoming entry looks like now: every entry's type, size, mtime and inode
    (for a directory, the whole tree). Two equal fingerprints a settle window apart
    mean nobody wrote to it in between; a change while we copy means a writer is busy."""
    def one(p: str, rel: str) -> tuple:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return (rel, None)
        return (rel, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)

    top = one(str(path), ".")
    if top[1] is None or not stat.S_ISDIR(top[1]):
        return (top,)
    out = [top]
    for cur, dirs, files in os.walk(path, followlinks=False):
        rel_dir = os.path.relpath(cur, path)
        for name in sorted(dirs + files):
            out.append(one(os.path.join(cur, name), os.path.join(rel_dir, name)))
    return tuple(out)


# -- unpacking ------------------------------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_symlink(rel: str, target: str) -> None:
    """Relative symlink targets must stay inside the build (lexically).

    An empty target (or one with NUL) is refused too: ``os.symlink`` fails on it, and
    tarfile then falls back to extracting the member the link "points to", found by name
    in the archive and not passed through our filter: hypothesis found a ``"."`` symlink
    to outside the build arriving that way as ``a -> ../../canary/a``."""
    if not target or "\0" in target:
        raise Rejected(f"symlink {rel!r} has an empty or invalid target {target!r}")
    if target.startswith("/"):
        return  # absolute: allowed only in a rootfs, checked against the manifest later
    joined = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if joined == ".." or joined.startswith(("../", "/")):
        raise Rejected(f"symlink {rel!r} -> {target!r} leaves the build")


def _make_filter(dest: Path, allow_devices: bool, keep_owner: bool, budget: Budget,
                 stream: _BoundedStream | None = None
                 ) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    root = os.path.realpath(dest)
    regular: set[str] = set()  # regular files extracted so far (hard link targets)
    manifest_at: list[str] = []  # the manifest member, read once it is extracted

    def check(member: tarfile.TarInfo, _path: str) -> tarfile.TarInfo | None:
        if stream is not None:
            stream.members += 1
        if manifest_at and budget.manifest_bytes is None:
            read_declared(dest / manifest_at[0], budget)
        name = member.name
        if name.startswith("/"):
            raise Rejected(f"absolute path in archive: {name!r}")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts:
            if member.isdir():
                return None  # the "./" entry itself
            raise Rejected(f"member {name!r} is the build's root but not a directory")
        if ".." in parts:
            raise Rejected(f"path leaves the build: {name!r}")
        clean = "/".join(parts)
        # A member written *through* an already extracted symlink would land outside.
        parent = os.path.realpath(os.path.join(root, *parts[:-1]))
        if not _inside(parent, root):
            raise Rejected(f"path {name!r} goes through a symlink out of the build")
        # ... and so would one whose own path is already a symlink: tarfile opens files
        # with open(), tolerates mkdir on a symlink to a directory and later chmods /
        # chowns it, all following the link (a "x -> /" then "x/" dir pair would chmod
        # the host's /). A sane archive never has a path twice with a symlink first.
        if os.path.islink(os.path.join(root, *parts)):
            raise Rejected(f"member {name!r} would replace a symlink of the same path")
        changes: dict[str, Any] = {"name": clean}
        if member.issym():
            _check_symlink(clean, member.linkname)
        elif member.islnk():
            try:
                changes["linkname"] = check_relpath(member.linkname)
            except ValueError as exc:
                raise Rejected(f"hard link {name!r}: {exc}") from None
            # tar writes a hard link after the file it links to; anything else (a link to
            # itself, to a directory, to a later member) sends tarfile's fallback into
            # endless recursion
            if changes["linkname"] not in regular or changes["linkname"] == clean:
                raise Rejected(f"hard link {name!r} -> {member.linkname!r}: not an earlier "
                               "regular file of the archive")
        elif member.ischr() or member.isblk() or member.isfifo():
            if not allow_devices:
                raise Rejected(f"device node {name!r} (store.allow_devices is off)")
        elif not (member.isreg() or member.isdir()):
            raise Rejected(f"unsupported archive member type for {name!r}")
        if member.isreg():
            # charged before tarfile writes a byte of it: a bomb stops at its header
            budget.charge(member.size, clean)
            if parts[-1] == MANIFEST and len(parts) <= 2 and not manifest_at:
                manifest_at.append(clean)
        if member.isreg() or member.islnk():
            regular.add(clean)
        else:
            regular.discard(clean)
        if not keep_owner:
            changes.update(uid=None, gid=None, uname=None, gname=None)
        return member.replace(**changes, deep=False)

    return check


def _apply_xattrs(dest: Path, members: list[tarfile.TarInfo]) -> None:
    """tarfile keeps pax ``SCHILY.xattr.*`` records but does not apply them; we do."""
    for m in members:
        if m.isreg() or m.islnk():
            continue  # written with their xattrs (a link shares its file's inode)
        xattrs = {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items()
                  if k.startswith("SCHILY.xattr.")}
        if not xattrs:
            continue
        target = dest.joinpath(*[p for p in m.name.split("/") if p not in ("", ".")])
        for key, value in xattrs.items():
            try:
                os.setxattr(target, key, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
            except OSError as exc:
                log.debug("xattr %s on %s not kept: %s", key, target, exc)


def _extract_all(tf: tarfile.TarFile, dest: Path,
                 check: Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None],
                 keep_owner: bool, budget: Budget, dedup: Dedup,
                 cancel: threading.Event | None) -> None:
    """``extractall`` with our filter, regular files by :func:`_extract_regular`, and
    directory attributes set last (as tarfile does: children change a directory's
    mtime, and a read-only directory could not take them)."""
    directories: list[tarfile.TarInfo] = []
    for member in tf:
        info = check(member, str(dest))
        if info is None:
            continue
        if info.isreg():
            _extract_regular(tf, info, dest, keep_owner, dedup, cancel)
            parts = info.name.split("/")
            if parts[-1] == MANIFEST and len(parts) <= 2 and budget.manifest_bytes is None:
                read_declared(dest / info.name, budget)
                dedup.expect(budget.manifest, "/".join(parts[:-1]))
            continue
        if info.isdir():
            directories.append(info)
        # a hard link takes the attributes of the file it links (perhaps a pool object:
        # setting them again could change another version)
        tf.extract(info, str(dest), set_attrs=not (info.isdir() or info.islnk()),
                   numeric_owner=True, filter="fully_trusted")
    directories.sort(key=lambda a: a.name, reverse=True)
    for info in directories:
        path = str(dest / info.name)
        try:
            tf.chown(info, path, numeric_owner=True)
            tf.utime(info, path)
            tf.chmod(info, path)
        except tarfile.ExtractError as exc:
            log.debug("directory attributes of %s: %s", info.name, exc)


def read_declared(path: Path, budget: Budget) -> None:
    """Give the budget the build's manifest (bounded read: a manifest is small)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
        with open(path, "rb") as fh:
            data = fh.read(16 << 20)
    except OSError:
        return
    budget.declare(data)


def unpack_archive(src: Path, dest: Path, *, allow_devices: bool = False,
                   cancel: threading.Event | None = None, budget: Budget | None = None,
                   dedup: Dedup | None = None) -> None:
    """Unpack tar / tar.gz / tar.zst (detected by magic bytes) into ``dest`` safely.

    Streams (``r|``) so a multi-GB rootfs is never held in memory and a truncated
    archive fails at its end instead of being half accepted. ``budget`` bounds what it
    may write (:class:`Budget`); gzip is decompressed here, not by tarfile, so that the
    decompressed stream is capped too. Regular files are written (or linked from the
    pool) and hashed by :class:`Dedup`; everything else is tarfile's.
    """
    dedup = dedup if dedup is not None else Dedup()
    dest.mkdir(parents=True, exist_ok=True)
    keep_owner = os.geteuid() == 0
    size = src.stat().st_size
    progress = Progress(f"unpack {src.name}", size, cancel=cancel)
    budget = budget if budget is not None else Budget(1 << 62)
    with open(src, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        counted = _CountingReader(raw, progress)
        try:
            if head.startswith(ZSTD_MAGIC):
                import zstandard

                reader: Any = zstandard.ZstdDecompressor().stream_reader(counted)
            elif head.startswith(GZIP_MAGIC):
                reader = gzip.GzipFile(fileobj=counted, mode="rb")
            else:
                reader = counted
            bounded = _BoundedStream(reader, budget)
            with tarfile.open(fileobj=bounded, mode="r|", errorlevel=1) as tf:
                _extract_all(tf, dest, _make_filter(dest, allow_devices, keep_owner, budget,
                                                    bounded),
                             keep_owner, budget, dedup, cancel)
                members = list(tf.members)
        except (Rejected, Cancelled):
            raise
        except (tarfile.TarError, EOFError) as exc:
            raise Rejected(f"truncated or corrupt archive: {exc}") from None
        except KeyError as exc:  # tarfile: a link whose target is not in the archive
            raise Rejected(f"archive link to a missing member: {exc.args[0]}") from None
        except RecursionError:  # links chasing links: never a sane build
            raise Rejected("archive links refer to each other in a loop") from None
        except (TypeError, ValueError, struct.error) as exc:
            # CPython's streaming gzip header parser (tarfile._Stream) raises TypeError on
            # a header cut short ("ord() expected a character"): a corrupt build, not a bug.
            raise Rejected(f"truncated or corrupt archive: {exc}") from None
        except OSError as exc:
            if exc.errno is None:  # gzip/zstd format errors carry no errno
                raise Rejected(f"truncated or corrupt archive: {exc}") from None
            if exc.errno in _SYSTEM_ERRNOS:  # our problem (disk full...), not the build's
                raise
            raise Rejected(f"archive cannot be unpacked: {exc}") from None
        except Exception as exc:  # zstandard.ZstdError and friends
            if type(exc).__module__.startswith("zstandard"):
                raise Rejected(f"truncated or corrupt archive: {exc}") from None
            raise
    if budget.manifest_bytes is None:  # the manifest came last: check the total now
        for cand in (dest / MANIFEST, *(e / MANIFEST for e in dest.iterdir() if e.is_dir())):
            if os.path.lexists(cand):
                read_declared(cand, budget)
                break
    if keep_owner:
        _apply_xattrs(dest, members)


def copy_file(src: Path, dest: Path, size: int, budget: Budget,
              cancel: threading.Event | None = None) -> None:
    """Copy one dropped file into staging, never sharing its inode with the dropper.

    A reflink (``FICLONE``: btrfs, XFS; copy-on-write, so a later rewrite of the source
    leaves ours alone) when the file system can, else ``copy_file_range`` (in-kernel),
    else read/write. ``size`` was charged to the budget already; bytes beyond it (the
    source grew meanwhile) are charged as they are copied, and free space is checked
    every ``SPACE_CHECK_EVERY`` bytes."""
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass  # not supported here (ext4, tmpfs, another file system): copy
        done = 0
        use_cfr = hasattr(os, "copy_file_range")
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(str(src))
            n = 0
            if use_cfr:
                try:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), CHUNK * 8)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                         errno.EOPNOTSUPP):
                        raise
                    use_cfr = False
                    fin.seek(done)
                    fout.seek(done)
            if not use_cfr:
                data = fin.read(CHUNK)
                n = len(data)
                if n:
                    fout.write(data)
            if not n:
                break
            done += n
            extra = done - size
            if extra > 0:  # the source grew while we copied it
                budget.charge(min(extra, n), str(src))
            elif done // SPACE_CHECK_EVERY != (done - n) // SPACE_CHECK_EVERY:
                budget.check_space()


def copy_tree(src: Path, dest: Path, *, allow_devices: bool = False,
              cancel: threading.Event | None = None, budget: Budget | None = None,
              dedup: Dedup | None = None) -> None:
    """Copy a dropped directory into staging. Always a copy (or a reflink), never a hard
    link: the dropper may rewrite its files in place afterwards (CI reusing its output
    directory, ``open(..., "r+b")``), and a stored version must not change with them
    (docs/store.md, "Directory drops are copied"). Symlinks are recreated (not
    followed) and checked like tar members. ``budget`` bounds what is written: the
    manifest (read first) declares the sizes, and each file is charged before it is
    copied. With ``dedup``, a file the pool holds with the same content and metadata
    is read and hashed but not written: the staged path links the pool's object."""
    keep_owner = os.geteuid() == 0
    budget = budget if budget is not None else Budget(1 << 62)
    dedup = dedup if dedup is not None else Dedup()
    for cand in (src / MANIFEST, *(e / MANIFEST for e in src.iterdir()
                                   if e.is_dir() and not e.is_symlink())):
        if os.path.lexists(cand):
            read_declared(cand, budget)
            top = os.path.relpath(cand.parent, src)
            dedup.expect(budget.manifest, "" if top == "." else top)
            break
    budget.check_space()
    dest.mkdir(parents=True, exist_ok=False)
    dirs: list[tuple[Path, Path]] = [(src, dest)]
    for cur, subdirs, files in os.walk(src, followlinks=False):
        rel_dir = os.path.relpath(cur, src)
        out_dir = dest if rel_dir == "." else dest / rel_dir
        if cancel is not None and cancel.is_set():
            raise Cancelled(str(src))
        for name in subdirs + files:
            s = Path(cur) / name
            d = out_dir / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = s.lstat()
            if stat.S_ISDIR(st.st_mode):
                d.mkdir()
                dirs.append((s, d))
            elif stat.S_ISREG(st.st_mode):
                budget.charge(st.st_size, rel)
                if _share_dropped(s, d, st, rel, keep_owner, dedup, cancel):
                    continue
                copy_file(s, d, st.st_size, budget, cancel)
                dedup.written += st.st_size
                shutil.copystat(s, d, follow_symlinks=False)  # modes, times, xattrs
                if keep_owner:
                    os.chown(d, st.st_uid, st.st_gid)
                    os.chmod(d, stat.S_IMODE(st.st_mode))  # chown clears setuid
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(s)
                _check_symlink(rel, target)
                os.symlink(target, d)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                if not allow_devices:
                    raise Rejected(f"device node {rel!r} (store.allow_devices is off)")
                os.mknod(d, st.st_mode, st.st_rdev)
            else:
                raise Rejected(f"unsupported file type at {rel!r}")
            if keep_owner and not stat.S_ISREG(st.st_mode):
                os.lchown(d, st.st_uid, st.st_gid)
    for s, d in reversed(dirs):  # modes/times after the children exist
        shutil.copystat(s, d, follow_symlinks=False)
        if keep_owner:
            st = s.lstat()
            os.lchown(d, st.st_uid, st.st_gid)


def _share_dropped(src: Path, dest: Path, st: os.stat_result, rel: str, keep_owner: bool,
                   dedup: Dedup, cancel: threading.Event | None) -> bool:
    """Link ``dest`` to the pool's object when it holds the dropped file's content with
    the metadata a copy would get (``copystat``: mode, times, xattrs; the owner when
    root). The dropped file is hashed on the way: a wrong one is rejected, as it would be
    by validation. False: copy it."""
    if dedup.pool is None or rel not in dedup.expected:
        return False
    meta = Meta(stat.S_IMODE(st.st_mode),
                st.st_uid if keep_owner else os.geteuid(),
                st.st_gid if keep_owner else os.getegid(),
                st.st_mtime_ns, tuple(sorted(read_xattrs(src))))
    sha, obj = dedup.find(rel, meta)
    if obj is None or dedup.pool is None:
        return False
    with open(src, "rb", buffering=0) as fh:
        got = _hash_through(fh, cancel, rel)
    if got != sha:
        raise Rejected(f"checksum mismatch for {rel!r}")
    if not dedup.pool.link(obj, dest):
        return False
    dedup.linked(dest, sha, st.st_size)
    return True


def find_root(unpacked: Path) -> Path:
    """The build root: ``manifest.json`` at the top, or inside the single top directory
    (``tar czf demo-1.tar.gz demo-1/`` is the most common mistake; accept it)."""
    if (unpacked / MANIFEST).exists():
        return unpacked
    entries = [e for e in unpacked.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() \
            and (entries[0] / MANIFEST).exists():
        return entries[0]
    raise Rejected("missing manifest.json at the top of the build")


# -- validation ----------------------------------------------------------------------------

def _scan(root: Path) -> tuple[set[str], dict[str, str], set[str]]:
    """Regular files, symlinks (path -> target) and directories under ``root`` (relative)."""
    files: set[str] = set()
    links: dict[str, str] = {}
    dirs: set[str] = set()
    for cur, subdirs, names in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(cur, root)
        for name in subdirs + names:
            p = Path(cur) / name
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                links[rel] = os.readlink(p)
            elif stat.S_ISDIR(mode):
                dirs.add(rel)
            elif stat.S_ISREG(mode):
                files.add(rel)
    return files, links, dirs


def _under(path: str, top: str | None) -> bool:
    return top is not None and (path == top or path.startswith(top + "/"))


def check_kind(m: Manifest, files: set[str], dirs: set[str]) -> None:
    """The files each kind of build needs to boot (a Pi 5 boot tree, kernel + initrd...)."""
    b = m.boot

    def need_file(key: str, value: str | None) -> None:
        if not value:
            raise Rejected(f"{m.kind} build needs boot.{key} in the manifest")
        if value not in files:
            raise Rejected(f"missing required file {value!r} (boot.{key})")

    def need_dir(key: str, value: str | None) -> None:
        if not value:
            raise Rejected(f"{m.kind} build needs boot.{key} in the manifest")
        if value not in dirs:
            raise Rejected(f"missing required directory {value!r} (boot.{key})")

    def need_pi_tree(tree: str) -> None:
        need_dir("boot_tree", tree)
        top = {f[len(tree) + 1:] for f in files if f.startswith(tree + "/")}
        if "config.txt" not in top:
            raise Rejected(f"missing required file {tree}/config.txt")
        if not ({"kernel_2712.img", "kernel8.img"} & top):
            raise Rejected(f"missing required file {tree}/kernel_2712.img (or kernel8.img)")
        if not any(f.startswith("bcm27") and f.endswith(".dtb") and "/" not in f for f in top):
            raise Rejected(f"missing required device tree {tree}/bcm27*.dtb")

    if m.kind in ("kernel+initrd", "installer"):
        need_file("kernel", b.kernel)
        need_file("initrd", b.initrd)
        if m.kind == "installer" and b.boot_tree:  # the installer also boots Pis
            need_pi_tree(b.boot_tree)
    elif m.kind == "rootfs":
        need_dir("rootfs", b.rootfs)
    elif m.kind == "disk":
        if m.disk is None:  # the manifest model checked the section against artefacts
            raise Rejected("disk build needs a disk section in the manifest "
                           "(path, compression, size, sha256, uncompressed_size, "
                           "uncompressed_sha256)")
        if m.disk.path not in files:
            raise Rejected(f"missing required file {m.disk.path!r} (disk.path)")
    elif m.kind == "pi-boot+rootfs":
        need_pi_tree(b.boot_tree or "boot")
        need_dir("rootfs", b.rootfs)


def validate_build(root: Path, *, require_signature: bool = False, keys: list[Any] | None = None,
                   cancel: threading.Event | None = None,
                   progress_sink: Callable[[str, int, int], None] | None = None,
                   hashed: dict[str, str] | None = None) -> Manifest:
    """Check a staged build completely; return its manifest or raise :class:`Rejected`.

    Rules (docs/store.md): every regular file except manifest.json (and
    manifest.json.sig) is listed in ``artefacts`` — an unlisted file is a rejection,
    so nothing unverified is ever served; listed paths are regular files reached
    without symlinks; absolute symlinks only inside ``boot.rootfs``. ``hashed`` holds
    digests computed while the files were written (absolute path -> sha256): those
    files are compared, not read again.
    """
    mpath = root / MANIFEST
    if not mpath.exists() or not stat.S_ISREG(mpath.lstat().st_mode):
        raise Rejected("missing manifest.json at the top of the build")
    data = mpath.read_bytes()
    try:
        m = parse_manifest(data)
    except ManifestError as exc:
        raise Rejected(str(exc)) from None
    sig = root / DETACHED_SIG
    if require_signature:
        detached = sig.read_bytes() if sig.is_file() and not sig.is_symlink() else None
        try:
            verify_signature(data, detached, keys or [])
        except ManifestError as exc:
            raise Rejected(str(exc)) from None

    files, links, dirs = _scan(root)
    files.discard(MANIFEST)
    files.discard(DETACHED_SIG)
    listed = {a.path: a for a in m.artefacts}
    missing = sorted(set(listed) - files)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Rejected(f"missing file {missing[0]!r} listed in the manifest{more}")
    extra = sorted(files - set(listed))
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise Rejected(f"file {extra[0]!r} is not listed in the manifest{more}")
    for rel, target in links.items():
        _check_symlink(rel, target)
        if target.startswith("/") and not _under(rel, m.boot.rootfs):
            raise Rejected(f"absolute symlink {rel!r} -> {target!r} outside boot.rootfs")
    check_kind(m, files, dirs)

    for a in m.artefacts:  # sizes first: a truncated copy fails fast, before hashing GBs
        size = (root / a.path).lstat().st_size
        if size != a.size:
            raise Rejected(f"size mismatch for {a.path!r}: manifest {a.size}, file {size}")
    progress = Progress(f"verify {m.image}/{m.version}", m.total_size, cancel=cancel,
                        sink=progress_sink)
    known = hashed or {}
    for a in m.artefacts:
        p = root / a.path
        got = known.get(str(p))
        if got is None:
            got = sha256_file(p, progress, fsync=True)
        else:
            progress.add(a.size)
        if got != a.sha256:
            raise Rejected(f"checksum mismatch for {a.path!r}")
    return m


def sha256_file(path: Path, progress: Progress | None = None, *, fsync: bool = False) -> str:
    """Streamed sha256 (never the whole file in memory); optionally fsync the same fd,
    which makes the staged content durable without a second pass."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            if progress is not None:
                progress.add(len(chunk))
        if fsync:
            os.fsync(fd)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """fsync every directory of a staged tree (file contents were fsynced while hashing)."""
    for cur, _dirs, _files in os.walk(root, followlinks=False):
        fd = os.open(cur, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def detect_suffix(head: bytes) -> str:
    """File name suffix for an uploaded archive, by magic bytes."""
    if head.startswith(ZSTD_MAGIC):
        return ".tar.zst"
    if head.startswith(GZIP_MAGIC):
        return ".tar.gz"
    return ".tar"
