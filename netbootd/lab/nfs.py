"""rpcbind + nfs-ganesha (FSAL_VFS) in the lab's server namespace: the NFS root server.

Why ganesha: it is the user-space NFS server in Debian 12 (unfs3 is gone) and needs no
kernel nfsd, so a test can run it inside a namespace without touching the host's exports.

Both daemons run inside a private mount namespace (``unshare --mount``) with a tmpfs on
``/run`` and on ``/var/lib/nfs``: rpcbind's lock/socket/warm-start files and ganesha's state
then never land in the host's ``/run`` (pitfall 5), two labs can run side by side (a second
rpcbind would otherwise refuse to start on the shared ``/run/rpcbind.lock``), and nothing
needs cleaning afterwards: the tmpfs disappears with the last process.

rpcbind starts first (``-f -h ADDR``): ganesha exits with "Cannot register NFS V3 on TCP"
without it. ganesha's dbus/krb5 CRIT lines are harmless.

Exports: ``static_exports`` are written into the main config; ``include`` names a file
netbootd's ganesha backend owns (EXPORT blocks), included at start and re-read on SIGHUP
(``reload_argv()`` is the command to put in ``nfs.ganesha_reload``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .netns import LabError, Topology

_START = r"""
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/lib/nfs
mkdir -p /run/rpcbind /var/lib/nfs/ganesha
rpcbind -f -h "$1" &
echo $! > "$2/rpcbind.pid"
i=0
while [ ! -S /run/rpcbind.sock ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
exec ganesha.nfsd -F -f "$2/ganesha.conf" -L "$2/ganesha.log" -p "$2/ganesha.pid" -N NIV_EVENT
"""


#: Fixed ports, so guests can mount without asking rpcbind (kernel arg
#: ``netbootd.nfs_ports=2049:20048`` of the test image): on this machine kind rpcbind has
#: been seen answering every non-local caller with "Authentication error".
NFS_PORT = 2049
MOUNT_PORT = 20048


def _export_block(export_id: int, path: Path, clients: str) -> str:
    return f"""EXPORT {{
    Export_Id = {export_id};
    Path = "{path}";
    Pseudo = "{path}";
    Protocols = 3;
    Transports = TCP;
    Access_Type = RO;
    Squash = No_Root_Squash;
    SecType = sys;
    CLIENT {{ Clients = {clients}; Access_Type = RO; }}
    FSAL {{ Name = VFS; }}
}}
"""


class NfsServer:
    """rpcbind + ganesha in ``lab``'s ``srv`` namespace; files under ``outdir/nfs``."""

    def __init__(self, lab: Topology, outdir: Path, *, static_exports: list[Path] = (),
                 include: Path | None = None) -> None:
        self.lab = lab
        self.dir = outdir / "nfs"
        self.static_exports = [Path(p) for p in static_exports]
        self.include = include
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "ganesha.log"

    def config(self) -> str:
        parts = [f"""NFS_CORE_PARAM {{
    Protocols = 3;
    Bind_addr = {self.lab.ip("srv")};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    NFS_Port = {NFS_PORT};
    MNT_Port = {MOUNT_PORT};
}}
NFSV4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
"""]
        for i, path in enumerate(self.static_exports, start=1):
            parts.append(_export_block(i, path, self.lab.network))
        if self.include is not None:
            parts.append(f'%include "{self.include}"\n')
        return "\n".join(parts)

    def start(self, timeout: float = 15.0) -> NfsServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.include is not None and not self.include.exists():
            self.include.parent.mkdir(parents=True, exist_ok=True)
            self.include.write_text("# EXPORT blocks written by netbootd\n")
        for stale in ("ganesha.log", "ganesha.pid", "rpcbind.pid"):  # a reused outdir
            (self.dir / stale).unlink(missing_ok=True)
        (self.dir / "ganesha.conf").write_text(self.config())
        self.proc = self.lab.popen(
            "srv", ["unshare", "--mount", "--propagation", "private", "sh", "-c", _START, "sh",
                    self.lab.ip("srv"), str(self.dir)],
            log_file=self.dir / "nfs.out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"ganesha exited ({self.proc.returncode}); see {self.log} and "
                               f"{self.dir / 'nfs.out'}")
            if self.ready():
                return self
            time.sleep(0.2)
        raise LabError(f"NFS server not registered with rpcbind within {timeout}s; "
                       f"see {self.log}")

    @property
    def kernel_args(self) -> str:
        """Kernel argument telling the test image both ports (no rpcbind query needed)."""
        return f"netbootd.nfs_ports={NFS_PORT}:{MOUNT_PORT}"

    def ready(self) -> bool:
        """ganesha is initialised (it registered with rpcbind, or it would have exited)
        and listens on the NFS port. Not ``rpcinfo -p``: rpcbind may refuse remote
        callers, see NFS_PORT."""
        if not (self.log.exists() and "NFS SERVER INITIALIZED" in self.log.read_text(
                errors="replace")):
            return False
        out = self.lab.run_in("srv", ["ss", "-Htln", f"sport = :{NFS_PORT}"], check=False,
                              timeout=5).stdout
        return bool(out.strip()) if shutil.which("ss") else True

    def reload_argv(self) -> list[str]:
        """Command that makes ganesha re-read its exports (for ``nfs.ganesha_reload``)."""
        return ["kill", "-HUP", (self.dir / "ganesha.pid").read_text().strip()]

    def reload(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        for pidfile in ("ganesha.pid", "rpcbind.pid"):
            try:
                pid = int((self.dir / pidfile).read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
