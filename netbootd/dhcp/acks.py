"""Evidence of a client's address: the site DHCP server's ACKs, seen on the wire.

A proxy never hands out addresses, so the only first-hand evidence it can have that
MAC M holds address A is the site server saying so: a DHCPACK with chaddr M and
yiaddr A. What a proxy can observe of those (docs/security.md spells it out):

* ACKs sent to the broadcast address (the client set the broadcast flag, or the
  server broadcasts anyway) reach every port of the segment, so us too;
* ACKs unicast to the client reach us only if the switch floods them or we sit on a
  mirror port (frames this host *sends*, e.g. from a site server running here, are
  not seen: the socket is registered for received IPv4 frames only);
* behind a relay, the server answers the relay, never us: no evidence at all (use a
  static ``ip`` in nodes.yaml for such nodes).

The listening socket is an ``AF_PACKET`` socket with a classic BPF filter (only IPv4
UDP from port 67 to port 68 is copied to us). Not a UDP socket on port 68: that would
*take* unicast ACKs away from a DHCP client running on this host. Opening it needs
CAP_NET_RAW; without it nothing is learnt from ACKs (static addresses still work).

What is checked before an ACK counts: a BOOTREPLY of type ACK with a usable yiaddr, an
Ethernet chaddr, a server identifier (54) equal to the IP source (or a relay's giaddr
as the source), and, when ``dhcp.site_servers`` is set, a server in that list. An
attacker on the segment can forge all of that (that is the point of the neighbour
check at use time, ``neighbours.ClientAddresses.owner_of``).
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
from typing import NamedTuple

from . import packet as pk

log = logging.getLogger("netbootd.dhcp")

ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
#: Frames read per wake-up before yielding to the loop.
DRAIN_BATCH = 64
_ETH = 14
_OPT_LEASE = 51
_OPT_SERVER_ID = 54


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


#: Classic BPF: accept IPv4, UDP, not a fragment, source port 67, destination port 68.
_FILTER = b"".join((
    _bpf(0x28, 0, 0, 12),        # ldh [12]            ethertype
    _bpf(0x15, 0, 9, ETH_P_IP),  # jeq IPv4 ? next : drop
    _bpf(0x30, 0, 0, 23),        # ldb [23]            IP protocol
    _bpf(0x15, 0, 7, 17),        # jeq UDP ? next : drop
    _bpf(0x28, 0, 0, 20),        # ldh [20]            flags + fragment offset
    _bpf(0x45, 5, 0, 0x1FFF),    # jset offset ? drop : next
    _bpf(0xB1, 0, 0, 14),        # ldxb 4*([14]&0xf)   X = IP header length
    _bpf(0x48, 0, 0, 14),        # ldh [x+14]          UDP source port
    _bpf(0x15, 0, 2, 67),        # jeq 67 ? next : drop
    _bpf(0x48, 0, 0, 16),        # ldh [x+16]          UDP destination port
    _bpf(0x15, 1, 0, 68),        # jeq 68 ? accept : drop
    _bpf(0x06, 0, 0, 0),         # drop:   ret 0
    _bpf(0x06, 0, 0, 4096),      # accept: ret 4096 bytes
))
_FILTER_LEN = len(_FILTER) // 8


class ServerAck(NamedTuple):
    """An ACK from a DHCP server: ``server`` gave ``ip`` to ``mac`` for ``lease`` s."""

    ip: str
    mac: str
    server: str
    lease: float | None


def parse_server_ack(frame: bytes, servers: frozenset[str] = frozenset()) -> ServerAck | None:
    """The evidence in one Ethernet frame, or None when it is not an acceptable ACK.

    Never raises on garbage: the frame comes off the wire."""
    try:
        if len(frame) < _ETH + 20 + 8 or frame[12:14] != b"\x08\x00":
            return None
        ihl = (frame[_ETH] & 0x0F) * 4
        if frame[_ETH] >> 4 != 4 or ihl < 20 or frame[_ETH + 9] != 17:
            return None
        src = socket.inet_ntoa(frame[_ETH + 12:_ETH + 16])
        udp = _ETH + ihl
        sport, dport, ulen = struct.unpack_from("!HHH", frame, udp)
        if sport != 67 or dport != 68 or ulen < 8:
            return None
        data = frame[udp + 8:udp + ulen]
        if len(data) <= pk.OPTIONS_OFFSET or data[0] != pk.BOOTREPLY \
                or data[1] != pk.HTYPE_ETHER or data[2] != 6 or data[236:240] != pk.MAGIC:
            return None
        options = pk.parse_options(data)
        if options.get(pk.OPT_MESSAGE_TYPE) != bytes((pk.ACK,)):
            return None
        yiaddr, giaddr = data[16:20], data[pk.GIADDR_SLICE]
        server_id = options.get(_OPT_SERVER_ID)
        if yiaddr == b"\0\0\0\0" or server_id is None or len(server_id) != 4:
            return None
        server = socket.inet_ntoa(server_id)
        if src != server and not (giaddr != b"\0\0\0\0" and src == socket.inet_ntoa(giaddr)):
            return None
        if servers and server not in servers:
            return None
        lease_raw = options.get(_OPT_LEASE)
        lease = (float(int.from_bytes(lease_raw, "big"))
                 if lease_raw is not None and len(lease_raw) == 4 else None)
        return ServerAck(socket.inet_ntoa(yiaddr), data[28:34].hex(":"), server, lease)
    except (pk.Malformed, struct.error, IndexError, OSError, ValueError):
        return None


def open_ack_socket() -> socket.socket:
    """A non-blocking packet socket that receives the frames carrying DHCP server->client
    datagrams that arrive on any interface. Raises OSError (no CAP_NET_RAW)."""
    # Unbound, with a protocol: IPv4 frames of every interface, present and future.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    try:
        program = ctypes.create_string_buffer(_FILTER, len(_FILTER))
        fprog = struct.pack("HL", _FILTER_LEN, ctypes.addressof(program))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setblocking(False)
        while True:  # frames queued before the filter was attached: not ours to read
            try:
                sock.recv(1)
            except BlockingIOError:
                break
    except OSError:
        sock.close()
        raise
    return sock


def read_acks(sock: socket.socket, servers: frozenset[str],
              interface_ok) -> list[tuple[ServerAck, str]]:
    """Drain up to ``DRAIN_BATCH`` frames: the acceptable ACKs with the interface name
    they were seen on (``interface_ok(name)`` filters to the served interfaces)."""
    out = []
    for _ in range(DRAIN_BATCH):
        try:
            frame, addr = sock.recvfrom(4096)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.debug("ack socket: %s", exc)
            break
        ifname = addr[0]
        if not interface_ok(ifname):
            continue
        ack = parse_server_ack(frame, servers)
        if ack is not None:
            out.append((ack, ifname))
    return out
