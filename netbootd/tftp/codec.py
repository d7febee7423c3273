"""TFTP packet codec (RFC 1350 + RFC 2347 options): parse and build, no I/O.

Why a hand-written struct codec and not tftpy's packet classes: a TFTP packet is
an opcode and at most four fields, and the engine's cost per packet decides how
fast a Raspberry Pi boots (one block per round trip). tftpy builds an object per
packet and its decoders raised on several malformed inputs (non-ASCII names,
options without a NUL, ``blksize=abc``, a 3-byte ACK), which killed its server.
Here every parse failure is a single exception type, :class:`Malformed`, that the
servers count and drop; the hot path (ACK in, DATA out) never builds objects.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# RFC 1350 error codes (+ 8 from RFC 2347).
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL_OP = 4
ERR_UNKNOWN_TID = 5
ERR_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTION = 8

#: Longest request accepted. RFC 2347 asks clients to keep requests within 512 octets;
#: a generous bound keeps a hostile datagram from costing more than a page of work.
MAX_REQUEST = 2048

_HDR = struct.Struct(">HH")


class Malformed(ValueError):
    """A datagram that is not a valid TFTP packet; the caller drops and counts it."""


@dataclass(frozen=True, slots=True)
class Request:
    """An RRQ or WRQ: file name, transfer mode (lower case) and options (names lower case)."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorPacket:
    code: int
    message: str


def opcode_of(data: bytes | bytearray | memoryview) -> int:
    """The opcode, or raise Malformed (shorter than 2 bytes)."""
    if len(data) < 2:
        raise Malformed("shorter than an opcode")
    return (data[0] << 8) | data[1]


def parse_request(data: bytes | bytearray | memoryview) -> Request:
    """Parse RRQ/WRQ: ``opcode filename NUL mode NUL [name NUL value NUL]*``.

    Strict where it matters (NUL-terminated name and mode, UTF-8 text, options in
    pairs) and lenient where real firmware is sloppy: trailing NUL padding after
    the last option is ignored, and a repeated option keeps its first value.
    """
    if len(data) > MAX_REQUEST:
        raise Malformed("request too long")
    op = opcode_of(data)
    if op not in (RRQ, WRQ):
        raise Malformed(f"not a request (opcode {op})")
    body = bytes(data[2:])
    if not body.endswith(b"\0"):
        raise Malformed("request not NUL-terminated")
    parts = body[:-1].split(b"\0")
    if len(parts) < 2:
        raise Malformed("request without mode")
    try:
        text = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise Malformed("request is not UTF-8") from exc
    filename, mode = text[0], text[1].lower()
    if not filename:
        raise Malformed("empty file name")
    if not mode:
        raise Malformed("empty mode")
    options: dict[str, str] = {}
    rest = text[2:]
    i = 0
    while i < len(rest):
        name = rest[i].lower()
        if not name:  # NUL padding after the last option
            if any(rest[i:]):
                raise Malformed("empty option name")
            break
        if i + 1 >= len(rest):
            raise Malformed(f"option {name!r} without value")
        options.setdefault(name, rest[i + 1])
        i += 2
    return Request(op, filename, mode, options)


def parse_ack(data: bytes | bytearray | memoryview, length: int | None = None) -> int:
    """Block number of an ACK (extra trailing bytes are tolerated, as tftpd-hpa does)."""
    n = len(data) if length is None else length
    if n < 4 or data[0] != 0 or data[1] != ACK:
        raise Malformed("not an ACK")
    return (data[2] << 8) | data[3]


def parse_error(data: bytes | bytearray | memoryview) -> ErrorPacket:
    """ERROR: code and message; a missing final NUL or bad UTF-8 is tolerated (it is
    only shown in logs), a packet shorter than 4 bytes is not."""
    if len(data) < 4 or data[0] != 0 or data[1] != ERROR:
        raise Malformed("not an ERROR")
    code = (data[2] << 8) | data[3]
    msg = bytes(data[4:]).split(b"\0", 1)[0].decode("utf-8", "replace")
    return ErrorPacket(code, msg[:200])


def parse_oack(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """OACK options (used by tests and the emulated Pi client, not by the server)."""
    if opcode_of(data) != OACK:
        raise Malformed("not an OACK")
    body = bytes(data[2:])
    if not body:
        return {}
    if not body.endswith(b"\0"):
        raise Malformed("OACK not NUL-terminated")
    parts = body[:-1].split(b"\0")
    if len(parts) % 2:
        raise Malformed("OACK option without value")
    try:
        return {parts[i].decode().lower(): parts[i + 1].decode()
                for i in range(0, len(parts), 2)}
    except UnicodeDecodeError as exc:
        raise Malformed("OACK is not UTF-8") from exc


def build_request(filename: str, mode: str = "octet", options: dict[str, str] | None = None,
                  *, opcode: int = RRQ) -> bytes:
    out = [struct.pack(">H", opcode), filename.encode(), b"\0", mode.encode(), b"\0"]
    for k, v in (options or {}).items():
        out += [k.encode(), b"\0", str(v).encode(), b"\0"]
    return b"".join(out)


def build_data(block: int, payload: bytes) -> bytes:
    return _HDR.pack(DATA, block & 0xFFFF) + payload


def build_ack(block: int) -> bytes:
    return _HDR.pack(ACK, block & 0xFFFF)


def build_error(code: int, message: str) -> bytes:
    return _HDR.pack(ERROR, code) + message.encode("utf-8", "replace")[:400] + b"\0"


def build_oack(options: dict[str, str]) -> bytes:
    out = [struct.pack(">H", OACK)]
    for k, v in options.items():
        out += [k.encode(), b"\0", str(v).encode(), b"\0"]
    return b"".join(out)
