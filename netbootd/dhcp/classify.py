"""Who is asking: one :class:`ClientInfo` per packet, computed once (smee's ``NewInfo``).

Everything downstream (planner, reply builder, events, metrics) reads this value
and never looks at options again. The order of the kind checks matters and is the
whole point of this module:

1. **Raspberry Pi first.** A Pi sends option 93 = 0 ("x86 BIOS") and the very same
   vendor class as BIOS iPXE (``PXEClient:Arch:00000:UNDI:002001``), so arch alone
   would hand it an x86 binary. It is a Pi when that vendor class comes with an
   option-97 tag "RPi?"/"?iPR" (both byte orders were shipped), a Raspberry Pi OUI
   from config, or an inventory entry that says so (rpi-netboot.md). A serial names
   an inventory node only together with that node's MAC, unless the node says
   ``match: serial`` (the inventory decides; option 97 is just bytes anyone can send).
2. iPXE (user class "iPXE" or any option 175), whatever the firmware below it.
3. UEFI HTTP boot (vendor class ``HTTPClient``).
4. PXE by arch (RFC 4578 / IANA registry): 0 BIOS, 7/9 x86-64 UEFI, 11 arm64 UEFI.
   Any other value is ``other`` — an unknown arch never raises.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..model import ClientFacts, ClientKind, normalise_serial
from . import packet as pk

PI_VENDOR_PREFIX = "PXEClient:Arch:00000"
UEFI_X64_ARCHES = frozenset({7, 9})
UEFI_ARM64_ARCHES = frozenset({11})
#: HTTP-boot arch values (IANA): 15 x86 UEFI HTTP, 16 x64 UEFI HTTP, 18 arm32, 19 arm64.
HTTP_X64_ARCHES = frozenset({15, 16})
HTTP_ARM64_ARCHES = frozenset({19})


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Everything netbootd needs to know about one DHCP request.

    It deliberately holds nothing from the per-packet header fields (xid, flags): it is
    a function of the request's content only, so the responder can reuse it for a
    client's retransmissions (the xid lives in :class:`packet.Header`).
    """

    mac: str
    message_type: int | None
    kind: ClientKind
    boot_client: bool  #: vendor class PXEClient or HTTPClient; nobody else gets an answer
    arch: int | None = None
    vendor_class: str | None = None
    user_class: str | None = None
    ipxe_options: bytes | None = None  #: option 175 raw, present only for iPXE
    machine_id: bytes | None = None  #: option 97 raw, echoed in replies
    serial: str | None = None
    uuid: str | None = None
    requested_ip: str | None = None  #: option 50
    ciaddr: str | None = None
    boot_item: bytes | None = None  #: PXE option 43 sub-option 71 (boot-server request)

    @property
    def ip(self) -> str | None:
        return self.ciaddr or self.requested_ip

    def facts(self) -> ClientFacts:
        return ClientFacts(mac=self.mac, kind=self.kind, arch=self.arch, serial=self.serial,
                           ip=self.ip, uuid=self.uuid, vendor_class=self.vendor_class,
                           user_class=self.user_class)


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("ascii", "replace").rstrip("\x00")


def user_class_text(value: bytes | None) -> str | None:
    """Option 77: iPXE sends the bare string; RFC 3004 clients send length-prefixed parts."""
    if not value:
        return None
    parts, i = [], 0
    while i < len(value):  # try the RFC 3004 framing first
        n = value[i]
        if n == 0 or i + 1 + n > len(value):
            parts = []
            break
        parts.append(value[i + 1:i + 1 + n])
        i += 1 + n
    if parts:
        return ",".join(p.decode("ascii", "replace") for p in parts)
    return _text(value)


def client_arch(options: dict[int, bytes], vendor_class: str | None) -> int | None:
    """Option 93's first value; else the ``Arch:NNNNN`` of the vendor class; else None."""
    v = options.get(pk.OPT_CLIENT_ARCH)
    if v and len(v) % 2 == 0:
        return int.from_bytes(v[:2], "big")
    if vendor_class:
        _, sep, rest = vendor_class.partition(":Arch:")
        digits = rest[:5]
        if sep and len(digits) == 5 and digits.isdigit():
            return int(digits)
    return None


