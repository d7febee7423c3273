"""One TFTP read transfer: its own UDP socket (the server TID), windowing, retransmission.

Why a raw non-blocking socket with ``loop.add_reader`` and not a
``DatagramProtocol``: asyncio's datagram transport calls ``recvfrom`` with a
256 KiB buffer for every datagram, which measured about 4x the cost per packet
of a small buffer here, and a Pi does one round trip per 1468-byte block, so
per-packet latency is its boot time. A transfer only ever receives ACKs and
ERRORs, so a 1 KiB ``recv_into`` buffer is plenty (a longer ERROR message is
truncated, which is harmless).

Protocol rules implemented here:

* RFC 1350 lock-step, RFC 7440 windows: after an ACK of block *k* the next window
  starts at *k+1*; a duplicate ACK (of a block already acknowledged) is ignored,
  so it can never trigger a second burst (the sorcerer's apprentice bug).
  Lost packets are recovered by the per-transfer timer only.
* Block numbers wrap from 65535 to 0; ACKs are mapped back to absolute block
  numbers relative to the current window, so files of any size work.
* A packet from another address/port (a foreign TID) gets ERROR 5 and changes
  nothing. An ERROR from the client (e.g. the Pi's "Early terminate" right after
  the OACK) ends the transfer with outcome ``aborted``.
* Two sockets share the transfer's port (:func:`open_tid`): one *connected* to the
  client, which carries the whole transfer with ``send``/``recv_into`` (no address
  to parse or build per packet, ~0.45 us of a ~5 us block), and one unconnected,
  which the kernel hands everything else sent to that port, so a stranger still gets
  its ERROR 5 from the right port.
* The timer does not get re-armed per packet (that would allocate a timer handle
  per block): progress stamps a time, and one timer per transfer checks it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import codec

if TYPE_CHECKING:  # not imported at run time: a worker process starts faster without it
    import asyncio

log = logging.getLogger("netbootd.tftp")

_pack = codec._HDR.pack
_DATA, _ACK, _ERROR = codec.DATA, codec.ACK, codec.ERROR
_IGNORED = frozenset({codec.RRQ, codec.WRQ, codec.DATA, codec.OACK})
#: Progress is stamped with the monotonic clock directly (cheaper than loop.time()
#: per block, and correct on any event loop: timers are armed with relative delays).
_now = time.monotonic

#: RFC 2348 bounds.
BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464
#: RFC 7440 bounds.
WINDOW_MIN, WINDOW_MAX = 1, 65535
#: RFC 2349 bounds (seconds).
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255


class Source(Protocol):
    """What a transfer reads: something sliceable with a length (bytes or an mmap)."""

    data: bytes | memoryview | object
    size: int

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Transfer parameters after option negotiation, and the OACK to send (if any)."""

    blksize: int = 512
    windowsize: int = 1
    timeout: float = 1.0
    oack: dict[str, str] | None = None


def _int(value: str) -> int | None:
    try:
        v = value.strip()
        return int(v) if v.isdigit() else None
    except (AttributeError, ValueError):
        return None


def negotiate(options: dict[str, str], *, size: int, blksize_max: int, windowsize_max: int,
              default_timeout: float) -> Negotiated:
    """Accept what we support, within bounds; unknown or invalid options are left out of
    the OACK (RFC 2347 lets a server ignore an option), never an error.

    Only options the client asked for appear in the OACK; a client that asks for
    none gets plain DATA, as RFC 1350 clients expect.
    """
    oack: dict[str, str] = {}
    blksize, windowsize, timeout = 512, 1, default_timeout
    if "blksize" in options:
        v = _int(options["blksize"])
        if v is not None and v >= BLKSIZE_MIN:
            blksize = min(v, BLKSIZE_MAX, blksize_max)
            oack["blksize"] = str(blksize)
    if "tsize" in options and _int(options["tsize"]) is not None:
        oack["tsize"] = str(size)
    if "timeout" in options:
        v = _int(options["timeout"])
        if v is not None and TIMEOUT_MIN <= v <= TIMEOUT_MAX:
            timeout = float(v)
            oack["timeout"] = str(v)
    if "windowsize" in options:
        v = _int(options["windowsize"])
        if v is not None and v >= WINDOW_MIN:
            windowsize = min(v, WINDOW_MAX, windowsize_max)
            oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack or None)


