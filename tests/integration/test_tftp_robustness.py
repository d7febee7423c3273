"""Protocol edge cases, limits, packet loss, concurrency and fuzzing against the engine.

Raw-socket peers here are real UDP clients written in the test; the server runs on
its own engine thread (transfers there or in worker processes), so blocking socket
calls with timeouts are fine.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest

from netbootd.tftp.piclient import TftpError, fetch
from netbootd.tftp.testkit import eventually, make_app, running

MAC = "d8:3a:dd:00:00:01"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image")
    boot = root / "boot"
    boot.mkdir()
    (boot / "small.bin").write_bytes(os.urandom(2000))  # 4 blocks of 512 (+ a short one)
    (boot / "mid.bin").write_bytes(os.urandom(150_000))
    (boot / "loss.bin").write_bytes(os.urandom(300_000))
    (boot / "escape").symlink_to("/etc/passwd")
    return root


def rrq(name: str, mode: str = "octet", **opts: str) -> bytes:
    out = b"\x00\x01" + name.encode() + b"\x00" + mode.encode() + b"\x00"
    for k, v in opts.items():
        out += k.encode() + b"\x00" + v.encode() + b"\x00"
    return out


def ack(n: int) -> bytes:
    return struct.pack(">HH", 4, n & 0xFFFF)


class Peer:
    """A plain UDP socket with a receive timeout."""

    def __init__(self, ip: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind((ip, 0))
        self.s.settimeout(timeout)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.s.sendto(data, addr)

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        return self.s.recvfrom(65536)

    def nothing_for(self, seconds: float) -> bool:
        self.s.settimeout(seconds)
        try:
            self.s.recvfrom(65536)
            return False
        except TimeoutError:
            return True
        finally:
            self.s.settimeout(30.0)

    def close(self) -> None:
        self.s.close()


def error_code(pkt: bytes) -> int:
    assert pkt[:2] == b"\x00\x05", pkt[:20]
    return struct.unpack(">H", pkt[2:4])[0]


@pytest.fixture(params=["workers", "inprocess"])
async def srv(request: pytest.FixtureRequest, image: Path, tmp_path: Path):
    """The service with transfers in worker processes (the daemon's default) and in
    this process's pump threads (``tftp.workers: 0``); tests without this fixture run
    the default."""
    app = make_app(tmp_path / "work", image, tftp={"retransmit_timeout": 0.3, "retries": 3})
    app.clients.learn("127.0.0.1", MAC)
    async with running(app, engine=request.param) as svc:
        yield app, svc, ("127.0.0.1", app.settings.tftp.port)


def malformed(app) -> float:
    return app.metrics.registry.get_sample_value(
        "netbootd_malformed_inputs_total", {"service": "tftp"}) or 0.0


async def test_wrq_gets_error_2(srv):
    _, _, server = srv
    p = Peer()
    try:
        p.send(b"\x00\x02up.bin\x00octet\x00", server)
        pkt, addr = p.recv()
        assert error_code(pkt) == 2 and addr[1] != server[1]
    finally:
        p.close()


@pytest.mark.parametrize("name,code", [
    ("../../etc/passwd", 2), ("a/../../etc/passwd", 2), ("escape", 2), ("/etc/passwd", 1),
    ("small.bin\x01", 2), ("..\\..\\etc\\passwd", 2), ("nope.bin", 1),
])
async def test_traversal_and_missing(srv, name: str, code: int):
    _, _, server = srv
    p = Peer()
    try:
        p.send(rrq(name), server)
        pkt, _ = p.recv()
        assert error_code(pkt) == code
    finally:
        p.close()


async def test_unsupported_mode(srv):
    _, _, server = srv
    p = Peer()
    try:
        p.send(rrq("small.bin", "mail"), server)
        pkt, _ = p.recv()
        assert error_code(pkt) == 4
    finally:
        p.close()


async def test_foreign_tid_gets_error_5_and_changes_nothing(srv, image: Path):
    _, _, server = srv
    p, stranger = Peer(), Peer()
    try:
        p.send(rrq("small.bin"), server)
        data1, tid = p.recv()
        assert data1[:4] == b"\x00\x03\x00\x01"
        stranger.send(ack(1), tid)
        pkt, src = stranger.recv()
        assert error_code(pkt) == 5 and src == tid
        assert finish_lockstep(p, tid, data1) == (image / "boot" / "small.bin").read_bytes()
    finally:
        p.close()
        stranger.close()


def finish_lockstep(p: Peer, tid: tuple[str, int], first: bytes) -> bytes:
    """ACK block by block (512-byte blocks) from DATA 1 ``first`` to the end; the file."""
    got, block = first[4:], 1
    while True:
        p.send(ack(block), tid)
        pkt, src = p.recv()
        assert src == tid
        block += 1
        assert struct.unpack(">H", pkt[2:4])[0] == block
        got += pkt[4:]
        if len(pkt) - 4 < 512:
            p.send(ack(block), tid)
            return got


async def test_garbage_on_a_transfer_port_is_dropped_and_counted(srv, image: Path):
    """Garbage sent to a running transfer's port, by its client and by a stranger, is
    dropped and counted; nobody gets an answer to it; the file still arrives whole."""
    app, svc, server = srv
    p, stranger = Peer(), Peer()
    junk = [b"", b"\x00", b"\x07\x00\x00\x01", b"\x00\x09xx", b"\xff" * 600]
    try:
        before = malformed(app)
        p.send(rrq("small.bin"), server)
        data1, tid = p.recv()
        for j in junk:
            p.send(j, tid)
            stranger.send(j, tid)
        p.send(b"\x00\x03\x00\x01abc", tid)  # well-formed but meaningless: ignored
        assert stranger.nothing_for(0.2)
        assert finish_lockstep(p, tid, data1) == (image / "boot" / "small.bin").read_bytes()
        await eventually(lambda: svc.active == 0)
        await eventually(lambda: malformed(app) == before + 2 * len(junk))
        ev = [e for e in app.events.recent() if e.kind == "tftp"][-1]
        assert ev.fields["outcome"] == "ok"
    finally:
        p.close()
        stranger.close()


async def test_duplicate_ack_never_causes_a_second_burst(srv):
    """Sorcerer's apprentice: ACK 1 twice -> DATA 2 once (until the timer resends)."""
    _, _, server = srv
    p = Peer()
    try:
        p.send(rrq("small.bin"), server)
        _, tid = p.recv()
        t0 = time.monotonic()  # the server sees the first ACK 1 after this
        p.send(ack(1), tid)
        p.send(ack(1), tid)
        p.send(ack(1), tid)
        pkt, _ = p.recv()
        assert pkt[:4] == b"\x00\x03\x00\x02"
        pkt, _ = p.recv()  # the only other packet is the timer's resend, 0.3 s later
        assert pkt[:4] == b"\x00\x03\x00\x02" and time.monotonic() - t0 >= 0.29
    finally:
        p.close()


async def test_retransmit_then_give_up(srv):
    app, svc, server = srv
    p = Peer()
    try:
        p.send(rrq("small.bin"), server)
        seen = [p.recv()[0] for _ in range(4)]  # first send + 3 retries
        assert all(pkt[:4] == b"\x00\x03\x00\x01" for pkt in seen)
        last, _ = p.recv()  # then the server gives up and says so
        assert error_code(last) == 0
        await eventually(lambda: svc.active == 0)
        ev = [e for e in app.events.recent() if e.kind == "tftp"][-1]
        assert ev.fields["outcome"] == "error"
    finally:
        p.close()


@pytest.mark.parametrize("message", [b"Early terminate\x00", b"\xff\xfe not UTF-8"])
async def test_client_error_after_oack_is_aborted_not_failure(srv, message: bytes):
    app, svc, server = srv
    p = Peer()
    try:
        p.send(rrq("mid.bin", tsize="0", blksize="1468"), server)
        pkt, tid = p.recv()
        assert pkt[:2] == b"\x00\x06" and b"tsize\x00150000\x00" in pkt
        p.send(b"\x00\x05\x00\x00" + message, tid)  # the Pi's probe-and-abort
        await eventually(lambda: svc.active == 0)
        ev = [e for e in app.events.recent() if e.kind == "tftp"][-1]
        assert ev.fields["outcome"] == "aborted"
        assert p.nothing_for(0.5)  # and nothing is resent afterwards
    finally:
        p.close()


async def test_limits_per_client_and_global(image: Path, tmp_path: Path):
    """Transfers whose clients acknowledge data are never evicted: once every slot is
    moving data, a newcomer is refused (per client first, then globally)."""
    app = make_app(tmp_path / "w", image, tftp={"max_per_client": 2, "max_transfers": 3})
    for i in range(1, 5):
        app.clients.learn(f"127.0.0.{i}", MAC)
    async with running(app) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        peers = [Peer("127.0.0.1") for _ in range(3)] + [Peer("127.0.0.2"), Peer("127.0.0.3")]
        try:
            for i, p in enumerate(peers):
                p.send(rrq("mid.bin"), server)
                pkt, tid = p.recv()
                if i < 2 or i == 3:
                    assert pkt[:4] == b"\x00\x03\x00\x01", i
                    p.send(ack(1), tid)  # progress: block 2 follows, never ACKed
                    assert p.recv()[0][:4] == b"\x00\x03\x00\x02"
                    want = min(i + 1, 3)
                    await eventually(lambda want=want: want == sum(
                        e.progressed for e in svc._open.values()))
                else:  # third from 127.0.0.1 (per client), then fourth overall (global)
                    assert error_code(pkt) == 0 and b"busy" in pkt, i
            assert svc.active == 3
            health = svc.health()
            assert health.pop("workers", svc.workers) == svc.workers
            assert health == {"ok": True, "bound": svc.bound, "active": 3, "pump_threads": 16}
        finally:
            for p in peers:
                p.close()
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0
    assert svc.active == 0 and not svc.health()["ok"]


@pytest.mark.parametrize("engine", ["workers", "inprocess"])
async def test_stop_is_fast_and_tells_clients(image: Path, tmp_path: Path, engine: str):
    app = make_app(tmp_path / "w", image)
    app.clients.learn("127.0.0.1", MAC)
    p = Peer()
    try:
        async with running(app, engine=engine) as svc:
            p.send(rrq("mid.bin"), ("127.0.0.1", app.settings.tftp.port))
            p.recv()
            assert svc.active == 1
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 1.0
        # the stop's ERROR may be preceded by a timer resend; it arrives within a second
        for _ in range(3):
            pkt, _ = p.recv()
            if pkt[:2] == b"\x00\x05":
                break
        assert error_code(pkt) == 0
    finally:
        p.close()


# -- packet loss -----------------------------------------------------------------------

class LossyRelay:
    """A UDP relay that drops ``loss`` of datagrams in each direction.

    Clients talk to ``port``; the relay keeps one upstream socket per client and,
    towards the client, one socket per server TID, so TFTP's port switch survives.
    """

    def __init__(self, server: tuple[str, int], loss: float, seed: int = 7, *,
                 spare_handshake: bool = False, to_client_only: bool = False) -> None:
        """``spare_handshake``: never drop the RRQ, the OACK or ACK 0;
        ``to_client_only``: drop only what the server sends (see the atftp test)."""
        self.server = server
        self.loss = loss
        self.spare_handshake = spare_handshake
        self.to_client_only = to_client_only
        self.rng = random.Random(seed)
        self.loop = asyncio.get_running_loop()
        self.front = self._sock(self._on_front)
        self.port = self.front.getsockname()[1]
        self.up: dict[tuple, socket.socket] = {}
        self.face: dict[tuple, socket.socket] = {}
        self.dropped = 0

    def _sock(self, cb, *args) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        self.loop.add_reader(s.fileno(), cb, s, *args)
        return s

    def _drop(self, data: bytes, to_client: bool = False) -> bool:
        if self.to_client_only and not to_client:
            return False
        if self.spare_handshake and (data[:2] in (b"\x00\x01", b"\x00\x06")
                                     or data[:4] == b"\x00\x04\x00\x00"):
            return False
        if self.rng.random() < self.loss:
            self.dropped += 1
            return True
        return False

    def _on_front(self, s: socket.socket) -> None:
        data, client = s.recvfrom(65536)
        if client not in self.up:
            self.up[client] = self._sock(self._on_up, client)
        if not self._drop(data):
            self.up[client].sendto(data, self.server)

    def _on_up(self, s: socket.socket, client: tuple) -> None:
        data, tid = s.recvfrom(65536)
        key = (client, tid)
        if key not in self.face:
            self.face[key] = self._sock(self._on_face, client, tid)
        if not self._drop(data, to_client=True):
            self.face[key].sendto(data, client)

    def _on_face(self, s: socket.socket, client: tuple, tid: tuple) -> None:
        data, _ = s.recvfrom(65536)
        if not self._drop(data):
            self.up[client].sendto(data, tid)

    def close(self) -> None:
        for s in [self.front, *self.up.values(), *self.face.values()]:
            self.loop.remove_reader(s.fileno())
            s.close()


async def test_ten_percent_loss_both_directions(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "w", image, tftp={"retransmit_timeout": 0.1, "retries": 12})
    app.clients.learn("127.0.0.1", MAC)
    want = (image / "boot" / "loss.bin").read_bytes()
    async with running(app):
        relay = LossyRelay(("127.0.0.1", app.settings.tftp.port), 0.10)
        try:
            via = ("127.0.0.1", relay.port)
            results = await asyncio.gather(
                *[fetch(via, "loss.bin", rrq_retry=0.3, ack_timeout=0.3, tries=20,
                        file_timeout=120) for _ in range(4)])
            assert all(r.data == want for r in results)
            assert relay.dropped > 50
        finally:
            relay.close()


@pytest.mark.slow
async def test_ten_percent_loss_atftp_windowsize(image: Path, tmp_path: Path):
    """RFC 7440 recovery under loss: a lost block makes the client ACK the last good one
    and the server restarts the window there. Only the server's datagrams are dropped,
    and never the OACK, because of two atftp 0.8.0 quirks that are not what this test
    is about: it aborts ("unexpected OACK") when its ACK 0 is lost and the server
    resends the OACK, as RFC 2347 has it; and when an ACK of a window is lost, it
    ignores the resent window ("got wrong block") and re-ACKs only after its own
    timeout, which each resent datagram restarts, so the transfer stalls until the
    server gives up (main's code and this one alike, 3 of 5 runs each). Lost ACKs are
    covered with the emulated Pi above."""
    if shutil.which("atftp") is None:
        pytest.fail("atftp not installed: apt-get install atftp", pytrace=False)
    app = make_app(tmp_path / "w", image, tftp={"retransmit_timeout": 0.1, "retries": 12})
    app.clients.learn("127.0.0.1", MAC)
    want = (image / "boot" / "loss.bin").read_bytes()
    async with running(app):
        relay = LossyRelay(("127.0.0.1", app.settings.tftp.port), 0.10,
                           spare_handshake=True, to_client_only=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                "atftp", "--tftp-timeout", "1", "--option", "windowsize 8", "--option",
                "blksize 1468", "-g", "-r", "loss.bin", "-l", str(tmp_path / "atftp.out"),
                "127.0.0.1", str(relay.port), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, out.decode()
            assert (tmp_path / "atftp.out").read_bytes() == want
            assert relay.dropped > 5
        finally:
            relay.close()


# -- load and fuzz ---------------------------------------------------------------------

async def test_200_concurrent_transfers(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "w", image)
    async with running(app) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        want = (image / "boot" / "mid.bin").read_bytes()
        jobs = [fetch(server, f"d8-3a-dd-00-00-{i % 4:02x}/mid.bin", bind_ip=f"127.0.0.{1 + i % 4}",
                      file_timeout=120, tries=10)
                for i in range(200)]
        results = await asyncio.gather(*jobs)
        assert all(r.data == want for r in results)
        assert len({(r.server_port) for r in results}) > 1
        await eventually(lambda: svc.active == 0)
    ok = app.metrics.registry.get_sample_value(
        "netbootd_requests_total", {"service": "tftp", "outcome": "ok"})
    assert ok == 200


def _mutations(rng: random.Random, valid: list[bytes]):
    while True:
        kind = rng.random()
        if kind < 0.3:
            yield rng.randbytes(rng.randrange(0, 600))
        else:
            pkt = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                op = rng.random()
                if op < 0.4 and pkt:
                    pkt[rng.randrange(len(pkt))] = rng.randrange(256)
                elif op < 0.6:
                    pkt = pkt[:rng.randrange(len(pkt) + 1)]
                elif op < 0.8:
                    pkt += rng.randbytes(rng.randrange(1, 40))
                else:
                    pkt[0:2] = struct.pack(">H", rng.randrange(0, 9))
            yield bytes(pkt)


async def test_fuzz_100k_datagrams_listener_survives(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "w", image, tftp={"retries": 100, "max_per_client": 2000})
    app.clients.learn("127.0.0.1", MAC)
    app.clients.learn("127.0.0.2", MAC)
    rng = random.Random(1234)
    valid = [rrq("small.bin"), rrq("mid.bin", tsize="0", blksize="1468"), rrq("x" * 50),
             rrq("a//b/../c", "netascii", windowsize="4", timeout="2"), ack(1), ack(0),
             b"\x00\x03\x00\x01hello", b"\x00\x05\x00\x01oops\x00", b"\x00\x06tsize\x001\x00",
             b"\x00\x02w.bin\x00octet\x00", rrq("small.bin", blksize="abc"),
             rrq("ipxe.efi", "octet", tsize="0")]
    async with running(app) as svc:
        server = ("127.0.0.1", app.settings.tftp.port)
        client = Peer()
        fuzzers = [Peer("127.0.0.3") for _ in range(4)]
        try:
            client.send(rrq("small.bin"), server)
            first, tid = client.recv()
            gen = _mutations(rng, valid)
            before = malformed(app)
            for i in range(100_000):
                target = tid if i % 3 == 0 else server
                try:
                    fuzzers[i % 4].send(next(gen), target)
                except OSError:
                    pass
                if i % 250 == 0:
                    await asyncio.sleep(0.002)  # let the engine thread drain its queue
            await asyncio.sleep(0.5)
            # many datagrams really reached the engine: 81k of 100k were counted as
            # malformed on an idle machine (the rest parse, e.g. RRQs answered "File not
            # found"); a loaded CI box drops more of them in the socket buffer
            assert malformed(app) - before > 20_000
            assert svc.health()["ok"]
            # the transfer that was being fuzzed still completes correctly
            got, block, pkt = first[4:], 1, first
            while len(pkt) - 4 == 512:
                client.send(ack(block), tid)
                while True:  # skip the timer's resends of earlier blocks queued meanwhile
                    pkt, src = client.recv()
                    if src == tid and pkt[:4] == struct.pack(">HH", 3, block + 1):
                        break
                block += 1
                got += pkt[4:]
            client.send(ack(block), tid)
            assert got == (image / "boot" / "small.bin").read_bytes()
            # and the listener serves a fresh, valid request
            res = await fetch(server, "mid.bin", bind_ip="127.0.0.2")
            assert res.data == (image / "boot" / "mid.bin").read_bytes()
        finally:
            client.close()
            for f in fuzzers:
                f.close()


async def test_fuzz_quick(srv, image: Path):
    """A short fuzz run that is always on (the 100k run is marked slow)."""
    app, _, server = srv
    rng = random.Random(99)
    gen = _mutations(rng, [rrq("small.bin"), ack(1), b"\x00\x05\x00\x00x\x00"])
    p = Peer("127.0.0.3")
    try:
        for _ in range(3000):
            p.send(next(gen), server)
        await asyncio.sleep(0.3)
    finally:
        p.close()
    res = await fetch(server, "mid.bin")
    assert res.data == (image / "boot" / "mid.bin").read_bytes()
    assert malformed(app) > 100
    with pytest.raises(TftpError):
        await fetch(server, "nope")


async def test_wildcard_bind_answers_from_the_address_asked(image: Path, tmp_path: Path):
    """bind "" = every address; IP_PKTINFO tells which one the RRQ came to, and both the
    transfer's source address and the rendered server address follow it."""
    app = make_app(tmp_path / "w", image, tftp={"bind": ""})
    app.clients.learn("127.0.0.1", MAC)
    async with running(app) as svc:
        assert svc.bound == [f"0.0.0.0:{app.settings.tftp.port}"]
        p = Peer()
        try:
            p.send(rrq("cmdline.txt"), ("127.0.0.2", app.settings.tftp.port))
            pkt, src = p.recv()
            assert src[0] == "127.0.0.2" and pkt[:4] == b"\x00\x03\x00\x01"
            assert b"server=127.0.0.2" in pkt
            p.send(ack(1), src)
        finally:
            p.close()


async def test_blksize_capped_by_config_and_answered_in_oack(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "w", image, tftp={"blksize_max": 9000})
    app.clients.learn("127.0.0.1", MAC)
    async with running(app):
        server = ("127.0.0.1", app.settings.tftp.port)
        res = await fetch(server, "mid.bin", blksize=65464)
        assert res.oack["blksize"] == "9000"
        assert res.data == (image / "boot" / "mid.bin").read_bytes()
