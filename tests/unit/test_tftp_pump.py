"""The C block loop (``_pump.Pump``) driven packet by packet: exact datagrams out.

Each test scripts a client on a real loopback socket, feeds one sequence (loss,
duplicate ACKs, windows, block wrap, client ERROR, abort, stop, strangers, stalls)
and asserts every datagram the loop sends and what it reports. The pump runs in a
thread of its own, as in production (:mod:`netbootd.tftp.pumps`).
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from netbootd.tftp import codec
from netbootd.tftp.pumps import load_pump

ERR = b"\x00\x05"


def data(n: int, payload: bytes) -> bytes:
    return struct.pack(">HH", 3, n & 0xFFFF) + payload


def ack(n: int) -> bytes:
    return struct.pack(">HH", 4, n & 0xFFFF)


def error(code: int, msg: str) -> bytes:
    return struct.pack(">HH", 5, code) + msg.encode() + b"\0"


class Rig:
    """One pump in its own thread, and a client socket per transfer."""

    def __init__(self) -> None:
        self.pump = load_pump().Pump()
        self.events: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.clients: list[socket.socket] = []

    def _serve(self) -> None:
        while (got := self.pump.serve()) is not None:
            for ev in got:
                self.events.put(ev)
        self.events.put(None)

    def add(self, job: int, content: bytes, *, blksize: int = 512, window: int = 1,
            timeout: float = 5.0, retries: int = 3, oack: bytes | None = None,
            stall_max: float = 60.0) -> socket.socket:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        self.clients.append(client)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.connect(client.getsockname())
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(sock.getsockname())
        client.connect(sock.getsockname())
        for s in (sock, stranger):
            s.setblocking(False)
        self.pump.add(job, sock.detach(), stranger.detach(), content, blksize, window,
                      timeout, retries, oack, stall_max)
        return client

    def done(self) -> tuple:
        """The next ``done`` report (progress reports before it are skipped)."""
        while True:
            ev = self.events.get(timeout=10)
            assert ev is not None, "the pump stopped without reporting"
            if ev[0] == "done":
                return ev

    def close(self) -> None:
        self.pump.stop()
        self.thread.join(5)
        for c in self.clients:
            c.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def recv(c: socket.socket) -> bytes:
    return c.recv(70000)


@pytest.mark.parametrize("blksize, window, timeout, retries, stall", [
    (7, 1, 1.0, 1, 9.0), (65465, 1, 1.0, 1, 9.0), (512, 0, 1.0, 1, 9.0),
    (512, 65536, 1.0, 1, 9.0), (512, 1, 0.0, 1, 9.0), (512, 1, 1.0, -1, 9.0),
    (512, 1, 1.0, 1, 0.0)])
def test_out_of_range_parameters_are_refused(blksize, window, timeout, retries, stall):
    pump = load_pump().Pump()
    with pytest.raises(ValueError):
        pump.add(1, 0, -1, b"", blksize, window, timeout, retries, None, stall)


def test_lock_step_and_duplicate_acks_never_resend(rig: Rig):
    """RFC 1350 lock-step; a duplicate ACK sends nothing (the sorcerer's apprentice):
    the datagram after it is the next block, never a second copy of the current one."""
    content = os.urandom(2000)
    c = rig.add(1, content)
    assert recv(c) == data(1, content[:512])
    c.send(ack(1))
    assert recv(c) == data(2, content[512:1024])
    c.send(ack(1))  # duplicate
    c.send(ack(0))  # stale
    c.send(ack(2))
    assert recv(c) == data(3, content[1024:1536])
    c.send(ack(3))
    assert recv(c) == data(4, content[1536:])
    c.send(ack(4))
    assert rig.done()[1:8] == (1, "ok", "", 4, 2000, 4, 0)


def test_progress_is_reported_once_at_the_first_acknowledged_block(rig: Rig):
    c = rig.add(7, b"x" * 1500)
    recv(c)
    c.send(ack(1))
    recv(c)
    c.send(ack(2))
    recv(c)
    c.send(ack(3))
    assert rig.events.get(timeout=10) == ("progress", 7)
    assert rig.done()[:3] == ("done", 7, "ok")
    assert rig.events.empty()


def test_loss_resends_the_same_block_then_gives_up(rig: Rig):
    content = os.urandom(600)
    c = rig.add(2, content, timeout=0.05, retries=2)
    assert [recv(c) for _ in range(3)] == [data(1, content[:512])] * 3
    assert recv(c) == error(0, "Timeout")
    ev = rig.done()
    assert ev[1:8] == (2, "error", "timeout after 2 retries", 0, 1536, 4, 0)


def test_a_lost_ack_is_recovered_by_the_resend(rig: Rig):
    content = os.urandom(1000)
    c = rig.add(3, content, timeout=0.05)
    assert recv(c) == data(1, content[:512])
    assert recv(c) == data(1, content[:512])  # our ACK "was lost": the block comes again
    c.send(ack(1))
    while (pkt := recv(c)) == data(1, content[:512]):
        pass  # a resend that crossed the ACK
    assert pkt == data(2, content[512:])
    c.send(ack(2))
    assert rig.done()[2] == "ok"


def test_windowsize_restarts_after_the_last_good_block(rig: Rig):
    """RFC 7440: the client saw a gap after block 2 and ACKs 2: the window is 3..6."""
    content = bytes(range(76))  # blksize 8: 9 full blocks and a short 10th
    c = rig.add(4, content, blksize=8, window=4)
    assert [recv(c) for _ in range(4)] == [data(n, content[(n - 1) * 8:n * 8])
                                          for n in range(1, 5)]
    c.send(ack(2))
    assert [recv(c) for _ in range(4)] == [data(n, content[(n - 1) * 8:n * 8])
                                          for n in range(3, 7)]
    c.send(ack(6))
    assert [recv(c) for _ in range(4)] == [data(n, content[(n - 1) * 8:n * 8])
                                          for n in range(7, 11)]
    c.send(ack(10))
    assert rig.done()[1:8] == (4, "ok", "", 10, 76 + 16, 12, 0)


def test_block_numbers_wrap(rig: Rig):
    """65,540 blocks of 8 bytes: block 65536 goes out as 0, and ACK 0 means 65536."""
    nblocks = 65540
    content = os.urandom(8 * (nblocks - 1) + 3)
    c = rig.add(5, content, blksize=8, window=64)
    n = 0
    while n < nblocks:
        last = min(n + 64, nblocks)
        for k in range(n + 1, last + 1):
            assert recv(c) == data(k, content[(k - 1) * 8:k * 8])
        c.send(ack(last))
        n = last
    ev = rig.done()
    assert ev[1:5] == (5, "ok", "", nblocks)


def test_oack_first_then_data_after_ack_0(rig: Rig):
    oack = codec.build_oack({"blksize": "8", "tsize": "20"})
    content = os.urandom(20)
    c = rig.add(6, content, blksize=8, oack=oack)
    assert recv(c) == oack
    c.send(ack(1))  # stray: the OACK is not acknowledged by it
    c.send(ack(0))
    assert recv(c) == data(1, content[:8])
    c.send(error(0, "Early terminate"))
    ev = rig.done()
    assert ev[1:8] == (6, "aborted", "client error 0: Early terminate", 0, 8, 2, 0)


def test_client_error_mid_transfer_ends_it_without_an_answer(rig: Rig):
    content = os.urandom(5000)
    c = rig.add(8, content)
    recv(c)
    c.send(ack(1))
    recv(c)
    c.send(b"\x00\x05\x00\x03disk full \xff\xfe")  # no NUL, not UTF-8
    ev = rig.done()
    assert ev[1:4] == (8, "aborted", "client error 3: disk full \ufffd\ufffd")
    assert ev[6] == 2  # two DATA packets, no ERROR answering the ERROR


def test_strangers_get_error_5_and_the_transfer_is_untouched(rig: Rig):
    content = os.urandom(700)
    c = rig.add(9, content)
    assert recv(c) == data(1, content[:512])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(ack(1), c.getpeername())
        assert s.recv(100) == error(5, "Unknown transfer ID")
        s.sendto(error(0, "x"), c.getpeername())  # an ERROR is never answered
        s.sendto(b"\x00\x09zz", c.getpeername())  # garbage: counted
        s.sendto(ack(1), c.getpeername())
        assert s.recv(100) == error(5, "Unknown transfer ID")
    c.send(b"\x00")  # garbage from the client: counted, ignored
    c.send(ack(1))
    assert recv(c) == data(2, content[512:])
    c.send(ack(2))
    ev = rig.done()
    assert ev[1:3] == (9, "ok") and ev[7] == 2


def test_abort_and_stop_tell_the_client(rig: Rig):
    a = rig.add(10, os.urandom(3000))
    b = rig.add(11, os.urandom(3000))
    recv(a)
    recv(b)
    rig.pump.abort(10, "Server busy: slot given to another client")
    assert recv(a) == error(0, "Server busy: slot given to another client")
    assert rig.done()[1:4] == (10, "aborted", "Server busy: slot given to another client")
    rig.pump.abort(99, "nobody")  # unknown id: nothing happens
    rig.pump.stop()
    assert recv(b) == error(0, "server stopping")
    assert rig.done()[1:4] == (11, "aborted", "server stopping")
    assert rig.events.get(timeout=10) is None  # stopped and drained: serve() -> None


def test_stall_max_caps_a_silent_transfer_whatever_its_retries(rig: Rig):
    content = os.urandom(600)
    c = rig.add(12, content, timeout=0.05, retries=10_000, stall_max=0.3)
    pkts = []
    while (pkt := recv(c))[:2] != ERR:
        pkts.append(pkt)
    assert pkt == error(0, "Timeout") and set(pkts) == {data(1, content[:512])}
    assert rig.done()[1:4] == (12, "error", "no progress for 0.3 s")


def test_one_pump_serves_many_transfers_at_once(rig: Rig):
    contents = [os.urandom(3000 + i) for i in range(20)]
    clients = [rig.add(100 + i, contents[i], blksize=512) for i in range(20)]
    got = [b""] * 20
    for _ in range(6):  # lock-step, all 20 interleaved
        for i, c in enumerate(clients):
            pkt = recv(c)
            n = struct.unpack(">H", pkt[2:4])[0]
            got[i] += pkt[4:]
            c.send(ack(n))
    reports = sorted(rig.done()[1:3] for _ in range(20))
    assert reports == [(100 + i, "ok") for i in range(20)]
    assert got == contents
