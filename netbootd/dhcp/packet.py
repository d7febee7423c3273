"""DHCP/BOOTP codec: a strict struct pre-parser for the hot path, scapy for the rest.

Why two codecs: scapy decodes and builds anything, but costs ~205 µs a packet here,
which caps a Python responder at ~4k packets/s (bench/dhcp_bench.py measurements). A proxy-DHCP
server needs only a handful of fields from each request, so the per-packet path reads
the fixed 236-byte header with one ``struct.unpack_from`` and walks the option TLVs
once (a few µs). Scapy keeps the jobs where it earns its place: building each
*distinct* reply once (``reply.py`` caches it and patches xid/chaddr per packet) and
explaining a packet the fast parser rejected (``explain``, debug logging only).

The fast parser is deliberately strict: anything it does not fully understand is
rejected with :class:`Malformed` and the caller drops and counts it. A proxy server
loses nothing by ignoring a malformed packet — the site's DHCP server still answers it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHER = 1

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {DISCOVER: "discover", OFFER: "offer", REQUEST: "request",
                 DECLINE: "decline", ACK: "ack", NAK: "nak", RELEASE: "release",
                 INFORM: "inform"}

MAGIC = b"\x63\x82\x53\x63"
#: Fixed header (op .. file) + magic cookie; options start here.
OPTIONS_OFFSET = 240
#: A DHCP message never legitimately exceeds one Ethernet frame's UDP payload; anything
#: larger is an attack or garbage, and is dropped before any parsing.
MAX_PACKET = 1500 - 20 - 8
#: Relay hop limit (RFC 1542 suggests 16); more means a relay loop.
MAX_HOPS = 16

# op htype hlen hops | xid | secs flags | ciaddr yiaddr siaddr giaddr (raw 4-byte strings)
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s")

OPT_PAD, OPT_END = 0, 255
OPT_REQUESTED_IP = 50
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_VENDOR_CLASS = 60
OPT_VENDOR_SPECIFIC = 43
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_CLIENT_ARCH = 93
OPT_CLIENT_NDI = 94
OPT_MACHINE_ID = 97
OPT_IPXE_ENCAP = 175

#: Where the reply template gets per-packet values patched in (RFC 2131 figure 1).
XID_SLICE = slice(4, 8)
FLAGS_SLICE = slice(10, 12)
CIADDR_SLICE = slice(12, 16)
GIADDR_SLICE = slice(24, 28)
CHADDR_SLICE = slice(28, 44)


class Malformed(ValueError):
    """The packet is not a well-formed DHCP request; the reason is a short static text."""


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed-header fields of one BOOTREQUEST (what a reply copies back per packet)."""

    xid: int
    flags: int
    ciaddr: bytes
    giaddr: bytes
    chaddr: bytes  #: the full 16-byte field, patched back into replies as it came
    mac: bytes  #: the 6 hardware-address bytes
    hops: int


@dataclass(frozen=True, slots=True)
class Request(Header):
    """Header plus options: code -> value bytes (RFC 3396: repeated codes concatenated)."""

    options: dict[int, bytes]

    @property
    def message_type(self) -> int | None:
        v = self.options.get(OPT_MESSAGE_TYPE)
        return v[0] if v and len(v) == 1 else None


def _scan_options(data: bytes, start: int, stop: int, out: dict[int, bytes],
                  *, need_end: bool) -> None:
    """Walk one option area (RFC 2132 TLVs) into ``out``; raise Malformed on bad lengths."""
    i = start
    while i < stop:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= stop:
            raise Malformed("option length beyond end of packet")
        end = i + 2 + data[i + 1]
        if end > stop:
            raise Malformed("option value beyond end of packet")
        value = data[i + 2:end]
        prev = out.get(code)
        out[code] = value if prev is None else prev + value
        i = end
    if need_end:
        raise Malformed("options not terminated by end option (truncated?)")


