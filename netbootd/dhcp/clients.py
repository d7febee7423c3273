"""Client requests as real boot firmware sends them (tests, benchmark, lab).

Built with ``struct`` rather than scapy so that (a) the option *order* and encoding
are exactly what rpi-netboot.md and lab.md report from captures — scapy would
re-order nothing but also hides the bytes — and (b) the benchmark's load generator
can make tens of thousands of them a second. The server side never imports this.
"""

from __future__ import annotations

import struct

from . import packet as pk

PI_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"  # Pi 3/4/5 *and* BIOS iPXE (lab.md)
EFI_IPXE_VENDOR = b"PXEClient:Arch:00007:UNDI:003001"
OVMF_PXE_VENDOR = b"PXEClient:Arch:00007:UNDI:003010"
OVMF_HTTP_VENDOR = b"HTTPClient:Arch:00016:UNDI:003001"
PI_PARAMS = bytes([1, 3, 43, 60, 66, 67, *range(128, 136)])
PXE_PARAMS = bytes([1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50,
                    51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135])
IPXE_PARAMS = bytes([1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130, 131,
                     132, 133, 134, 135, 175, 203])
#: iPXE's option 175 feature list (a real capture's shape: http, https, pxe-ext, ...).
IPXE_FEATURES = bytes([0xb1, 0x05, 0x01, 0x10, 0xec, 0x81, 0x39, 0x13, 0x01, 0x01,
                       0x13, 0x01, 0x01, 0x11, 0x01, 0x01, 0x19, 0x01, 0x01, 0x21, 0x01, 0x01])
UUID = bytes.fromhex("00" + "5f0a1c2e3d4b5a69788796a5b4c3d2e1")
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def request(mac: str, xid: int, options: list[tuple[int, bytes]], *, ciaddr: str = "0.0.0.0",
            flags: int = 0, giaddr: str = "0.0.0.0", secs: int = 0) -> bytes:
    """A BOOTREQUEST with ``options`` encoded in exactly the given order, then END."""
    body = bytearray()
    for code, value in options:
        body += bytes((code, len(value))) + value
    body.append(pk.OPT_END)
    head = _HEADER.pack(pk.BOOTREQUEST, 1, 6, 0, xid, secs, flags,
                        bytes(map(int, ciaddr.split("."))), b"\0" * 4, b"\0" * 4,
                        bytes(map(int, giaddr.split("."))), mac_bytes(mac).ljust(16, b"\0"),
                        b"", b"")
    return head + pk.MAGIC + bytes(body)


def pi_machine_id(mac: str, serial: int, tag: bytes = b"RPi5",
                  revision: int = 0x00D04170) -> bytes:
    """Option 97 of a Pi: 0x00, tag, board revision LE, low 4 MAC bytes, serial LE."""
    return (b"\x00" + tag + revision.to_bytes(4, "little") + mac_bytes(mac)[2:]
            + (serial & 0xFFFFFFFF).to_bytes(4, "little"))


def pi_serial_only_id(serial: int, *, with_type: bool = True) -> bytes:
    """Option 97 with EEPROM ``DHCP_OPTION97=0``: the serial repeated four times."""
    body = (serial & 0xFFFFFFFF).to_bytes(4, "little") * 4
    return (b"\x00" + body) if with_type else body


def pi_discover(mac: str, xid: int, serial: int = 0x1A2B3C4D, *, tag: bytes = b"RPi5",
                machine_id: bytes | None = None, msg_type: int = pk.DISCOVER) -> bytes:
    """A Pi 4/5 DISCOVER: options 53, 55, 93, 94, 97, 60, 255 in that order, flags 0."""
    mid = machine_id if machine_id is not None else pi_machine_id(mac, serial, tag)
    return request(mac, xid, [(53, bytes((msg_type,))), (55, PI_PARAMS), (93, b"\x00\x00"),
                              (94, b"\x01\x02\x01"), (97, mid), (60, PI_VENDOR)])


