"""One writer per store: an ``flock`` on ``<state>/store/writer.lock``.

Two daemons on the same images directory would both ingest the same drop, both run
start-up recovery (deleting the other's staging work) and both GC (renaming the same
version away twice). So the daemon holds this lock for its whole life, and the few
operations that need the store to themselves (ingest, recovery, GC) take it briefly when
their store does not hold it already: a CLI ``images gc`` next to a running daemon is
refused (the daemon's GC, or ``POST /api/v1/images/gc``, knows the open boot sessions;
the CLI does not). Pointer and pin edits (activate, rollback, pin, unpin) never need it:
they are atomic renames serialised by ``edits.lock``, so the CLI may make them while a
daemon runs, as before.

The holder writes ``<pid> <role> <life|brief>`` into the file, so the refusal names the
process. A brief holder is waited for; a lifetime holder (a daemon) is an error at once.
The lock goes with the process (kill -9 included): the kernel drops an ``flock`` when its
last descriptor closes, and the descriptor is close-on-exec (TFTP workers do not keep it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreLocked

#: How long a contender waits for a new holder to write its name into the lock file.
_NAME_WAIT = 1.0


class WriterLock:
    """The writer lock of one store, held for a lifetime (:meth:`acquire`) or a block
    (:meth:`held`). Re-entrant within the owning store: nested blocks are free."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._lifetime = False
        self._depth = 0
        self._mutex = threading.RLock()

    @property
    def owned(self) -> bool:
        """True while this store holds the lock for its lifetime."""
        return self._fd is not None and self._lifetime

    def acquire(self, role: str) -> None:
        """Hold the lock until :meth:`release` (the daemon); :class:`StoreLocked` if another
        writer holds it for its lifetime."""
        with self._mutex:
            if self._fd is None:
                self._fd = self._take(role, lifetime=True)
            self._lifetime = True

    def release(self) -> None:
        with self._mutex:
            self._lifetime = False
            if self._depth == 0 and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @contextlib.contextmanager
    def held(self, role: str) -> Iterator[None]:
        """The lock for the duration of a block (ingest, recovery, GC)."""
        with self._mutex:
            if self._fd is None:
                self._fd = self._take(role, lifetime=False)
            self._depth += 1
        try:
            yield
        finally:
            with self._mutex:
                self._depth -= 1
                if self._depth == 0 and not self._lifetime and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def holder(self) -> tuple[int | None, str | None, bool | None]:
        """(pid, role, lifetime) as the current holder wrote them; Nones when unknown."""
        try:
            parts = self.path.read_text(encoding="utf-8").split()
        except OSError:
            return None, None, None
        if len(parts) != 3 or not parts[0].isdigit():
            return None, None, None
        return int(parts[0]), parts[1], parts[2] == "life"

    def _take(self, role: str, *, lifetime: bool) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {role.replace(' ', '-')} "
                          f"{'life' if lifetime else 'brief'}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock(self, fd: int) -> None:
        """Take the flock: wait for a brief holder, refuse a lifetime one.

        Polls rather than blocking in ``flock``: a daemon may take over from the brief
        holder we were waiting for, and that must be an error, not a wait for ever.
        """
        deadline = time.monotonic() + _NAME_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            pid, role, lifetime = self.holder()
            if lifetime:
                raise StoreLocked(str(self.path), pid, role)
            if lifetime is None and time.monotonic() >= deadline:  # never named itself
                raise StoreLocked(str(self.path), pid, role)
            time.sleep(0.02)  # a brief holder (ingest, CLI gc) ends soon
