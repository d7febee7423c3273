"""The TFTP service: listeners on :69 (per served address), request admission, accounting.

A listener only parses requests; each accepted RRQ becomes a
:class:`~netbootd.tftp.transfer.Transfer` on its own ephemeral port (the TID,
RFC 1350), bound to the local address the request arrived on, so replies come
from the address the client talked to. With a wildcard bind that address comes
from ``IP_PKTINFO``. Refusals (file not found, WRQ, limits) are sent from a fresh
ephemeral port as well, as RFC 1350 asks.

A listener never dies: every parse failure is dropped and counted in
``netbootd_malformed_inputs{service="tftp"}``, every unexpected exception while
admitting a request is logged, counted and answered with ERROR 0.

Where transfers run (``engine``): ``workers`` (the default, ``tftp.workers`` > 0) hands
each admitted transfer, as its socket plus a descriptor of its content, to the least
loaded of a few worker processes (:mod:`netbootd.tftp.pool`, :mod:`netbootd.tftp.worker`)
so blocks move on every CPU; ``thread`` runs them on the engine thread next to the
listeners; ``asyncio`` on the caller's loop. Admission, limits and accounting are the
same code in all three.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import itertools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec, handoff
from .engine import EngineLoop
from .handoff import Report
from .pool import WorkerPool, WorkerProcess, default_size
from .transfer import BLKSIZE_MAX, Negotiated, Transfer, negotiate, open_tid
from .vfs import FileSource, Refused, VirtualTree
from .worker import load_pump

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("netbootd.tftp")

SERVICE = "tftp"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python 3.11 lacks the name
_ANC_SIZE = socket.CMSG_SPACE(12)  # struct in_pktinfo
_SIOCGIFMTU = 0x8921
#: netascii is converted in memory; bigger files must use octet (every boot ROM does).
NETASCII_MAX = 16 * 1024 * 1024


#: How long stop() waits for workers to report their aborted transfers and exit.
WORKER_STOP_WAIT = 0.5


def _to_netascii(data: bytes) -> bytes:
    """RFC 764 NVT: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


@dataclass(slots=True)
class _Open:
    """An admitted transfer, wherever it runs: what its accounting needs at the end."""

    key: tuple[str, int, str]  #: (client ip, port, requested name): the resent-RRQ rule
    peer: tuple[str, int]
    source: FileSource  #: event fields (name, mac, image, version); its bytes may be gone
    started: float
    transfer: Transfer | None = None  #: when it runs in this process
    worker: WorkerProcess | None = None


