"""Where things live under ``paths.images`` and ``paths.state``, and durable file writes.

::

    <images>/incoming/               CI drops builds here (rename, marker, HTTP upload)
    <images>/staging/                unpack + verify (same file system as store/)
    <images>/store/<image>/<version>/  immutable once renamed into place; its regular
                                     files are hard links to objects/ (objects.py)
    <images>/objects/<aa>/<sha256>.<meta>  the content pool: one inode per distinct
                                     content + metadata, shared by the versions
    <images>/channels/<image>/<channel>  pointer file: the active version, one line
    <images>/rejected/<name> + <name>.reason   builds that failed validation
    <state>/store/history.jsonl      activation history (JSON lines, append + fsync)
    <state>/store/pins.json          per-MAC pins (atomic rewrite)
    <state>/store/booted.json        last time each version was planned for a boot
    <state>/store/writer.lock        flock: the one process that may ingest, recover, GC
    <state>/store/edits.lock         flock: serialises pointer and pin edits across processes

Only this module builds store paths: every other module asks a :class:`Layout`.

Every durable change is "write a temp file, fsync it, rename it over the old one,
fsync the directory": a crash leaves the old or the new content, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from ..durable import fsync_dir, read_json, write_atomic, write_json_atomic  # noqa: F401 - re-exported for the store modules

#: Names in incoming/ that are never builds: work in progress of a CI writer.
IGNORED_SUFFIXES = (".tmp", ".partial", ".reason")
READY_SUFFIX = ".ready"
#: Prefix of incoming entries already promoted and being deleted (crash leftovers).
DONE_PREFIX = ".done-"


@dataclass(frozen=True)
class Layout:
    """Paths of one store. Creating the directories is :meth:`ensure`'s job."""

    images: Path
    state: Path

    @property
    def incoming(self) -> Path:
        return self.images / "incoming"

    @property
    def staging(self) -> Path:
        return self.images / "staging"

    @property
    def store(self) -> Path:
        return self.images / "store"

    @property
    def objects(self) -> Path:
        """The content pool (same file system as store/ and staging/: hard links)."""
        return self.images / "objects"

    @property
    def channels(self) -> Path:
        return self.images / "channels"

    @property
    def rejected(self) -> Path:
        return self.images / "rejected"

    @property
    def state_dir(self) -> Path:
        return self.state / "store"

    @property
    def history_file(self) -> Path:
        return self.state_dir / "history.jsonl"

    @property
    def pins_file(self) -> Path:
        return self.state_dir / "pins.json"

    @property
    def booted_file(self) -> Path:
        return self.state_dir / "booted.json"

    @property
    def writer_lock(self) -> Path:
        return self.state_dir / "writer.lock"

    @property
    def edits_lock(self) -> Path:
        return self.state_dir / "edits.lock"

    def image_dir(self, image: str) -> Path:
        return self.store / image

    def version_dir(self, image: str, version: str) -> Path:
        return self.store / image / version

    def channel_dir(self, image: str) -> Path:
        return self.channels / image

    def pointer(self, image: str, channel: str) -> Path:
        return self.channels / image / channel

    def incoming_entry(self, name: str) -> Path:
        return self.incoming / name

    def ready_marker(self, name: str) -> Path:
        return self.incoming / (name + READY_SUFFIX)

    def done_entry(self, name: str) -> Path:
        """Where a promoted incoming entry goes to die (a dot name the watcher ignores)."""
        return self.incoming / f"{DONE_PREFIX}{name}-{os.getpid()}-{time.time_ns()}"

    def cli_temp(self, name: str) -> Path:
        """A build ``netbootd images ingest|import`` is putting into incoming/ (a dot name:
        never taken for a build, and not removed by recovery while the CLI works)."""
        return self.incoming / f".cli-{name}-{os.getpid()}-{time.time_ns()}.tmp"

    def upload_temp(self, image: str, version: str) -> Path:
        """An HTTP upload in progress (``.partial``: never taken for a build)."""
        return self.incoming / f".upload-{image}-{version}-{os.getpid()}-{time.time_ns()}.partial"

    def rejected_entry(self, name: str) -> Path:
        return self.rejected / name

    def reason_file(self, name: str) -> Path:
        return self.rejected / (name + ".reason")

    def rejected_manifest(self, name: str) -> Path:
        """The manifest of a rejected build whose payload was too large to keep."""
        return self.rejected / (name + ".manifest.json")

    def new_stage(self, prefix: str) -> Path:
        """A fresh private directory in staging/ (same file system as store/)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.staging))

    def ensure(self) -> None:
        for d in (self.incoming, self.staging, self.store, self.objects, self.channels,
                  self.rejected, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)


def is_upload_leftover(name: str) -> bool:
    """An upload a crash interrupted (see :meth:`Layout.upload_temp`)."""
    return name.startswith(".upload-") and name.endswith(".partial")


def entry_size(path: Path) -> int:
    """Bytes of an incoming entry: a file's size, or every regular file of a tree."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for cur, _dirs, files in os.walk(path, followlinks=False):
        for f in files:
            try:
                fst = os.lstat(os.path.join(cur, f))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(fst.st_mode):
                total += fst.st_size
    return total


def now_iso(ts: float | None = None) -> str:
    """UTC time as history and reason files write it (``2026-11-23T13:31:00Z``)."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC) \
        .isoformat(timespec="seconds").replace("+00:00", "Z")


def stat_key(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current content (inode, mtime, size): re-read on change only."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def is_ignored_name(name: str) -> bool:
    """Dotfiles, ``*.tmp``, ``*.partial``: a CI writer's files that are not complete yet."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)








@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for append and read, under an exclusive ``flock``.

    The daemon and the ``netbootd images`` CLI are separate processes that both append
    to the history, and history pruning replaces the file by rename. A writer that got
    the lock on a file already renamed away would write into a dead inode, so after
    locking it checks that it holds the file the path names now, and retries if not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a+b")  # noqa: SIM115 - closed below or by the caller's with
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            break
        fh.close()
    try:
        yield fh
    finally:
        fh.close()  # releases the lock


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` of ``path`` (a file that is never replaced) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_tree(path: Path) -> None:
    """Delete a file or a whole tree, also one with read-only directories (a build may
    contain 0555 directories, and rmtree as non-root needs u+w on them)."""
    if path.is_dir() and not path.is_symlink():
        if os.geteuid() != 0:
            for cur, dirs, _files in os.walk(path):
                for d in dirs:
                    with contextlib.suppress(OSError):
                        os.chmod(os.path.join(cur, d), 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def append_line(path: Path, line: str) -> None:
    """Append one JSON line durably (a torn last line after a crash is skipped on read)."""
    with locked_file(path) as fh:
        fh.seek(0, os.SEEK_END)
        torn = False
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"  # a crash tore the last line: start a fresh one
        fh.seek(0, os.SEEK_END)
        fh.write((("\n" if torn else "") + line.rstrip("\n") + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def read_json_lines(path: Path) -> list[dict]:
    out: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue  # torn last line after a crash
        if isinstance(d, dict):
            out.append(d)
    return out