def pi_machine_id(value: bytes | None) -> tuple[bool, str | None]:
    """Decode a Pi's option 97: (tag looks like a Pi, serial or None).

    Layout (17 bytes): 0x00, 4-byte tag ("RPi4" / "4iPR" / "5iPR" ...), board
    revision LE, low 4 bytes of the MAC, serial LE. With EEPROM ``DHCP_OPTION97=0``
    the field is the serial repeated four times (with or without the 0x00 type byte).
    """
    if not value:
        return False, None
    body = value[1:] if len(value) == 17 and value[0] == 0 else value
    if len(body) != 16:
        return False, None
    groups = {body[i:i + 4] for i in range(0, 16, 4)}
    if len(groups) == 1:  # serial repeated four times: no tag to go by
        return False, normalise_serial(int.from_bytes(body[:4], "little"))
    tag = body[:4]
    is_pi = tag[:3] == b"RPi" or tag[1:] == b"iPR"
    serial = normalise_serial(int.from_bytes(body[12:16], "little")) if is_pi else None
    return is_pi, serial


def pxe_uuid(value: bytes | None) -> str | None:
    """Option 97 of PXE firmware: type 0 + SMBIOS UUID (first fields little-endian)."""
    if value and len(value) == 17 and value[0] == 0:
        return str(uuid.UUID(bytes_le=bytes(value[1:])))
    return None


def _ip(raw: bytes | None) -> str | None:
    if raw is None or len(raw) != 4 or raw == b"\0\0\0\0":
        return None
    return str(ipaddress.IPv4Address(raw))


class Classifier:
    """Turns a parsed request into a :class:`ClientInfo` with config-driven Pi detection.

    ``says_pi(mac, serial)`` is :meth:`netbootd.interfaces.Nodes.says_pi`: asked on
    every classification, so an inventory reload is seen on the next distinct request.
    """

    def __init__(self, rpi_ouis: list[str], says_pi: Callable[[str, str | None], bool]) -> None:
        self._ouis = frozenset(o.strip().lower().replace("-", ":")[:8] for o in rpi_ouis)
        self._says_pi = says_pi

    def classify(self, req: pk.Request) -> ClientInfo:
        o = req.options
        mac = req.mac.hex(":")
        vendor = _text(o.get(pk.OPT_VENDOR_CLASS))
        boot_client = bool(vendor) and vendor.startswith(("PXEClient", "HTTPClient"))
        user = user_class_text(o.get(pk.OPT_USER_CLASS))
        ipxe_opts = o.get(pk.OPT_IPXE_ENCAP)
        arch = client_arch(o, vendor)
        mid = o.get(pk.OPT_MACHINE_ID)
        if mid is not None and len(mid) > pk.MAX_ECHO:
            # Repeated option-97 TLVs are concatenated (RFC 3396); the reply echoes the
            # value in one TLV, which cannot hold more than 255 bytes. No firmware sends
            # that: a malformed request, dropped and counted like any other.
            raise pk.Malformed(f"option 97 is {len(mid)} bytes (one option holds 255)")
        requested = o.get(pk.OPT_REQUESTED_IP)
        boot_item = None
        vs = o.get(pk.OPT_VENDOR_SPECIFIC)
        if vs and boot_client:
            boot_item = pk.decode_suboptions(vs).get(71)

        kind, serial, client_uuid = ClientKind.OTHER, None, None
        if boot_client and vendor.startswith(PI_VENDOR_PREFIX):
            tagged, serial = pi_machine_id(mid)
            if tagged or mac[:8] in self._ouis or self._says_pi(mac, serial):
                kind = ClientKind.RPI
            else:
                serial = None
        if kind is not ClientKind.RPI:
            client_uuid = pxe_uuid(mid)
            if boot_client:
                kind = self._firmware_kind(vendor, user, ipxe_opts, arch)
        return ClientInfo(
            mac=mac, message_type=req.message_type, kind=kind,
            boot_client=boot_client, arch=arch, vendor_class=vendor, user_class=user,
            ipxe_options=ipxe_opts, machine_id=mid, serial=serial, uuid=client_uuid,
            requested_ip=_ip(requested), ciaddr=_ip(req.ciaddr), boot_item=boot_item)

    @staticmethod
    def _firmware_kind(vendor: str, user: str | None, ipxe_opts: bytes | None,
                       arch: int | None) -> ClientKind:
        if ipxe_opts is not None or (user is not None and "iPXE" in user.split(",")):
            return ClientKind.IPXE
        if vendor.startswith("HTTPClient"):
            return ClientKind.HTTP_BOOT
        if arch == 0:
            return ClientKind.PXE_BIOS
        if arch in UEFI_X64_ARCHES:
            return ClientKind.PXE_UEFI_X64
        if arch in UEFI_ARM64_ARCHES:
            return ClientKind.PXE_UEFI_ARM64
        return ClientKind.OTHER