def bios_ipxe_discover(mac: str, xid: int, msg_type: int = pk.DISCOVER) -> bytes:
    """SeaBIOS + iPXE ROM: the Pi's vendor class, arch 0, user class "iPXE", option 175."""
    return request(mac, xid, [(53, bytes((msg_type,))), (57, b"\x05\xc0"),
                              (93, b"\x00\x00"), (94, b"\x01\x02\x01"), (60, PI_VENDOR),
                              (77, b"iPXE"), (55, IPXE_PARAMS), (175, IPXE_FEATURES),
                              (61, b"\x01" + mac_bytes(mac)), (97, UUID)])


def efi_ipxe_discover(mac: str, xid: int, msg_type: int = pk.DISCOVER) -> bytes:
    return request(mac, xid, [(53, bytes((msg_type,))), (57, b"\x05\xc0"),
                              (93, b"\x00\x07"), (94, b"\x01\x03\x01"), (60, EFI_IPXE_VENDOR),
                              (77, b"iPXE"), (55, IPXE_PARAMS), (175, IPXE_FEATURES),
                              (61, b"\x01" + mac_bytes(mac)), (97, UUID)])


def ovmf_pxe_discover(mac: str, xid: int, msg_type: int = pk.DISCOVER) -> bytes:
    return request(mac, xid, [(53, bytes((msg_type,))), (57, b"\x05\xc0"), (55, PXE_PARAMS),
                              (97, UUID), (94, b"\x01\x03\x00"), (93, b"\x00\x07"),
                              (60, OVMF_PXE_VENDOR)], flags=0x8000)


def ovmf_http_discover(mac: str, xid: int, msg_type: int = pk.DISCOVER) -> bytes:
    return request(mac, xid, [(53, bytes((msg_type,))), (57, b"\x05\xc0"), (55, PXE_PARAMS),
                              (97, UUID), (94, b"\x01\x03\x00"), (93, b"\x00\x10"),
                              (60, OVMF_HTTP_VENDOR)], flags=0x8000)


def bios_pxe_discover(mac: str, xid: int, msg_type: int = pk.DISCOVER) -> bytes:
    """A classic BIOS PXE ROM (no iPXE user class), arch 0."""
    return request(mac, xid, [(53, bytes((msg_type,))), (57, b"\x04\xec"), (55, PXE_PARAMS),
                              (97, UUID), (93, b"\x00\x00"), (94, b"\x01\x02\x01"),
                              (60, b"PXEClient:Arch:00000:UNDI:002001")], flags=0x8000)


def pxe_bootserver_request(mac: str, xid: int, ciaddr: str, *, arch: int = 0,
                           vendor: bytes = b"PXEClient:Arch:00000:UNDI:002001",
                           item_type: int = 0x8000, user_class: bytes | None = None) -> bytes:
    """The port-4011 boot-server REQUEST (PXE spec 2.2.5): option 43 sub-option 71."""
    opts = [(53, bytes((pk.REQUEST,))), (57, b"\x05\xc0"), (55, PXE_PARAMS), (97, UUID),
            (93, arch.to_bytes(2, "big")), (94, b"\x01\x02\x01"), (60, vendor),
            (43, b"\x47\x04" + item_type.to_bytes(2, "big") + b"\x00\x00\xff")]
    if user_class:
        opts.append((77, user_class))
    return request(mac, xid, opts, ciaddr=ciaddr)


def plain_discover(mac: str, xid: int, msg_type: int = pk.DISCOVER) -> bytes:
    """An ordinary DHCP client (busybox udhcpc-like): no PXE vendor class."""
    return request(mac, xid, [(53, bytes((msg_type,))), (61, b"\x01" + mac_bytes(mac)),
                              (60, b"udhcp 1.35.0"), (57, b"\x02\x40"),
                              (55, bytes([1, 3, 6, 12, 15, 28, 42]))])