def open_tid(local_ip: str, peer: tuple[str, int]) -> tuple[socket.socket, socket.socket]:
    """The server's TID for one transfer: (socket connected to ``peer``, socket for
    strangers), both on one fresh ephemeral port of ``local_ip``, non-blocking.

    Order matters. The first socket gets its port *without* SO_REUSEADDR (so the
    kernel picks a port no other socket uses), then is connected (from then on only
    ``peer`` reaches it; anything that slipped in before is discarded), then the
    stranger socket joins the port with SO_REUSEADDR. The kernel delivers a datagram
    to the connected socket when the source matches (it scores higher), else to the
    unconnected one.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger: socket.socket | None = None
    try:
        sock.setblocking(False)
        sock.bind((local_ip, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.connect(peer)
        _drain(sock)
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.setblocking(False)
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(sock.getsockname())
    except OSError:
        sock.close()
        if stranger is not None:
            stranger.close()
        raise
    return sock, stranger


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(1)
        except OSError:  # BlockingIOError: empty; anything else: nothing to keep either
            return


class Transfer:
    """Sends one file to one client (ip, port) from its own port (see :func:`open_tid`).

    ``on_done(transfer, outcome, reason)`` is called exactly once, with outcome
    ``ok``, ``aborted`` (the client sent ERROR or the server stopped) or ``error``
    (retries exhausted, socket error). The caller owns accounting and events.
    """

    __slots__ = (
        "_acked",
        "_await_oack",
        "_buf",
        "_closed",
        "_data",
        "_fileno",
        "_last_progress",
        "_loop",
        "_nblocks",
        "_oack_pkt",
        "_on_done",
        "_on_malformed",
        "_recv_into",
        "_retries",
        "_retries_max",
        "_send_raw",
        "_sent_to",
        "_size",
        "_sock",
        "_stranger",
        "_timer",
        "blksize",
        "label",
        "outcome",
        "packets_sent",
        "payload_sent",
        "peer",
        "reason",
        "source",
        "started",
        "timeout",
        "window",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 peer: tuple[str, int], source: Source, params: Negotiated, *, retries: int,
                 on_done: Callable[[Transfer, str, str], None],
                 stranger: socket.socket | None = None,
                 on_malformed: Callable[[], None] | None = None, label: str = "") -> None:
        """``sock`` is connected to ``peer`` and ``stranger`` shares its port
        (:func:`open_tid`); the transfer owns and closes both."""
        self._loop = loop
        self._sock = sock
        self._stranger = stranger
        self._fileno = sock.fileno()
        self._recv_into = sock.recv_into
        self._send_raw = sock.send
        self.peer = peer
        self.source = source
        self._data = source.data
        self._size = source.size
        self.blksize = params.blksize
        self.window = params.windowsize
        self.timeout = params.timeout
        self._retries_max = retries
        self._retries = 0
        self._on_done = on_done
        self._on_malformed = on_malformed
        self._buf = bytearray(1024)
        # Absolute block numbers: block n carries bytes [(n-1)*blksize, n*blksize).
        # The last block is shorter than blksize (possibly empty), which ends the transfer.
        self._nblocks = self._size // self.blksize + 1
        self._acked = 0
        self._sent_to = 0
        self._oack_pkt = codec.build_oack(params.oack) if params.oack else None
        self._await_oack = self._oack_pkt is not None
        self._last_progress = _now()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.started = time.monotonic()
        self.payload_sent = 0
        self.packets_sent = 0
        self.outcome = ""
        self.reason = ""
        self.label = label

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop.add_reader(self._fileno, self._on_readable)
        if self._stranger is not None:
            self._loop.add_reader(self._stranger.fileno(), self._on_stranger)
        if self._await_oack:
            self._send(self._oack_pkt)  # type: ignore[arg-type]
        else:
            self._send_window()
        self._timer = self._loop.call_later(self.timeout, self._on_timer)

    def abort(self, reason: str = "server stopping") -> None:
        """End now (server shutdown); the client is told with an ERROR."""
        if not self._closed:
            self._send(codec.build_error(codec.ERR_UNDEFINED, reason))
            self._finish("aborted", reason)

    @property
    def bytes_acked(self) -> int:
        return min(self._acked * self.blksize, self._size)

    @property
    def closed(self) -> bool:
        return self._closed

    def _finish(self, outcome: str, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.outcome, self.reason = outcome, reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in (self._sock, self._stranger):
            if sock is None:
                continue
            try:
                self._loop.remove_reader(sock.fileno())
            except (ValueError, OSError):  # loop already closed
                pass
            sock.close()
        try:
            self.source.close()
        finally:
            self._on_done(self, outcome, reason)

    # -- sending --------------------------------------------------------------------------
    def _send(self, pkt: bytes) -> None:
        try:
            self._send_raw(pkt)
            self.packets_sent += 1
        except (BlockingIOError, InterruptedError):
            pass  # socket buffer full: the retransmit timer resends
        except OSError as exc:  # e.g. ECONNREFUSED: the client's port is gone
            log.debug("tftp send to %s failed: %s", self.peer, exc)

    def _send_window(self) -> None:
        """Send blocks acked+1 .. acked+window (the whole window, RFC 7440)."""
        n = first = self._acked + 1
        last = min(self._acked + self.window, self._nblocks)
        bs, data, send, pack = self.blksize, self._data, self._send_raw, _pack
        try:
            while n <= last:
                off = (n - 1) * bs
                payload = data[off:off + bs]  # type: ignore[index]
                send(pack(_DATA, n & 0xFFFF) + payload)
                self.payload_sent += len(payload)
                n += 1
        except (BlockingIOError, InterruptedError):
            pass  # socket buffer full: the rest goes on the next ACK or timer
        except OSError as exc:
            log.debug("tftp send to %s failed: %s", self.peer, exc)
        self.packets_sent += n - first
        self._sent_to = max(self._sent_to, n - 1)

    # -- receiving ------------------------------------------------------------------------
    def _on_readable(self) -> None:
        """One datagram per wake-up: in lock-step there is only ever one, and draining
        until EAGAIN would cost a second (failing) syscall per block. The socket is
        connected, so everything read here comes from the client."""
        try:
            n = self._recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ECONNREFUSED (ICMP from the client's host), ...
            log.debug("tftp recv from %s failed: %s", self.peer, exc)
            return
        buf = self._buf
        if n >= 4 and buf[0] == 0:
            op = buf[1]
            if op == _ACK:
                if self._await_oack:
                    self._on_oack_ack((buf[2] << 8) | buf[3])
                    return
                # The per-block path, inlined: map the 16-bit number into
                # [acked, sent_to]; anything else is stale (or a duplicate: never resend
                # on it, that is the sorcerer's apprentice bug).
                acked = self._acked
                delta = (((buf[2] << 8) | buf[3]) - acked) & 0xFFFF
                if delta == 0 or acked + delta > self._sent_to:
                    return
                self._acked = acked = acked + delta
                if acked >= self._nblocks:
                    self._finish("ok", "")
                    return
                if self.window == 1:  # lock-step: the next block, without the window loop
                    bs = self.blksize
                    payload = self._data[acked * bs:acked * bs + bs]  # type: ignore[index]
                    try:
                        self._send_raw(_pack(_DATA, (acked + 1) & 0xFFFF) + payload)
                    except OSError:
                        pass  # buffer full or ICMP error: the timer resends
                    else:
                        self.payload_sent += len(payload)
                        self.packets_sent += 1
                    self._sent_to = acked + 1
                else:
                    self._send_window()
                self._retries = 0
                self._last_progress = _now()
                return
            if op == _ERROR:
                err = codec.parse_error(memoryview(buf)[:n])
                self._finish("aborted", f"client error {err.code}: {err.message}")
                return
            if op in _IGNORED:
                return  # well-formed but meaningless here (a duplicate RRQ, say): ignore
        self._malformed()

    def _on_stranger(self) -> None:
        """A datagram to our port from anyone but the client (the kernel sorted it)."""
        assert self._stranger is not None
        try:
            n, addr = self._stranger.recvfrom_into(self._buf)
        except OSError:
            return
        self._foreign(n, addr)

    def _malformed(self) -> None:
        """Dropped; the server counts it (``app.metrics.malformed``) via ``on_malformed``."""
        if self._on_malformed is not None:
            self._on_malformed()

    def _foreign(self, n: int, addr: tuple[str, int]) -> None:
        """RFC 1350: a packet from an unknown TID gets ERROR 5; our transfer is untouched.
        Never answer an ERROR with an ERROR (two servers could ping-pong forever)."""
        buf = self._buf
        if n < 4 or buf[0] != 0 or not 1 <= buf[1] <= 6:
            self._malformed()
            return
        if buf[1] == codec.ERROR or self._stranger is None:
            return
        try:
            self._stranger.sendto(
                codec.build_error(codec.ERR_UNKNOWN_TID, "Unknown transfer ID"), addr)
        except OSError:
            pass

    def _on_oack_ack(self, wire: int) -> None:
        if wire != 0:
            return  # stray ACK before the OACK was acknowledged
        self._await_oack = False
        self._progress()
        self._send_window()

    def _progress(self) -> None:
        self._retries = 0
        self._last_progress = _now()

    # -- timer ----------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = _now()
        due = self._last_progress + self.timeout
        if now < due:  # progress since this timer was armed: sleep until the new deadline
            self._timer = self._loop.call_later(due - now, self._on_timer)
            return
        self._retries += 1
        if self._retries > self._retries_max:
            self._send(codec.build_error(codec.ERR_UNDEFINED, "Timeout"))
            self._finish("error", f"timeout after {self._retries_max} retries")
            return
        self._last_progress = now
        if self._await_oack:
            self._send(self._oack_pkt)  # type: ignore[arg-type]
        else:
            self._send_window()
        self._timer = self._loop.call_later(self.timeout, self._on_timer)
