"""How an export set reaches an NFS server: ``none`` | ``exportfs`` | ``ganesha``.

Each backend's ``apply(exports)`` is idempotent and blocking (the service runs it in a
thread); it writes its file atomically only when the content changed and then tells
the server. Failures raise :class:`NfsError` with the server's own words.

ganesha: since 2.8 a SIGHUP re-reads the config including ``%include``d EXPORT
blocks and adds, updates *and removes* exports (older releases only added); an
export's ``Export_Id`` must keep its path across reloads, hence the id map kept in
the state directory. No dbus is needed (a namespace lab has none).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Protocol

from ..durable import read_json, write_atomic, write_json_atomic
from ..settings import Settings
from .exports import Export, assign_ids, render_exportfs, render_ganesha

log = logging.getLogger("netbootd.nfs")


class NfsError(RuntimeError):
    """Applying exports failed (the message says what the server answered)."""


class Backend(Protocol):
    name: str

    def apply(self, exports: list[Export]) -> bool:
        """Make the server export exactly ``exports``; True when anything changed."""


class NoneBackend:
    """Shows what would be exported (status page, ``health()``, the log)."""

    name = "none"

    def __init__(self) -> None:
        self._last: list[Export] | None = None

    def apply(self, exports: list[Export]) -> bool:
        if exports == self._last:
            return False
        self._last = list(exports)
        for e in exports:
            log.info("nfs (backend none) would export %s to %s (%s): %s", e.path, e.clients,
                     "rw" if e.rw else "ro", e.what)
        return True


def _run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise NfsError(f"{what}: {argv[0]} not found (install nfs-kernel-server, or use "
                       "the ganesha/none backend)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NfsError(f"{what}: {' '.join(argv)} timed out") from exc
    if proc.returncode != 0:
        raise NfsError(f"{what}: {' '.join(argv)} exited {proc.returncode}: "
                       f"{(proc.stderr or proc.stdout).strip()[:500]}")
    return proc.stdout


class ExportfsBackend:
    """Kernel NFS server: ``/etc/exports.d/netbootd.exports`` + ``exportfs -ra``, checked
    with ``exportfs -s`` (every path we wrote must be in the live table)."""

    name = "exportfs"

    def __init__(self, exports_file: Path, command: list[str]) -> None:
        self.file = exports_file
        self.command = command or ["exportfs"]
        self._applied = False  #: the live table matches the file (else retry -ra)

    def apply(self, exports: list[Export]) -> bool:
        text = render_exportfs(exports)
        try:
            changed = self.file.read_text() != text
        except FileNotFoundError:
            changed = True
        if not changed and self._applied:
            return False
        if changed:
            write_atomic(self.file, text.encode())
        self._applied = False
        _run([*self.command, "-ra"], "exportfs")
        live = _run([*self.command, "-s"], "exportfs check")
        live_paths = {line.split()[0] for line in live.splitlines() if line.strip()}
        missing = [str(e.path) for e in exports if str(e.path) not in live_paths]
        if missing:
            raise NfsError(f"exportfs did not export {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}")
        self._applied = True
        return True


class GaneshaBackend:
    """nfs-ganesha: EXPORT blocks in ``nfs.ganesha_config`` (``%include`` it from the main
    ganesha.conf), then ``nfs.ganesha_reload`` or SIGHUP to ``nfs.ganesha_pidfile``."""

    name = "ganesha"

    def __init__(self, config: Path, *, reload: list[str], pidfile: Path | None,
                 ids_file: Path, protocols: str = "3") -> None:
        self.file = config
        self.reload_cmd = reload
        self.pidfile = pidfile
        self.ids_file = ids_file
        self.protocols = protocols
        self._applied = False  #: ganesha was told about the file as it is now

    def apply(self, exports: list[Export]) -> bool:
        known = read_json(self.ids_file, {})
        ids = assign_ids(exports, {k: int(v) for k, v in known.items()}
                         if isinstance(known, dict) else {})
        text = render_ganesha(exports, ids, protocols=self.protocols)
        try:
            if self.file.read_text() == text and self._applied:
                return False
        except FileNotFoundError:
            pass
        self._applied = False
        # ids of retired paths are kept: a later re-export of the same path reuses its id
        write_json_atomic(self.ids_file, {**(known if isinstance(known, dict) else {}), **ids})
        write_atomic(self.file, text.encode())
        self.reload()
        self._applied = True
        return True

    def reload(self) -> None:
        if self.reload_cmd:
            _run(list(self.reload_cmd), "ganesha reload")
            return
        if self.pidfile is None:
            raise NfsError("ganesha backend needs nfs.ganesha_reload or nfs.ganesha_pidfile "
                           "to make ganesha re-read its exports")
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            raise NfsError(f"cannot SIGHUP ganesha via {self.pidfile}: {exc}") from exc


def make_backend(settings: Settings) -> Any:
    nfs = settings.nfs
    if nfs.backend == "exportfs":
        return ExportfsBackend(nfs.exports_file, list(nfs.exportfs_command))
    if nfs.backend == "ganesha":
        if nfs.ganesha_config is None:
            raise NfsError("nfs.backend is ganesha but nfs.ganesha_config is not set")
        return GaneshaBackend(nfs.ganesha_config, reload=list(nfs.ganesha_reload),
                              pidfile=nfs.ganesha_pidfile,
                              ids_file=settings.paths.state / "nfs-export-ids.json",
                              protocols="3" if nfs.vers.startswith("3") else "4")
    return NoneBackend()
