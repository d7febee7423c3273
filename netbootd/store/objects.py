"""The content pool: every stored regular file once, shared by hard links between versions.

CI drops a build per merge, and neighbouring versions of a rootfs differ in a few files.
So each artefact of a promoted version is a hard link to an object in
``<images>/objects/<aa>/<sha256>.<meta>``, named by its content (the manifest's
sha256, verified at ingest) *and* its metadata (:class:`Meta`: mode, owner, mtime,
xattrs). A hard link shares the inode, so two files may share one only if everything
``stat`` shows of them is equal: files with equal content but another mode, owner,
mtime or xattr get objects of their own. Each version is still a full tree (NFS, TFTP
and HTTP see ordinary files), and the store never writes to a stored file, so no
version can change another.

The link count is the reference count: an object whose ``st_nlink`` is 1 is referenced
by no version (nor by a build in staging) and :meth:`Pool.sweep` deletes it. That needs
no index that a crash could leave out of step with the trees: after kill -9 anywhere,
recovery removes staging/ and sweeps, and what is left is exactly the content some
version references.

Sweeps and ingests run under the store's writer lock, so an object found for a new
build is not swept before the build links it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .layout import fsync_dir

log = logging.getLogger("netbootd.store.objects")

#: Why a hard link could not be made: another file system, no hard links, too many links.
_NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                             errno.EOPNOTSUPP})


@dataclass(frozen=True)
class Meta:
    """What a file shows besides its content; equal metadata is a condition of sharing."""

    mode: int  #: permission bits incl. setuid/setgid/sticky (``S_IMODE``)
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.mode:o}:{self.uid}:{self.gid}:{self.mtime_ns}".encode())
        for name, value in sorted(self.xattrs):
            h.update(b"\0" + name.encode("utf-8", "surrogateescape") + b"=" + value)
        return h.hexdigest()[:16]

    @classmethod
    def of_stat(cls, st: os.stat_result, xattrs: Iterable[tuple[str, bytes]] = ()) -> Meta:
        return cls(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                   tuple(sorted(xattrs)))

    @classmethod
    def of_file(cls, path: Path) -> Meta:
        """The metadata a file has now (lstat and every extended attribute)."""
        return cls.of_stat(os.lstat(path), read_xattrs(path))


def read_xattrs(path: Path) -> list[tuple[str, bytes]]:
    """Every extended attribute of ``path`` (not following symlinks); none where the file
    system has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out = []
    for name in names:
        with contextlib.suppress(OSError):
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return out


class Pool:
    """The objects directory of one store (``Layout.objects``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str, meta: Meta) -> Path:
        return self.root / sha256[:2] / f"{sha256}.{meta.digest()}"

    def find(self, sha256: str, meta: Meta, size: int) -> Path | None:
        """The object with this content and metadata, if the pool has it."""
        p = self.path(sha256, meta)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        return p

    @staticmethod
    def link(obj: Path, dest: Path) -> bool:
        """Make ``dest`` (new) a hard link to ``obj``; False where links cannot be made."""
        try:
            os.link(obj, dest)
        except OSError as exc:
            if exc.errno in _NO_LINK_ERRNOS:
                return False
            raise
        return True

    def adopt(self, file: Path, sha256: str) -> Path | None:
        """Share a staged, verified file: replace it with a link to the object of equal
        content and metadata, or make it that object. Returns the object newly added to
        the pool (the caller sweeps it if the build is not promoted), else None."""
        st = os.lstat(file)
        if not stat.S_ISREG(st.st_mode):
            return None
        meta = Meta.of_stat(st, read_xattrs(file))
        obj = self.path(sha256, meta)
        try:
            ost = os.lstat(obj)
        except FileNotFoundError:
            ost = None
        if ost is not None:
            if (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino):
                return None  # already that object (a tar hard link of an earlier member)
            # a name no build has (a build may hold ".share-<name>" files of its own)
            tmp = file.with_name(f".netbootd-share-{os.getpid()}-{time.time_ns()}.tmp")
            if not self.link(obj, tmp):
                return None
            os.rename(tmp, file)  # atomic: the path is the old copy or the object
            return None
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_name(f".{obj.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if not self.link(file, tmp):
            return None
        os.rename(tmp, obj)
        return obj

    def enrol(self, file: Path, sha256: str) -> Path | None:
        """Make a stored file (of a version promoted before the pool existed) an object,
        if the pool has none of its content and metadata; never replace the file: a
        version may be exported and in use, and an NFS client holding the old inode
        would get ESTALE. Returns the new object, else None."""
        st = os.lstat(file)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return None
        obj = self.path(sha256, Meta.of_stat(st, read_xattrs(file)))
        if os.path.lexists(obj):
            return None
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_name(f".{obj.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if not self.link(file, tmp):
            return None
        os.rename(tmp, obj)
        return obj

    def adopt_all(self, files: Iterable[tuple[Path, str]]) -> list[Path]:
        """:meth:`adopt` each (path, sha256); the object directories are fsynced, so an
        object a promoted version shares is durable before the version is."""
        added: list[Path] = []
        for path, sha in files:
            obj = self.adopt(path, sha)
            if obj is not None:
                added.append(obj)
        for d in sorted({p.parent for p in added}):
            fsync_dir(d)
        if added:
            fsync_dir(self.root)
        return added

    def objects(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every object and its stat (temp names excluded)."""
        return ((p, st) for p, st in self._all_with_temps() if not p.name.startswith("."))

    def sweep(self, candidates: Iterable[Path] | None = None) -> tuple[int, int]:
        """Delete objects no version references (link count 1) and temp leftovers of a
        crash; only ``candidates`` when given. Returns (objects deleted, bytes freed)."""
        count = freed = 0
        if candidates is None:
            pairs: Iterable[tuple[Path, os.stat_result]] = self._all_with_temps()
        else:
            pairs = self._stat_each(candidates)
        for p, st in pairs:
            if st.st_nlink > 1 and not p.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                count += 1
                freed += st.st_size
        if count:
            log.info("pool: deleted %d unreferenced objects (%d bytes)", count, freed)
        return count, freed

    def _all_with_temps(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every file in the pool's fan-out directories, temp names of a crash included."""
        try:
            subdirs = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for d in subdirs:
            if not d.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(d.path):
                with contextlib.suppress(FileNotFoundError):
                    yield Path(e.path), e.stat(follow_symlinks=False)

    @staticmethod
    def _stat_each(paths: Iterable[Path]) -> Iterator[tuple[Path, os.stat_result]]:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                yield p, os.lstat(p)
