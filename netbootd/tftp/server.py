"""The TFTP service: listeners on :69 (per served address), request admission, accounting.

A listener only parses requests; each accepted RRQ becomes a transfer on its own
ephemeral port (the TID, RFC 1350, :func:`~netbootd.tftp.transfer.open_tid`), bound to
the local address the request arrived on, so replies come
from the address the client talked to. With a wildcard bind that address comes
from ``IP_PKTINFO``. Refusals (file not found, WRQ, limits) are sent from a fresh
ephemeral port as well, as RFC 1350 asks.

A listener never dies: every parse failure is dropped and counted in
``netbootd_malformed_inputs{service="tftp"}``, every unexpected exception while
admitting a request is logged, counted and answered with ERROR 0.

Where transfers run: every transfer runs in the one block loop, C pump threads
(:mod:`netbootd.tftp.pumps`). With ``tftp.workers`` > 0 (the default) each admitted
transfer is handed, as its sockets plus a descriptor of its content, to the least
loaded of a few worker processes (:mod:`netbootd.tftp.pool`, :mod:`netbootd.tftp.worker`)
whose pump threads run it; with 0 (or while no worker is alive) pump threads of this
process run it. Admission, limits and accounting are the same code either way, on the
engine thread (:mod:`netbootd.tftp.engine`).

Admission under pressure (an attack run held all 2,000 slots for 30 minutes with 64
never-ACKing requests per source from 32 spoofable sources): a transfer whose client
never acknowledged a data block is *silent*. When the limits are reached, a silent
transfer is evicted (the client's own oldest for ``max_per_client``; for
``max_transfers`` the oldest of the source holding the most silent ones), so a new
client is refused only when every slot is moving data, and a flood from few sources
evicts itself before anyone else. Requests asking for long timeouts are refused the option
(``tftp.timeout_max``), no transfer may go ``tftp.stall_max`` seconds without
progress, and listeners get a receive buffer sized for bursts (``tftp.listen_rcvbuf``).

The service sees the rest of the daemon only through narrow views
(:mod:`netbootd.interfaces`): ``create(app)`` is the one place that reads the App.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec, handoff
from .engine import EngineLoop
from .handoff import Report
from .pool import WorkerPool, WorkerProcess, default_size
from .pumps import Pumps, load_pump
from .transfer import BLKSIZE_MAX, Negotiated, negotiate, open_tid
from .vfs import FileSource, Refused, VirtualTree

if TYPE_CHECKING:
    from ..app import App
    from ..interfaces import Addresses, Artefacts, Nodes, Plans, Recorder
    from ..metrics import Metrics
    from ..settings import Settings

log = logging.getLogger("netbootd.tftp")

SERVICE = "tftp"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python 3.11 lacks the name
_ANC_SIZE = socket.CMSG_SPACE(12)  # struct in_pktinfo
_SIOCGIFMTU = 0x8921
#: netascii is converted in memory; bigger files must use octet (every boot ROM does).
NETASCII_MAX = 16 * 1024 * 1024


#: How long stop() waits for workers (and this process's pumps) to report their aborted
#: transfers.
WORKER_STOP_WAIT = 0.5
#: Datagrams read from a listener per wake-up: a burst is drained without an epoll
#: round per request, and other listeners and reports still get their turn.
LISTEN_BATCH = 64


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
    worker: WorkerProcess | None = None  #: None: it runs in this process's pumps
    #: the client acknowledged a data block: never evicted for a newcomer
    progressed: bool = False
    #: being ended to make room; no longer counted against the limits
    evicting: bool = False
    #: the MAC whose boot session this transfer holds (``Plans.hold``), if any
    held: str | None = None


class TftpService:
    """``name``, ``start()``, ``stop()``, ``health()`` per :class:`netbootd.app.Service`."""

    name = SERVICE

    def __init__(self, settings: Settings, *, plans: Plans, artefacts: Artefacts,
                 nodes: Nodes, addresses: Addresses, events: Recorder, metrics: Metrics,
                 tree: VirtualTree | None = None) -> None:
        load_pump()  # no block loop, no TFTP: say so now, with the fix
        t = settings.tftp
        #: worker processes (0: transfers run in this process's pump threads)
        self.workers = default_size() if t.workers is None else t.workers
        self.pump_threads = t.pump_threads
        self.settings = settings
        self.plans = plans
        self.addresses = addresses
        self.events = events
        self.metrics = metrics
        self.tree = tree or VirtualTree(settings, plans=plans, artefacts=artefacts,
                                        nodes=nodes, addresses=addresses)
        self._loop: EngineLoop | None = None
        self._pool: WorkerPool | None = None
        self._pumps: Pumps | None = None
        self._listeners: list[tuple[socket.socket, str]] = []
        #: transfer id -> the open transfer, oldest first (eviction scans from the front)
        self._open: dict[int, _Open] = {}
        self._ids = itertools.count(1)
        #: client ip -> open transfers not being evicted
        self._per_client: dict[str, int] = {}
        self._evicting = 0
        #: client ip -> open transfers whose client has not acknowledged data yet
        self._silent: dict[str, int] = {}
        #: (client ip, port, file name) of open transfers: a resent RRQ is not a new one.
        self._open_keys: set[tuple[str, int, str]] = set()
        self.bound: list[str] = []
        self.rcvbuf = 0  #: the listeners' receive buffer as the kernel granted it
        self._mtu_cache: dict[int, tuple[int, float]] = {}
        self._shut = threading.Event()
        self._malformed_counter = metrics.malformed.labels(SERVICE)
        self._active = metrics.active_transfers.labels(SERVICE)
        self._bytes = metrics.bytes_sent.labels(SERVICE)
        self._seconds = metrics.transfer_seconds.labels(SERVICE)

    # -- Service ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = EngineLoop()
        for warning in self.tree.startup_warnings():
            log.warning("tftp: %s", warning)
        t = self.settings.tftp
        addrs = [a.strip() for a in t.bind.split(",") if a.strip()] or ["0.0.0.0"]
        try:
            for addr in addrs:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    self.rcvbuf = _size_rcvbuf(sock, t.listen_rcvbuf)
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
        if self.workers > 0:
            self._pool = WorkerPool(loop, self.workers, self._finished,
                                    pump_threads=self.pump_threads,
                                    on_progress=self._progressed)
            self._pool.start()
        loop.run_in_thread()  # readers are registered: no cross-thread race
        where = (f"{self.workers} worker processes" if self._pool else "this process")
        log.info("tftp: listening on %s (block loop: up to %d C threads in %s; receive "
                 "buffer %d bytes)", ", ".join(self.bound), self.pump_threads, where,
                 self.rcvbuf)

    async def stop(self) -> None:
        """Abort every transfer (clients get ERROR 0), close the listeners, stop the
        workers and pumps (they abort theirs and report), end the thread. Whatever was
        never reported is accounted ``aborted`` (and its boot session released)."""
        loop, pool = self._loop, self._pool
        if loop is not None and loop.running:
            loop.call_soon_threadsafe(self._shutdown)
            await asyncio.to_thread(self._shut.wait, WORKER_STOP_WAIT)
            if pool is not None:
                await asyncio.to_thread(pool.all_closed.wait, WORKER_STOP_WAIT)
            pumps = self._pumps
            if pumps is not None:
                await asyncio.to_thread(pumps.idle.wait, WORKER_STOP_WAIT)
            await asyncio.to_thread(loop.stop, 1.0)
        else:
            self._shutdown()
            if loop is not None:
                loop.close()  # the thread never started (bind failed)
        if pool is not None:
            await asyncio.to_thread(pool.close)
        for job in list(self._open):
            self._finished(Report(job, "aborted", "server stopping"))

    def _shutdown(self) -> None:
        if self._pumps is not None:
            self._pumps.stop()
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
        self._shut.set()

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": bool(self._listeners), "bound": list(self.bound),
                               "active": len(self._open), "pump_threads": self.pump_threads}
        if self._pool is not None:
            out["workers"] = len(self._pool.live())
        return out

    @property
    def active(self) -> int:
        return len(self._open)

    @property
    def pool(self) -> WorkerPool | None:
        return self._pool

    @property
    def pumps(self) -> Pumps | None:
        """This process's pump threads (``tftp.workers: 0``, or no worker alive)."""
        return self._pumps

    # -- listener ---------------------------------------------------------------------------
    def _malformed(self) -> None:
        self._malformed_counter.inc()

    def _on_request(self, sock: socket.socket, bound_addr: str) -> None:
        for _ in range(LISTEN_BATCH):
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
                self.metrics.errors.labels(SERVICE).inc()

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
                self.metrics.requests.labels(SERVICE, "refused").inc()
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
        t = self.settings.tftp
        if (self._per_client.get(client_ip, 0) >= t.max_per_client
                and not self._evict_silent(client_ip)):
            self._refuse_counted(local_ip, addr, codec.ERR_UNDEFINED,
                                 "Server busy: too many transfers from this client", "busy")
            return
        if len(self._open) - self._evicting >= t.max_transfers and not self._evict_silent():
            self._refuse_counted(local_ip, addr, codec.ERR_UNDEFINED,
                                 "Server busy: too many transfers, retry later", "busy")
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
                self.events.record("tftp", self.addresses.mac_for(client_ip),
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
            src = FileSource(text, len(text), src.name, src.mac, src.image, src.version,
                             note=src.note)
        params = negotiate(req.options, size=src.size,
                           blksize_max=min(t.blksize_max, self._mtu_blksize(ifindex)),
                           windowsize_max=t.windowsize_max,
                           default_timeout=t.retransmit_timeout, timeout_max=t.timeout_max)
        self._start_transfer(src, params, addr, local_ip, key)

    def _evict_silent(self, client_ip: str | None = None) -> bool:
        """Make room: end a transfer whose client never acknowledged a data block, the
        oldest one of ``client_ip`` (its own limit), else the oldest one of the source
        holding the most silent transfers. A flood from a few sources therefore evicts
        its own transfers (one eviction each time it re-requests), never the one silent
        transfer a real client has between its RRQ and its first ACK. False when there
        is none: every slot is moving data, and the newcomer is refused."""
        if client_ip is None:
            if not self._silent:
                return False
            client_ip = max(self._silent, key=self._silent.__getitem__)
        elif not self._silent.get(client_ip):
            return False
        for job, entry in self._open.items():
            if entry.progressed or entry.evicting or entry.peer[0] != client_ip:
                continue
            entry.evicting = True
            self._evicting += 1
            self._count_client(entry.peer[0], -1)
            self._count_silent(entry.peer[0], -1)
            reason = "Server busy: no ACK, slot given to another client"
            if entry.worker is not None and self._pool is not None:
                self._pool.abort(entry.worker, job, reason)
            elif self._pumps is not None:
                self._pumps.abort(job, reason)
            return True
        return False

    def _count_silent(self, ip: str, delta: int) -> None:
        n = self._silent.get(ip, 0) + delta
        if n > 0:
            self._silent[ip] = n
        else:
            self._silent.pop(ip, None)

    def _count_client(self, ip: str, delta: int) -> None:
        n = self._per_client.get(ip, 0) + delta
        if n > 0:
            self._per_client[ip] = n
        else:
            self._per_client.pop(ip, None)

    def _start_transfer(self, src: FileSource, params: Negotiated, addr: tuple[str, int],
                        local_ip: str, key: tuple[str, int, str]) -> None:
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
        self._count_client(addr[0], 1)
        self._count_silent(addr[0], 1)
        self._active.inc()
        if src.mac is not None and src.image is not None:
            # a boot session must not expire under a long transfer of its own version
            try:
                self.plans.hold(src.mac)
                entry.held = src.mac
            except Exception:
                log.exception("tftp: cannot hold the boot session of %s", src.mac)
        if self._pool is not None and self._hand_off(job, entry, params, sock, stranger):
            return
        self._run_here(job, entry, params, sock, stranger)

    def _run_here(self, job: int, entry: _Open, params: Negotiated, sock: socket.socket,
                  stranger: socket.socket) -> None:
        """Run the transfer in this process's pump threads (``tftp.workers: 0``, or no
        worker could take it)."""
        assert self._loop is not None
        if self._pumps is None:
            self._pumps = Pumps(self._loop, self.pump_threads, on_report=self._finished,
                                on_progress=self._progressed)
        src = entry.source
        src.drop_fd()
        fds = (sock.detach(), stranger.detach())
        try:
            self._pumps.add(job, *fds, src, params, retries=self.settings.tftp.retries,
                            stall_max=self.settings.tftp.stall_max)
        except (RuntimeError, ValueError, OSError, MemoryError) as exc:
            for fd in fds:
                os.close(fd)
            src.close()
            log.error("tftp: cannot start %s: %s", src.name, exc)
            self._finished(Report(job, "error", f"cannot start: {exc}", seconds=0.0))

    def _hand_off(self, job: int, entry: _Open, params: Negotiated, sock: socket.socket,
                  stranger: socket.socket) -> bool:
        """Give the transfer to the least loaded worker: its two sockets and a descriptor
        of its content (the file itself, or a sealed memfd for bytes built here). False
        when no worker can take it (it then runs in this process)."""
        assert self._pool is not None
        src = entry.source
        t = self.settings.tftp
        msg = {"op": "start", "id": job, "peer": list(entry.peer), "size": src.size,
               "blksize": params.blksize, "windowsize": params.windowsize,
               "timeout": params.timeout, "oack": params.oack, "retries": t.retries,
               "stall_max": t.stall_max}
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

    def _progressed(self, job: int) -> None:
        entry = self._open.get(job)
        if entry is not None and not entry.progressed:
            entry.progressed = True
            if not entry.evicting:
                self._count_silent(entry.peer[0], -1)

    def _finished(self, rep: Report) -> None:
        """Accounting for one finished transfer: metrics, event, log, its boot session
        released. The transfer leaves the open set last, so whoever sees ``active``
        drop also sees its event."""
        entry = self._open.get(rep.id)
        if entry is None:
            return
        ip, port = entry.peer
        outcome, reason, src = rep.outcome, rep.reason, entry.source
        seconds = rep.seconds if rep.seconds is not None else time.monotonic() - entry.started
        m = self.metrics
        evicted = entry.evicting and outcome == "aborted"
        m.requests.labels(SERVICE, "evicted" if evicted else outcome).inc()
        self._bytes.inc(rep.payload_sent)
        if rep.malformed:
            self._malformed_counter.inc(rep.malformed)
        if outcome == "ok":
            self._seconds.observe(seconds)
        self.events.record(
            "tftp", src.mac, src.note if outcome == "ok" else reason, file=src.name,
            bytes=rep.bytes_acked, seconds=round(seconds, 3), outcome=outcome,
            image=src.image, version=src.version, ip=ip)
        if outcome == "error":
            log.warning("tftp: %s to %s:%d failed after %.1fs: %s", src.name, ip, port,
                        seconds, reason)
        else:
            log.debug("tftp: %s to %s:%d %s (%d bytes, %.3fs) %s", src.name, ip, port,
                      outcome, rep.bytes_acked, seconds, reason)
        if entry.held is not None:
            try:
                self.plans.release(entry.held)
            except Exception:
                log.exception("tftp: cannot release the boot session of %s", entry.held)
        if entry.evicting:
            self._evicting -= 1
        else:
            self._count_client(ip, -1)
            if not entry.progressed:
                self._count_silent(ip, -1)
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
        self.metrics.requests.labels(SERVICE, outcome).inc()
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


def _size_rcvbuf(sock: socket.socket, want: int) -> int:
    """Give a listener ``want`` bytes of receive buffer (the kernel doubles the value it
    is given for its bookkeeping, and reports that). As root SO_RCVBUFFORCE passes
    ``net.core.rmem_max``; otherwise SO_RCVBUF is capped by it. Why: at the default
    (~208 KiB) a burst of 2,560 requests lost 1,931 in the kernel before the listener
    could read them."""
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, want)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        except OSError as exc:
            log.warning("tftp: cannot size the listener's receive buffer: %s", exc)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < want:
        log.warning("tftp: listener receive buffer is %d bytes, %d asked for "
                    "(tftp.listen_rcvbuf): raise net.core.rmem_max or run as root",
                    got, want)
    return got


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
    """Factory named in ``netbootd.app.SERVICE_FACTORIES``: the one place that reads the
    App, and builds the service from the narrow views it needs."""
    from ..views import InventoryNodes, StoreArtefacts

    return TftpService(
        app.settings, plans=app.planner,
        artefacts=StoreArtefacts(lambda: app.store, lambda: app.render),
        nodes=InventoryNodes(lambda: app.inventory, app.clients, lambda: app.settings),
        addresses=app.clients, events=app.events, metrics=app.metrics)