class TftpService:
    """``name``, ``start()``, ``stop()``, ``health()`` per :class:`netbootd.app.Service`."""

    name = SERVICE

    def __init__(self, app: App, tree: VirtualTree | None = None, *,
                 engine: str | None = None) -> None:
        """``engine``: ``workers`` (worker processes, ``tftp.workers`` of them),
        ``thread`` (transfers on the dedicated epoll thread, see
        :mod:`netbootd.tftp.engine`) or ``asyncio`` (the caller's running loop). Unset:
        ``workers``, or ``thread`` when ``tftp.workers`` is 0."""
        configured = app.settings.tftp.workers
        self.workers = default_size() if configured is None else configured
        if engine is None:
            engine = "workers" if self.workers > 0 else "thread"
        if engine not in ("workers", "thread", "asyncio"):
            raise ValueError(f"unknown TFTP engine {engine!r}")
        if engine == "workers":
            self.workers = max(1, self.workers)
        #: transfers per worker in a C thread of their own (0: the C module is not built)
        self.pump_threads = app.settings.tftp.pump_threads if load_pump() is not None else 0
        if engine == "workers" and app.settings.tftp.pump_threads and not self.pump_threads:
            log.warning("tftp: the C block loop (netbootd/tftp/_pump.c) is not built, so "
                        "transfers run in Python, slower under load; install gcc and "
                        "python3-dev, then reinstall netbootd")
        self.app = app
        self.tree = tree or VirtualTree(app)
        self.engine = engine
        self._loop: asyncio.AbstractEventLoop | EngineLoop | None = None
        self._pool: WorkerPool | None = None
        self._listeners: list[tuple[socket.socket, str]] = []
        #: transfer id -> the open transfer
        self._open: dict[int, _Open] = {}
        self._ids = itertools.count(1)
        self._per_client: dict[str, int] = {}
        #: (client ip, port, file name) of open transfers: a resent RRQ is not a new one.
        self._open_keys: set[tuple[str, int, str]] = set()
        self.bound: list[str] = []
        self._mtu_cache: dict[int, tuple[int, float]] = {}
        m = app.metrics
        self._malformed_counter = m.malformed.labels(SERVICE)
        self._active = m.active_transfers.labels(SERVICE)
        self._bytes = m.bytes_sent.labels(SERVICE)
        self._seconds = m.transfer_seconds.labels(SERVICE)

    # -- Service ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop: asyncio.AbstractEventLoop | EngineLoop
        loop = EngineLoop() if self.engine != "asyncio" else asyncio.get_running_loop()
        self._loop = loop
        for warning in self.tree.startup_warnings():
            log.warning("tftp: %s", warning)
        t = self.app.settings.tftp
        addrs = [a.strip() for a in t.bind.split(",") if a.strip()] or ["0.0.0.0"]
        try:
            for addr in addrs:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    sock.bind((addr, t.port))
                except OSError:
                    sock.close()
                    raise
                self._listeners.append((sock, addr))
                loop.add_reader(sock.fileno(), self._on_request, sock, addr)
                host, port = sock.getsockname()[:2]
                self.bound.append(f"{host}:{port}")
        except OSError:
            await self.stop()
            raise
        if isinstance(loop, EngineLoop):
            if self.engine == "workers":
                self._pool = WorkerPool(loop, self.workers, self._finished,
                                        pump_threads=self.pump_threads)
                self._pool.start()
            loop.run_in_thread()  # readers are registered: no cross-thread race
        log.info("tftp: listening on %s (%s engine%s)", ", ".join(self.bound), self.engine,
                 f", {self.workers} processes, up to {self.pump_threads} transfers each in "
                 "C threads" if self._pool else "")

    async def stop(self) -> None:
        """Abort every transfer (clients get ERROR 0), close the listeners, stop the
        workers (they abort theirs and report), end the thread."""
        loop, pool = self._loop, self._pool
        if isinstance(loop, EngineLoop) and loop.running:
            loop.call_soon_threadsafe(self._shutdown)
            if pool is not None:
                await asyncio.to_thread(pool.all_closed.wait, WORKER_STOP_WAIT)
            await asyncio.to_thread(loop.stop, 1.0)
        else:
            self._shutdown()
            if isinstance(loop, EngineLoop):
                loop.close()  # the thread never started (bind failed)
        if pool is not None:
            await asyncio.to_thread(pool.close)

    def _shutdown(self) -> None:
        for entry in list(self._open.values()):
            if entry.transfer is not None:
                entry.transfer.abort("server stopping")
        if self._pool is not None:
            self._pool.stop()
        loop = self._loop
        for sock, _ in self._listeners:
            if loop is not None:
                try:
                    loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
            sock.close()
        self._listeners.clear()
        self.bound = []

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": bool(self._listeners), "bound": list(self.bound),
                               "active": len(self._open)}
        if self._pool is not None:
            out["workers"] = len(self._pool.live())
            out["pump_threads"] = self.pump_threads
        return out

    @property
    def active(self) -> int:
        return len(self._open)

    @property
    def pool(self) -> WorkerPool | None:
        return self._pool

    # -- listener ---------------------------------------------------------------------------
    def _malformed(self) -> None:
        self._malformed_counter.inc()

    def _on_request(self, sock: socket.socket, bound_addr: str) -> None:
        try:
            data, anc, flags, addr = sock.recvmsg(codec.MAX_REQUEST + 1, _ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("tftp: listener recv failed: %s", exc)
            return
        try:
            self._handle(data, anc, flags, addr, bound_addr)
        except Exception:
            log.exception("tftp: internal error handling a request from %s", addr)
            self.app.metrics.errors.labels(SERVICE).inc()

    def _handle(self, data: bytes, anc: list, flags: int, addr: tuple[str, int],
                bound_addr: str) -> None:
        if flags & socket.MSG_TRUNC or len(data) > codec.MAX_REQUEST:
            self._malformed()
            return
        ifindex, spec_dst = _pktinfo(anc)
        local_ip = bound_addr
        if local_ip == "0.0.0.0":
            local_ip = spec_dst or "0.0.0.0"
        try:
            op = codec.opcode_of(data)
            if op == codec.RRQ:
                req = codec.parse_request(data)
            elif op == codec.WRQ:
                req = codec.parse_request(data)
                self._refuse(local_ip, addr, codec.ERR_ACCESS,
                             "Access violation: this server is read-only")
                self.app.metrics.requests.labels(SERVICE, "refused").inc()
                return
            else:
                raise codec.Malformed(f"opcode {op} on the listener")
        except codec.Malformed as exc:
            log.debug("tftp: dropped malformed datagram from %s: %s", addr, exc)
            self._malformed()
            return
        self._rrq(req, addr, local_ip, ifindex)

    # -- admission --------------------------------------------------------------------------
    def _rrq(self, req: codec.Request, addr: tuple[str, int], local_ip: str,
             ifindex: int = 0) -> None:
        client_ip, client_port = addr[0], addr[1]
        key = (client_ip, client_port, req.filename)
        if key in self._open_keys:
            return  # a resent RRQ: the open transfer's own timer resends its packet
        t = self.app.settings.tftp
        if len(self._open) >= t.max_transfers:
            self._refuse_counted(local_ip, addr, codec.ERR_UNDEFINED,
                                 "Server busy: too many transfers, retry later", "busy")
            return
        if self._per_client.get(client_ip, 0) >= t.max_per_client:
            self._refuse_counted(local_ip, addr, codec.ERR_UNDEFINED,
                                 "Server busy: too many transfers from this client", "busy")
            return
        if req.mode not in ("octet", "netascii"):
            self._refuse_counted(local_ip, addr, codec.ERR_ILLEGAL_OP,
                                 f"Unsupported mode {req.mode!r} (use octet)", "refused")
            return
        try:
            src = self.tree.open(req.filename, client_ip, local_ip)
        except Refused as r:
            log.debug("tftp: %s %r refused: %s", client_ip, req.filename, r.log_reason)
            outcome = "not_found" if r.code == codec.ERR_NOT_FOUND else "refused"
            self._refuse_counted(local_ip, addr, r.code, r.message, outcome)
            if r.code == codec.ERR_ACCESS:
                self.app.events.record("tftp", self.app.clients.mac_for(client_ip),
                                       f"refused {req.filename!r}: {r.log_reason}",
                                       file=req.filename[:100], ip=client_ip, outcome="error")
            return
        if req.mode == "netascii":
            if src.size > NETASCII_MAX:
                src.close()
                self._refuse_counted(local_ip, addr, codec.ERR_UNDEFINED,
                                     "netascii not supported for large files, use octet",
                                     "refused")
                return
            text = _to_netascii(bytes(src.data))
            src.close()
            src = FileSource(text, len(text), src.name, src.mac, src.image, src.version)
        params = negotiate(req.options, size=src.size,
                           blksize_max=min(t.blksize_max, self._mtu_blksize(ifindex)),
                           windowsize_max=t.windowsize_max,
                           default_timeout=t.retransmit_timeout)
        self._start_transfer(src, params, addr, local_ip, key)

    def _start_transfer(self, src: FileSource, params: Negotiated, addr: tuple[str, int],
                        local_ip: str, key: tuple[str, int, str]) -> None:
        assert self._loop is not None
        peer = (addr[0], addr[1])
        try:
            sock, stranger = open_tid(local_ip, peer)
        except OSError as exc:
            src.close()
            log.warning("tftp: cannot open a transfer socket on %s: %s", local_ip, exc)
            self._refuse_counted(local_ip, addr, codec.ERR_UNDEFINED, "Server error", "error")
            return
        job = next(self._ids)
        entry = _Open(key, peer, src, time.monotonic())
        self._open[job] = entry
        self._open_keys.add(key)
        self._per_client[addr[0]] = self._per_client.get(addr[0], 0) + 1
        self._active.inc()
        if self._pool is not None and self._hand_off(job, entry, params, sock, stranger):
            return
        src.drop_fd()
        tr = Transfer(self._loop, sock, peer, src, params,
                      retries=self.app.settings.tftp.retries,
                      on_done=functools.partial(self._local_done, job), stranger=stranger,
                      on_malformed=self._malformed, label=src.name)
        entry.transfer = tr
        tr.start()

    def _hand_off(self, job: int, entry: _Open, params: Negotiated, sock: socket.socket,
                  stranger: socket.socket) -> bool:
        """Give the transfer to the least loaded worker: its two sockets and a descriptor
        of its content (the file itself, or a sealed memfd for bytes built here). False
        when no worker can take it (it then runs on this thread)."""
        assert self._pool is not None
        src = entry.source
        msg = {"op": "start", "id": job, "peer": list(entry.peer), "size": src.size,
               "blksize": params.blksize, "windowsize": params.windowsize,
               "timeout": params.timeout, "oack": params.oack,
               "retries": self.app.settings.tftp.retries}
        memfd = None
        try:
            if src.fd is None:
                memfd = handoff.memfd_with(src.data)
            content = src.fd if memfd is None else memfd
            while (w := self._pool.pick()) is not None:
                if self._pool.hand_off(w, job, msg, (sock.fileno(), stranger.fileno(),
                                                     content)):
                    entry.worker = w
                    sock.close()
                    stranger.close()
                    src.close()  # the worker maps its own copy
                    return True
        except OSError as exc:
            log.warning("tftp: cannot pass %s to a worker: %s", src.name, exc)
        finally:
            if memfd is not None:
                os.close(memfd)
        return False

    def _local_done(self, job: int, tr: Transfer, outcome: str, reason: str) -> None:
        self._finished(Report(job, outcome, reason, tr.bytes_acked, tr.payload_sent,
                              tr.packets_sent))

    def _finished(self, rep: Report) -> None:
        """Accounting for one finished transfer: metrics, event, log. The transfer leaves
        the open set last, so whoever sees ``active`` drop also sees its event."""
        entry = self._open.get(rep.id)
        if entry is None:
            return
        ip, port = entry.peer
        outcome, reason, src = rep.outcome, rep.reason, entry.source
        seconds = rep.seconds if rep.seconds is not None else time.monotonic() - entry.started
        m = self.app.metrics
        m.requests.labels(SERVICE, outcome).inc()
        self._bytes.inc(rep.payload_sent)
        if rep.malformed:
            self._malformed_counter.inc(rep.malformed)
        if outcome == "ok":
            self._seconds.observe(seconds)
        self.app.events.record(
            "tftp", src.mac, "" if outcome == "ok" else reason, file=src.name,
            bytes=rep.bytes_acked, seconds=round(seconds, 3), outcome=outcome,
            image=src.image, version=src.version, ip=ip)
        if outcome == "error":
            log.warning("tftp: %s to %s:%d failed after %.1fs: %s", src.name, ip, port,
                        seconds, reason)
        else:
            log.debug("tftp: %s to %s:%d %s (%d bytes, %.3fs) %s", src.name, ip, port,
                      outcome, rep.bytes_acked, seconds, reason)
        n = self._per_client.get(ip, 1) - 1
        if n > 0:
            self._per_client[ip] = n
        else:
            self._per_client.pop(ip, None)
        self._active.dec()
        del self._open[rep.id]
        self._open_keys.discard(entry.key)

    def _mtu_blksize(self, ifindex: int) -> int:
        """Largest blksize that fits the MTU of the interface the request came in on, so
        a client asking for 1468 behind a smaller MTU (VPN, VLAN) gets no IP fragments
        (dnsmasq's tftp-mtu, done automatically). Cached for a minute per interface."""
        if ifindex <= 0:
            return BLKSIZE_MAX
        now = time.monotonic()
        hit = self._mtu_cache.get(ifindex)
        if hit is None or now - hit[1] > 60:
            hit = (interface_blksize(ifindex) or BLKSIZE_MAX, now)
            self._mtu_cache[ifindex] = hit
        return hit[0]

    # -- refusals ---------------------------------------------------------------------------
    def _refuse_counted(self, local_ip: str, addr: tuple[str, int], code: int, msg: str,
                        outcome: str) -> None:
        self.app.metrics.requests.labels(SERVICE, outcome).inc()
        self._refuse(local_ip, addr, code, msg)

    def _refuse(self, local_ip: str, addr: tuple[str, int], code: int, msg: str) -> None:
        """Send ERROR from a fresh ephemeral port (a new TID, as for a transfer)."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.bind((local_ip, 0))
                s.sendto(codec.build_error(code, msg), addr)
        except OSError as exc:
            log.debug("tftp: cannot send ERROR to %s: %s", addr, exc)


def _pktinfo(anc: list) -> tuple[int, str | None]:
    """Interface index and local address a datagram arrived on, from ``in_pktinfo``
    (``ipi_ifindex``, ``ipi_spec_dst``); ``(0, None)`` when absent."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return struct.unpack_from("=i", data)[0], socket.inet_ntoa(data[4:8])
    return 0, None


def interface_blksize(ifindex: int) -> int | None:
    """MTU of interface ``ifindex`` minus IPv4 (20), UDP (8) and TFTP (4) headers."""
    try:
        name = socket.if_indextoname(ifindex)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), _SIOCGIFMTU, struct.pack("16si", name.encode(), 0))
        mtu = struct.unpack_from("16si", res)[1]
    except (OSError, ValueError):
        return None
    return mtu - 32 if mtu >= 68 else None


def create(app: App) -> TftpService:
    """Factory named in ``netbootd.app.SERVICE_FACTORIES``."""
    return TftpService(app)
