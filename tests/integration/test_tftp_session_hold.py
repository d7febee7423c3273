"""A transfer in progress keeps its boot session alive (``Plans.hold`` / ``release``).

A Pi loads a 23 MB initramfs over one slow link for longer than ``boot.session_ttl``
can be; without a hold the session expires under the transfer, and the next file of
the same boot (``cmdline.txt``) is planned afresh, from whatever version a hot swap
made active meanwhile: a boot started on N would finish on N+1. The planner's clock
is the test's, so the TTL passes without waiting; the slow transfer is a real UDP
client that ACKs block 1 and then holds back (the server resends, the transfer stays
alive). Every way a transfer ends releases the session: completion, the worker dying,
the service stopping.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from pathlib import Path

import pytest

from netbootd.model import ImageRef
from netbootd.tftp.piclient import fetch
from netbootd.tftp.testkit import eventually, listing, make_app, running

PI_MAC, SERIAL = "d8:3a:dd:00:00:01", "00c0ffee"
NODES = f"nodes:\n  {PI_MAC}: {{hostname: pi, serial: '{SERIAL}'}}\n"
TTL = 300.0


class Swappable:
    """An image store with versions 1 and 2 of one image; ``active`` is the channel."""

    def __init__(self, roots: dict[str, Path]) -> None:
        self.refs = {v: ImageRef(name="demo", version=v, root=r, kind="pi-boot+rootfs",
                                 channel="prod", boot={"boot_tree": "boot"},
                                 artefacts=listing(r))
                     for v, r in roots.items()}
        self.active = "1"

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        return self.refs[self.active]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for v in ("1", "2"):
        root = tmp_path_factory.mktemp(f"v{v}")
        (root / "boot").mkdir()
        (root / "boot" / "initramfs_2712").write_bytes(os.urandom(300_000))
        out[v] = root
    return out


def rrq(name: str) -> bytes:
    return b"\x00\x01" + name.encode() + b"\x00octet\x00"


def ack(n: int) -> bytes:
    return struct.pack(">HH", 4, n)


class SlowPi:
    """A real UDP client that starts a transfer, ACKs block 1 and then stalls."""

    def __init__(self, server: tuple[str, int], name: str) -> None:
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind(("127.0.0.1", 0))
        self.s.settimeout(5)
        self.s.sendto(rrq(name), server)
        pkt, self.tid = self.s.recvfrom(1024)
        assert pkt[:4] == b"\x00\x03\x00\x01"
        self.data = pkt[4:]
        self.s.sendto(ack(1), self.tid)

    def finish(self) -> bytes:
        """ACK everything from here on; the whole file."""
        n = 1
        while True:
            pkt = self.s.recv(1024)
            if pkt[:2] != b"\x00\x03":
                raise AssertionError(pkt)
            block = struct.unpack(">H", pkt[2:4])[0]
            if block == n + 1:
                n = block
                self.data += pkt[4:]
            self.s.sendto(ack(block), self.tid)
            if block == n and len(pkt) - 4 < 512:
                return self.data

    def close(self) -> None:
        self.s.close()


async def planned_version(svc, server: tuple[str, int]) -> str:
    """The version in the node's ``cmdline.txt``, once that transfer is accounted for
    (its own hold released: the clock may move on)."""
    res = await fetch(server, f"{SERIAL}/cmdline.txt")
    await eventually(lambda: svc.active == 0)
    return res.data.decode().split("version=")[1].split()[0]


def rig(tmp_path: Path, versions: dict[str, Path], clock: Clock, store: Swappable, **tftp):
    app = make_app(tmp_path / "w", versions["1"], nodes_yaml=NODES, images=store,
                   boot={"session_ttl": TTL}, clock=clock,
                   tftp={"retransmit_timeout": 0.5, "retries": 100, "stall_max": 120,
                         **tftp})
    app.clients.learn("127.0.0.1", PI_MAC)
    return app


@pytest.mark.parametrize("engine", ["workers", "inprocess"])
async def test_a_file_asked_for_after_the_ttl_during_a_long_transfer_is_from_the_same_version(
        tmp_path: Path, versions: dict[str, Path], engine: str):
    clock, store = Clock(), Swappable(versions)
    app = rig(tmp_path, versions, clock, store)
    async with running(app, engine=engine) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        assert await planned_version(svc, server) == "1"
        slow = SlowPi(server, f"{SERIAL}/initramfs_2712")
        try:
            clock.now += 3 * TTL  # the session's TTL passes during the transfer ...
            store.active = "2"  # ... and a hot swap activates version 2
            again = await fetch(server, f"{SERIAL}/cmdline.txt")
            assert b"version=1" in again.data, "the boot in flight moved to version 2"
            assert slow.finish() == (versions["1"] / "boot" / "initramfs_2712").read_bytes()
        finally:
            slow.close()
        await eventually(lambda: svc.active == 0)
        # released: the session slides from the end of the transfer, then expires
        clock.now += 0.5 * TTL
        assert await planned_version(svc, server) == "1"
        clock.now += 2 * TTL
        assert await planned_version(svc, server) == "2"


async def test_the_session_is_released_when_the_worker_dies(tmp_path: Path,
                                                            versions: dict[str, Path]):
    clock, store = Clock(), Swappable(versions)
    app = rig(tmp_path, versions, clock, store, workers=1)
    async with running(app) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        slow = SlowPi(server, f"{SERIAL}/initramfs_2712")
        try:
            (worker,) = svc.pool.live()
            clock.now += 3 * TTL
            store.active = "2"
            os.kill(worker.pid, signal.SIGKILL)  # a worker this service started
            await eventually(lambda: svc.active == 0, timeout=10)
        finally:
            slow.close()
        clock.now += 2 * TTL
        assert await planned_version(svc, server) == "2"


async def test_the_session_is_released_when_the_service_stops(tmp_path: Path,
                                                              versions: dict[str, Path]):
    clock, store = Clock(), Swappable(versions)
    app = rig(tmp_path, versions, clock, store)
    async with running(app) as svc:
        slow = SlowPi(("127.0.0.1", app.settings.tftp.port), f"{SERIAL}/initramfs_2712")
    slow.close()
    assert svc.active == 0
    clock.now += 3 * TTL
    store.active = "2"
    async with running(app) as svc:
        assert await planned_version(svc, ("127.0.0.1", app.settings.tftp.port)) == "2"