def parse_header(data: bytes) -> Header:
    """Check size, op/htype/hlen/hops and the magic cookie; return the header fields.

    This is all the per-packet work a repeated request needs: the responder memoises
    what the options said (see ``responder.py``), keyed by the bytes after xid/flags.
    """
    n = len(data)
    if n < OPTIONS_OFFSET + 1:
        raise Malformed("shorter than a DHCP header")
    if n > MAX_PACKET:
        raise Malformed("larger than one Ethernet frame")
    op, htype, hlen, hops, xid, _secs, flags, ciaddr, _yi, _si, giaddr = \
        _HEADER.unpack_from(data)
    if op != BOOTREQUEST:
        raise Malformed("not a BOOTREQUEST")
    if htype != HTYPE_ETHER or hlen != 6:
        raise Malformed("hardware type is not Ethernet")
    if hops > MAX_HOPS:
        raise Malformed("too many relay hops")
    if data[236:240] != MAGIC:
        raise Malformed("no DHCP magic cookie")
    return Header(xid, flags, ciaddr, giaddr, data[28:44], data[28:34], hops)


#: The longest option value a reply can echo in one TLV.
MAX_ECHO = 255
REQUEST_PREFIX = bytes((BOOTREQUEST, HTYPE_ETHER, 6))


def check_header(data: bytes) -> None:
    """:func:`parse_header`'s checks without building anything (the hot path's first step)."""
    n = len(data)
    if n <= OPTIONS_OFFSET or n > MAX_PACKET or not data.startswith(REQUEST_PREFIX) \
            or data[3] > MAX_HOPS or not data.startswith(MAGIC, 236):
        parse_header(data)  # raises Malformed with the precise reason
        raise Malformed("bad header")  # pragma: no cover - parse_header raised already


def parse_options(data: bytes) -> dict[int, bytes]:
    """Walk every option (and overloaded file/sname areas, RFC 2131 4.1) strictly."""
    options: dict[int, bytes] = {}
    _scan_options(data, OPTIONS_OFFSET, len(data), options, need_end=True)
    overload = options.get(OPT_OVERLOAD)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise Malformed("bad option overload value")
        if overload[0] & 1:  # file field carries options
            _scan_options(data, 108, 236, options, need_end=True)
        if overload[0] & 2:  # sname field carries options
            _scan_options(data, 44, 108, options, need_end=True)
    return options


def parse(data: bytes) -> Request:
    """Parse a client's BOOTREQUEST strictly; raise :class:`Malformed` on anything odd.

    Checks: size, op/htype/hlen/hops, magic cookie, every option length, the end
    option, and option overload (52) into the file/sname fields.
    """
    h = parse_header(data)
    return Request(h.xid, h.flags, h.ciaddr, h.giaddr, h.chaddr, h.mac, h.hops,
                   parse_options(data))


def encode_options(items: list[tuple[int, bytes]]) -> bytes:
    """TLV-encode (code, value) pairs, e.g. PXE sub-options inside option 43, plus END.

    Values over 255 bytes cannot be encoded in one TLV: ValueError.
    """
    out = bytearray()
    for code, value in items:
        if len(value) > 255:
            raise ValueError(f"option {code} value is {len(value)} bytes (max 255)")
        out += bytes((code, len(value))) + value
    out.append(OPT_END)
    return bytes(out)


def decode_suboptions(value: bytes) -> dict[int, bytes]:
    """Option 43/175 sub-options; lenient (returns what parsed) since they only inform."""
    out: dict[int, bytes] = {}
    try:
        _scan_options(value, 0, len(value), out, need_end=False)
    except Malformed:
        pass
    return out


def explain(data: bytes) -> str:
    """A human summary of any bytes via scapy, for debug logs of dropped packets.

    Scapy tolerates what the strict parser refuses, so an operator can see what a
    misbehaving client actually sent. Never raises.
    """
    try:
        from scapy.layers.dhcp import BOOTP

        return BOOTP(data).summary()
    except Exception as exc:  # noqa: BLE001 - explaining garbage must not fail
        return f"<undecodable: {exc.__class__.__name__}>"
