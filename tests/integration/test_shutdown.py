"""A stop is clean whichever process the signal reaches first.

The real daemon (``python -m netbootd serve``, loopback, high ports, TFTP worker
processes) runs in a session of its own, as under a terminal or systemd, and is stopped
while TFTP transfers are in flight: by SIGTERM to its whole process group (systemd's
``KillMode=control-group``), by SIGINT to the group (Ctrl-C), or by SIGTERM to the workers
before the daemon (the order a group signal may be delivered in). Each time: exit
status 0, no ERROR and no "worker died" in the log, no worker started again, no process
left. How fast is measured in bench/attack/ (docs/security.md), not asserted here.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_for

WORKERS = 2
BIG = 8 * 1024 * 1024  # 16,384 blocks of 512: far from done when the stop comes



def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    """Running or a zombie nobody reaped: either way, left behind."""
    return Path(f"/proc/{pid}").exists()


class SlowClient(threading.Thread):
    """One TFTP read at blksize 512 that acknowledges every block, a little slowly, until
    the server ends it (ERROR) or goes quiet. ``blocks`` counts what arrived."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.port, self.name_ = port, name
        self.blocks = 0
        self.error: bytes | None = None
        self.done = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5.0)
            s.sendto(b"\x00\x01" + self.name_.encode() + b"\x00octet\x00", ("127.0.0.1", self.port))
            try:
                while True:
                    data, peer = s.recvfrom(2048)
                    op = struct.unpack("!H", data[:2])[0]
                    if op == 5:
                        self.error = data[4:-1]
                        return
                    if op != 3:
                        continue
                    block = struct.unpack("!H", data[2:4])[0]
                    self.blocks += 1
                    time.sleep(0.002)
                    s.sendto(struct.pack("!HH", 4, block), peer)
                    if len(data) < 516:
                        return
            except OSError:
                return
            finally:
                self.done.set()


@pytest.fixture
def serving(config_dir: Path, tmp_path: Path):
    """The daemon with DHCP, TFTP (2 workers, one big iPXE file) and HTTP on loopback,
    started in a new session (its own process group). Yields (proc, tftp_port, log path)."""
    ipxe = tmp_path / "ipxe"
    ipxe.mkdir()
    (ipxe / "ipxe.efi").write_bytes(os.urandom(BIG))
    cfg = config_dir / "netbootd.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["tftp"].update(workers=WORKERS, ipxe_dir=str(ipxe), extra_ipxe_dirs=[])
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    tftp_port = free_port(socket.SOCK_DGRAM)
    cmd = [sys.executable, "-m", "netbootd", "--config", str(cfg), "serve",
           "--bind", "127.0.0.1", "--tftp-port", str(tftp_port),
           "--dhcp-port", str(free_port(socket.SOCK_DGRAM)),
           "--pxe-port", str(free_port(socket.SOCK_DGRAM)),
           "--http-port", str(free_port()), "--log-level", "DEBUG"]
    log_path = tmp_path / "daemon.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "netbootd serving" in log_path.read_text() or proc.poll() is not None,
                 60, "daemon start")
        assert proc.poll() is None, log_path.read_text()
        yield proc, tftp_port, log_path
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()


def deliver(how: str, proc: subprocess.Popen, workers: list[int]) -> None:
    if how == "SIGTERM to the group":
        os.killpg(proc.pid, signal.SIGTERM)
    elif how == "SIGINT to the group":
        os.killpg(proc.pid, signal.SIGINT)
    else:  # the workers first, then the daemon: the other order a group signal may take
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("how", ["SIGTERM to the group", "SIGINT to the group",
                                 "SIGTERM to the workers first"])
def test_stop_during_transfers_is_clean(serving, how):
    proc, port, log_path = serving
    wait_for(lambda: len(children(proc.pid)) >= WORKERS, 30, "the TFTP workers")
    workers = children(proc.pid)
    clients = [SlowClient(port, "ipxe.efi") for _ in range(4)]
    for c in clients:
        c.start()
    wait_for(lambda: all(c.blocks >= 20 for c in clients), 60, "transfers in flight")

    deliver(how, proc, workers)
    assert proc.wait(timeout=30) == 0  # generous: the 2 s are measured in bench/attack/

    text = log_path.read_text()
    bad = [line for line in text.splitlines()
           if " ERROR " in line or "died" in line or "Traceback" in line]
    assert not bad, "\n".join(bad)
    started = [line for line in text.splitlines() if "tftp: worker" in line and "started" in line]
    assert len(started) == WORKERS, f"a worker was started again while stopping: {started}"
    for pid in workers:
        wait_for(lambda pid=pid: not alive(pid), 5, f"worker {pid} gone")
    for c in clients:  # each client was told, not left to time out
        assert c.done.wait(10)
        assert c.error is not None and b"server stopping" in c.error, (c.blocks, c.error)


def test_stop_when_idle_is_clean(serving):
    proc, _port, log_path = serving
    wait_for(lambda: len(children(proc.pid)) >= WORKERS, 30, "the TFTP workers")
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log_path.read_text()
    assert " ERROR " not in text and "died" not in text, text
    for pid in workers:
        wait_for(lambda pid=pid: not alive(pid), 5, f"worker {pid} gone")
