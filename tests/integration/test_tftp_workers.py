"""TFTP worker processes: hand-off, a worker dying mid-transfer, stop, descriptors.

Real sockets on 127.0.0.1, real worker processes started by the service; the client
side is a plain UDP socket written here. The only process a test kills is a worker the
service under test started (by its PID, from the pool).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from netbootd.tftp.piclient import fetch
from netbootd.tftp.testkit import eventually, make_app, running

MAC = "d8:3a:dd:00:00:01"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image")
    boot = root / "boot"
    boot.mkdir()
    (boot / "mid.bin").write_bytes(os.urandom(150_000))  # small: read, passed as a memfd
    (boot / "big.bin").write_bytes(os.urandom(1_000_000))  # large: its own descriptor
    return root


def rrq(name: str, **opts: str) -> bytes:
    out = b"\x00\x01" + name.encode() + b"\x00octet\x00"
    for k, v in opts.items():
        out += k.encode() + b"\x00" + v.encode() + b"\x00"
    return out


def client(timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def tftp_events(app) -> list:
    return [e for e in app.events.recent() if e.kind == "tftp"]


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def maps_of(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def test_transfers_run_in_the_least_loaded_worker(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "w", image, tftp={"workers": 2})
    app.clients.learn("127.0.0.1", MAC)
    async with running(app) as svc:
        assert svc.pool is not None and svc.health()["workers"] == 2
        peers = [client() for _ in range(4)]
        try:
            for p in peers:  # nobody ACKs: all four stay open
                p.sendto(rrq("mid.bin"), ("127.0.0.1", app.settings.tftp.port))
                assert p.recvfrom(600)[0][:4] == b"\x00\x03\x00\x01"
            await eventually(lambda: sorted(len(w.jobs) for w in svc.pool.live()) == [2, 2])
        finally:
            for p in peers:
                p.close()


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("pump_threads", [1, 2, 6])
async def test_transfers_share_up_to_pump_threads_threads(image: Path, tmp_path: Path,
                                                          pump_threads: int):
    """A new transfer gets a thread of its own while fewer than ``tftp.pump_threads``
    run; beyond that it joins the least loaded thread (no new thread). All complete."""
    app = make_app(tmp_path / "w", image, tftp={"workers": 1, "pump_threads": pump_threads})
    app.clients.learn("127.0.0.1", MAC)
    server = ("127.0.0.1", app.settings.tftp.port)
    async with running(app) as svc:
        assert svc.health()["pump_threads"] == pump_threads
        (w,) = svc.pool.live()
        idle = threads_of(w.pid)
        peers = [client() for _ in range(4)]
        try:
            for p in peers:  # nobody ACKs: all four stay open
                p.sendto(rrq("mid.bin"), server)
                assert p.recvfrom(600)[0][:4] == b"\x00\x03\x00\x01"
            assert threads_of(w.pid) == idle + min(pump_threads, 4)
            res = await fetch(server, "big.bin", blksize=1468)
            assert res.data == (image / "boot" / "big.bin").read_bytes()
            assert threads_of(w.pid) == idle + min(pump_threads, 5)
        finally:
            for p in peers:
                p.close()


async def test_worker_death_is_accounted_and_the_worker_restarted(image: Path,
                                                                  tmp_path: Path):
    app = make_app(tmp_path / "w", image, tftp={"workers": 1})
    app.clients.learn("127.0.0.1", MAC)
    async with running(app) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        p = client()
        try:
            p.sendto(rrq("big.bin"), server)
            assert p.recvfrom(600)[0][:4] == b"\x00\x03\x00\x01"
            (worker,) = svc.pool.live()
            assert worker.jobs and svc.active == 1
            os.kill(worker.pid, signal.SIGKILL)
            await eventually(lambda: svc.active == 0)
            ev = tftp_events(app)[-1]
            assert ev.fields["outcome"] == "error" and ev.fields["file"] == "big.bin"
            assert ev.message == "TFTP worker died"
            assert app.metrics.registry.get_sample_value(
                "netbootd_requests_total", {"service": "tftp", "outcome": "error"}) == 1
            assert app.metrics.registry.get_sample_value(
                "netbootd_active_transfers", {"service": "tftp"}) == 0
            # until its slot is started again (after a pause: it died young), requests
            # are served on the engine thread, not refused
            assert svc.pool.live() == []
            res = await fetch(server, "mid.bin")
            assert res.data == (image / "boot" / "mid.bin").read_bytes()
            # ... then the new worker takes over
            await eventually(lambda: len(svc.pool.live()) == 1, timeout=60)
            (again,) = svc.pool.live()
            assert again.pid != worker.pid and svc.pool.restarts == 1
            assert not alive(worker.pid)  # reaped, not a zombie
            # ... and serves: the client's next request is a new, complete transfer
            res = await fetch(server, "big.bin", blksize=1468)
            assert res.data == (image / "boot" / "big.bin").read_bytes()
            await eventually(lambda: svc.active == 0)
            assert tftp_events(app)[-1].fields["outcome"] == "ok"
            assert svc.health()["ok"]
        finally:
            p.close()


async def test_stop_aborts_the_transfers_in_workers(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "w", image, tftp={"workers": 2})
    app.clients.learn("127.0.0.1", MAC)
    peers = [client() for _ in range(3)]
    try:
        async with running(app) as svc:
            for p in peers:
                p.sendto(rrq("big.bin", blksize="1468"), ("127.0.0.1", app.settings.tftp.port))
                assert p.recvfrom(600)[0][:2] == b"\x00\x06"  # OACK, never ACKed
            assert sum(len(w.jobs) for w in svc.pool.live()) == 3
            pids = [w.pid for w in svc.pool.live()]
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 1.0
        assert not any(alive(pid) for pid in pids)
        assert svc.active == 0
        for p in peers:  # each client is told (maybe after a resent OACK)
            for _ in range(3):
                pkt, _ = p.recvfrom(600)
                if pkt[:2] == b"\x00\x05":
                    break
            assert struct.unpack(">H", pkt[2:4])[0] == 0 and b"server stopping" in pkt
        events = tftp_events(app)
        assert [e.fields["outcome"] for e in events] == ["aborted"] * 3
        assert all(e.message == "server stopping" for e in events)
    finally:
        for p in peers:
            p.close()


async def test_rendered_file_reaches_the_worker_as_a_memfd(image: Path, tmp_path: Path):
    """cmdline.txt is rendered in the daemon; the worker maps it from a sealed memfd
    (read-only, shared) and sends exactly the rendered bytes. A large file is mapped
    read-only from the descriptor of the file itself."""
    app = make_app(tmp_path / "w", image, tftp={"workers": 1})
    app.clients.learn("127.0.0.1", MAC)
    async with running(app) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        p, q = client(), client()
        try:
            p.sendto(rrq("cmdline.txt", blksize="8"), server)  # small blocks: stays open
            assert p.recvfrom(600)[0][:2] == b"\x00\x06"
            q.sendto(rrq("big.bin"), server)
            assert q.recvfrom(600)[0][:4] == b"\x00\x03\x00\x01"
            (worker,) = svc.pool.live()
            maps = maps_of(worker.pid).splitlines()
            memfd = [m for m in maps if "memfd:netbootd-tftp" in m]
            big = [m for m in maps if m.endswith(str(image / "boot" / "big.bin"))]
            assert memfd and all(m.split()[1] == "r--s" for m in memfd), memfd
            assert big and all(m.split()[1] == "r--s" for m in big), big
            # the worker holds no descriptor of a file open for writing (beyond the
            # stderr it shares with the daemon, for its log)
            for fd in set(os.listdir(f"/proc/{worker.pid}/fd")) - {"0", "1", "2"}:
                target = os.readlink(f"/proc/{worker.pid}/fd/{fd}")
                if target.startswith("/") and not target.startswith("/dev/"):
                    flags = Path(f"/proc/{worker.pid}/fdinfo/{fd}").read_text()
                    mode = int(flags.split("flags:")[1].split()[0], 8) & os.O_ACCMODE
                    assert mode == os.O_RDONLY, target
        finally:
            p.close()
            q.close()
        res = await fetch(server, "cmdline.txt")
        text = res.data.decode()
        assert f"netbootd.mac={MAC}" in text and "server=127.0.0.1" in text
        await eventually(lambda: any(e.fields["outcome"] == "ok" for e in tftp_events(app)))


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("engine", ["workers", "inprocess"])
async def test_no_descriptor_leaks(image: Path, tmp_path: Path, engine: str):
    app = make_app(tmp_path / "w", image, tftp={"workers": 1})
    app.clients.learn("127.0.0.1", MAC)
    before = _fds()
    async with running(app, engine=engine) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        worker_fds = None
        for name in ("mid.bin", "big.bin", "cmdline.txt") * 3:
            res = await fetch(server, name)
            assert res.data
            await eventually(lambda: svc.active == 0)
            if svc.pool is not None:
                (w,) = svc.pool.live()
                n = len(os.listdir(f"/proc/{w.pid}/fd"))
                assert worker_fds in (None, n), "the worker keeps descriptors"
                worker_fds = n
    assert _fds() == before
