"""The proxy-DHCP service: UDP listeners on :67 and :4011 beside the site's DHCP server.

I/O design (bench/dhcp_bench.py measurements): the stock asyncio datagram transport calls
``recvfrom(256 KiB)`` per datagram, which capped a struct-codec responder at ~33k
packets/s; ``loop.add_reader`` plus a non-blocking receive loop that drains the socket
on each wake-up exceeded 117k/s. So each socket gets a reader callback that drains
up to ``DRAIN_BATCH`` datagrams per wake-up with ``recvmsg`` (small buffer) and
answers each one synchronously — there is nothing to await on the hot path.

One socket per port serves every interface: ``IP_PKTINFO`` tells us the arrival
interface (and the local address the kernel delivered to), and the same ancillary
data on ``sendmsg`` sends the reply — broadcast included — out of that interface
from that address. This is how dnsmasq does it, and it needs no socket per
interface when interfaces come and go.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from . import acks
from .netif import Interfaces
from .newboots import NewBootQueue, Packet
from .reply import preload
from .responder import Responder, available_boot_files

if TYPE_CHECKING:
    from ..app import App
    from ..interfaces import Addresses, Nodes, Plans, Recorder, Subscribe
    from ..metrics import Metrics
    from ..settings import Settings

log = logging.getLogger("netbootd.dhcp")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
#: Larger than any DHCP packet we accept (packet.MAX_PACKET), so truncation is visible.
RECV_SIZE = 2048
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
#: Datagrams handled per wake-up before yielding to the loop (fairness vs. throughput).
DRAIN_BATCH = 64
_MSG_TRUNC = int(socket.MSG_TRUNC)  # the IntFlag member: its & costs 0.4 µs
_DHCP = ("dhcp",)  #: the bytes_sent label
#: At most one "send failed" warning per this many seconds (a down link fails every send).
SEND_WARNING_INTERVAL = 10.0


class DhcpService:
    """Proxy-DHCP: answers boot questions only, never hands out an address.

    Built by :func:`create` from narrow parts (``interfaces.py``): it can plan a boot,
    ask who a MAC is, record what it saw and record address evidence, nothing more.
    ``on_reload`` registers a config-reload hook and returns its unregistration.
    """

    name = "dhcp"

    def __init__(self, settings: Settings, *, plans: Plans, nodes: Nodes,
                 addresses: Addresses, recorder: Recorder, metrics: Metrics,
                 on_reload: Subscribe) -> None:
        self.all_settings = settings
        self.settings = settings.dhcp
        self.plans = plans
        self.nodes = nodes
        self.addresses = addresses
        self.recorder = recorder
        self.metrics = metrics
        self._subscribe_reload = on_reload
        self._unsubscribe_reload = None
        self.interfaces = Interfaces()
        self.responder: Responder | None = None
        self._sockets: list[tuple[socket.socket, bool]] = []
        self._ack_sock: socket.socket | None = None
        self._site_servers = frozenset(str(a) for a in settings.dhcp.site_servers)
        self.acks_seen = 0
        self.addresses_learnt = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bound: list[str] = []
        self.started: float | None = None
        self.send_errors = 0
        self._last_send_warning = -SEND_WARNING_INTERVAL
        self._anc: dict[tuple[int, str | None], list] = {}
        self._pktinfo_seen: dict[bytes, tuple[int, str | None]] = {}
        self._sent = metrics.tally(metrics.bytes_sent)
        self.warnings: list[str] = []
        #: New boots agreed with the other replicas off the loop (replicas only).
        self.new_boots: NewBootQueue | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Import scapy (0.15-0.5 s) once the daemon answers, in the daemon's warm-up
        thread: neither start-up nor the first client's reply on the loop waits for all
        of it (a reply built meanwhile waits only for the rest of the import)."""
        preload()

    async def start(self) -> None:
        s = self.all_settings
        available = available_boot_files(s)
        missing = sorted({s.dhcp.bios_bootfile, s.dhcp.uefi_x64_bootfile} - available)
        if s.dhcp.uefi_arm64_bootfile not in available and \
                s.dhcp.uefi_arm64_grub_bootfile in available:
            log.info("arm64 UEFI PXE clients get GRUB (%s): no arm64 iPXE (%s) found",
                     s.dhcp.uefi_arm64_grub_bootfile, s.dhcp.uefi_arm64_bootfile)
        elif s.dhcp.uefi_arm64_bootfile not in available:
            # Debian's ipxe package has no arm64 build, so this is the normal case there:
            # say it once, quietly, with the fix; it is not a fault of this installation.
            log.info("arm64 UEFI PXE clients get no reply: %s not found; put an arm64 iPXE "
                     "build there (or set dhcp.uefi_arm64_bootfile), or build GRUB's %s "
                     "(images/build_grub.py), to boot them",
                     s.dhcp.uefi_arm64_bootfile, s.dhcp.uefi_arm64_grub_bootfile)
        if missing:
            where = ", ".join(str(p) for p in [s.tftp.ipxe_dir, *s.tftp.extra_ipxe_dirs])
            msg = (f"iPXE binaries missing: {', '.join(missing)} (looked in {where}); "
                   "clients needing them get no reply. Install Debian's 'ipxe' package "
                   "or set tftp.ipxe_dir")
            log.warning(msg)
            self.warnings.append(msg)
        await self.interfaces.start()
        self.responder = Responder(s, self.interfaces, plans=self.plans, nodes=self.nodes,
                                   recorder=self.recorder, metrics=self.metrics,
                                   available=available)
        self._loop = asyncio.get_running_loop()
        if s.cluster.backend == "etcd":
            self.new_boots = NewBootQueue(self._loop, self.plans.finish, self._answer_agreed)
            self.responder.defer = self.new_boots.take
        try:
            for port, pxe in ((s.dhcp.port, False), (s.dhcp.pxe_port, True)):
                sock = self._open(s.dhcp.bind, port)
                self._sockets.append((sock, pxe))
                self._loop.add_reader(sock.fileno(), self._drain, sock, pxe)
                self.bound.append(f"{s.dhcp.bind or '0.0.0.0'}:{port}")
        except OSError:
            await self.stop()
            raise
        if s.dhcp.learn_from_acks:
            self._open_acks()
        self._unsubscribe_reload = self._subscribe_reload(self._on_reload)
        self.started = time.time()
        log.info("proxy-DHCP listening on %s (interfaces: %s)", ", ".join(self.bound),
                 ", ".join(s.network.interfaces) or "all")

    async def stop(self) -> None:
        for sock, _ in self._sockets:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
            sock.close()
        self._sockets.clear()
        if self._ack_sock is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self._ack_sock.fileno())
                except (ValueError, OSError):
                    pass
            self._ack_sock.close()
            self._ack_sock = None
        self.bound = []
        if self.new_boots is not None:
            self.new_boots.close()
            self.new_boots = None
        if self._unsubscribe_reload is not None:
            self._unsubscribe_reload()
            self._unsubscribe_reload = None
        await self.interfaces.stop()

    def health(self) -> dict[str, Any]:
        r = self.responder
        return {
            "ok": bool(self._sockets),
            "bound": list(self.bound),
            "interfaces": self.interfaces.snapshot(),
            "netlink_live": self.interfaces.live,
            "replies": r.replies if r else 0,
            "dropped": r.dropped if r else 0,
            "replies_built": r.built if r else 0,
            "send_errors": self.send_errors,
            "learning_from_acks": self._ack_sock is not None,
            "acks_seen": self.acks_seen,
            "addresses_learnt": self.addresses_learnt,
            "tables": r.sizes() if r else {},
            "new_boots": self.new_boots.sizes() if self.new_boots else None,
            "warnings": list(self.warnings),
        }

    def _on_reload(self) -> None:
        if self.responder is not None:
            self.responder.clear()

    # -- address evidence (acks.py) ----------------------------------------------------------
    def _open_acks(self) -> None:
        try:
            self._ack_sock = acks.open_ack_socket()
        except OSError as exc:
            msg = (f"not learning client addresses from DHCP ACKs ({exc.strerror or exc}; "
                   "needs CAP_NET_RAW): only static nodes.yaml addresses count as evidence")
            log.warning(msg)
            self.warnings.append(msg)
            return
        assert self._loop is not None
        self._loop.add_reader(self._ack_sock.fileno(), self._drain_acks)

    def _interface_ok(self, ifname: str) -> bool:
        served = self.all_settings.network.interfaces
        return not served or ifname in served

    def _drain_acks(self) -> None:
        sock = self._ack_sock
        if sock is None:
            return
        for ack, ifname in acks.read_acks(sock, self._site_servers, self._interface_ok):
            self.acks_seen += 1
            if self.addresses.learn(ack.ip, ack.mac, lease=ack.lease):
                self.addresses_learnt += 1
                self.recorder.record(
                    "address", ack.mac if self.nodes.known(ack.mac) else None,
                    f"address {ack.ip} from site DHCP server {ack.server}", ip=ack.ip,
                    server=ack.server, interface=ifname, outcome="ok",
                    client_mac=None if self.nodes.known(ack.mac) else ack.mac)

    # -- sockets ----------------------------------------------------------------------------
    @staticmethod
    def _open(bind: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setblocking(False)
            sock.bind((bind, port))
        except OSError:
            sock.close()
            raise
        return sock

    def _drain(self, sock: socket.socket, pxe: bool) -> None:
        """Reader callback: answer every queued datagram (bounded), then yield.

        This is the per-packet path, written for CPython's costs: names bound to locals,
        the one ancillary item (IP_PKTINFO is the only one enabled) taken by index, the
        send inlined, bytes counted in a :class:`~netbootd.metrics.Tally`. Each of these
        measured 0.1-0.4 µs a packet, against dnsmasq's ~8 µs for the whole exchange."""
        responder = self.responder
        if responder is None:
            return
        recvmsg, sendmsg, handle = sock.recvmsg, sock.sendmsg, responder.handle
        pktinfo_seen, anc_for, sent = self._pktinfo_seen, self._anc, self._sent.counts
        for _ in range(DRAIN_BATCH):
            try:
                data, anc, flags, peer = recvmsg(RECV_SIZE, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                log.debug("recvmsg: %s", exc)
                return
            if flags & _MSG_TRUNC:
                responder.malformed("datagram larger than the receive buffer", data[:300])
                continue
            ifindex, local_ip = 0, None
            if anc:
                cdata = anc[0][2]
                hit = pktinfo_seen.get(cdata)
                ifindex, local_ip = hit if hit is not None else self._pktinfo(anc)
            out = handle(data, ifindex, local_ip, peer, pxe)
            if out is None:
                continue
            payload, dest, out_if, source = out
            out_anc = anc_for.get((out_if, source))
            if out_anc is None:
                out_anc = self._ancillary(out_if, source)
            try:
                sendmsg((payload,), out_anc, 0, dest)
                sent[_DHCP] += len(payload)
            except OSError as exc:
                self._send_failed(dest, exc)

    def _pktinfo(self, anc: list) -> tuple[int, str | None]:
        """(arrival ifindex, local address) from IP_PKTINFO; the few distinct values
        (one per interface and destination kind) are decoded once and remembered."""
        for level, kind, cdata in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO \
                    and len(cdata) >= _PKTINFO.size:
                ifindex, spec_dst, _ = _PKTINFO.unpack_from(cdata)
                hit = (ifindex, socket.inet_ntoa(spec_dst))
                if len(self._pktinfo_seen) > 1024:
                    self._pktinfo_seen.clear()
                self._pktinfo_seen[bytes(cdata)] = hit
                return hit
        return 0, None

    def _ancillary(self, ifindex: int, source: str | None) -> list:
        """IP_PKTINFO for sending out of ``ifindex`` from ``source``, so a broadcast
        leaves by the interface the request came in on; built once per pair."""
        src = socket.inet_aton(source) if source else b"\0\0\0\0"
        anc = [(socket.IPPROTO_IP, IP_PKTINFO,
                _PKTINFO.pack(ifindex, src, b"\0\0\0\0"))] if ifindex else []
        if len(self._anc) > 1024:
            self._anc.clear()
        self._anc[(ifindex, source)] = anc
        return anc

    def _answer_agreed(self, packet: Packet) -> None:
        """Answer a packet whose new boot the replicas agreed on meanwhile (newboots.py);
        on the loop. Not the hot path: the per-packet send stays inlined in _drain."""
        responder = self.responder
        sock = next((s for s, pxe in self._sockets if pxe == packet[4]), None)
        if responder is None or sock is None:
            return  # stopped meanwhile
        out = responder.handle(*packet, again=True)
        if out is None:
            return
        payload, dest, out_if, source = out
        try:
            sock.sendmsg((payload,), self._ancillary(out_if, source), 0, dest)
            self._sent.counts[_DHCP] += len(payload)
        except OSError as exc:
            self._send_failed(dest, exc)

    def _send_failed(self, dest: tuple[str, int], exc: OSError) -> None:
        self.send_errors += 1
        self.metrics.errors.labels("dhcp").inc()
        now = time.monotonic()
        if now - self._last_send_warning > SEND_WARNING_INTERVAL:  # no log flood
            self._last_send_warning = now
            log.warning("sending DHCP reply to %s:%d failed: %s (%d send errors so far)",
                        *dest, exc, self.send_errors)


def create(app: App) -> DhcpService:
    """Service factory (``netbootd.app.SERVICE_FACTORIES['dhcp']``): the one place that
    reads the App, and hands the service only the narrow views it needs."""
    from ..views import InventoryNodes, hooks

    nodes = InventoryNodes(lambda: app.inventory, app.clients, lambda: app.settings)
    return DhcpService(app.settings, plans=app.planner, nodes=nodes, addresses=app.clients,
                       recorder=app.events, metrics=app.metrics,
                       on_reload=hooks(app.on_reload))

