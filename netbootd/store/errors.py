"""The store's typed errors: what went wrong, by type, so callers map it without reading text.

The API maps :class:`~netbootd.errors.NotFound` to 404, :class:`~netbootd.errors.Conflict`
to 409 and :class:`~netbootd.errors.Invalid` to 400; the CLI prints the message and exits 2.
``StoreError`` is the name older callers catch: it is the common base of all three, so
``except StoreError`` keeps catching every user mistake the store reports.
"""

from __future__ import annotations

from ..errors import Conflict, DiskFull, Invalid, NetbootdError, NotFound, TooLarge
from ..model import normalise_mac
from .manifest import check_name

#: Every mistake the store reports (kept for callers written before the typed errors).
StoreError = NetbootdError

__all__ = ["Conflict", "Invalid", "NotFound", "StoreError", "StoreFull", "StoreLocked",
           "TooLarge", "valid_mac", "valid_name"]


class StoreFull(DiskFull):
    """An upload stopped before it passed the store's free-space reserve (or the disk
    was full). A :class:`DiskFull` (the API answers 507): this much did not fit.

    ``limit`` is the number of bytes that were written when it stopped; ``free`` and
    ``reserve`` are what ``statvfs`` said and ``store.min_free_bytes``.
    """

    def __init__(self, written: int, free: int, reserve: int) -> None:
        self.limit = written
        self.free = free
        self.reserve = reserve
        Invalid.__init__(self, f"upload stopped after {written} bytes: the image store's "
                         f"file system has {free} bytes free and keeps "
                         f"store.min_free_bytes = {reserve} in reserve")


class StoreLocked(Conflict):
    """Another process is the store's writer (a second daemon on the same images).

    ``pid`` is the holder's process id as it wrote it into the lock file (None when it
    could not be read), so the message can say which process to look at.
    """

    def __init__(self, lock: str, pid: int | None, role: str | None) -> None:
        self.lock = lock
        self.pid = pid
        self.role = role
        who = f"pid {pid}" if pid is not None else "another process"
        what = f" ({role})" if role else ""
        super().__init__(f"the image store is in use by {who}{what}: only one writer per "
                         f"store (lock {lock})")


def valid_name(value: str, what: str) -> str:
    """``value`` if it is a safe image/version/channel name, else :class:`Invalid`."""
    try:
        return check_name(value, what)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def valid_mac(mac: str) -> str:
    """The normalised MAC, else :class:`Invalid`."""
    try:
        return normalise_mac(mac)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
