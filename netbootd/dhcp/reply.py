"""What to answer a boot client, and the bytes of that answer.

Split in two on purpose:

* :func:`answer_for` is the policy of *what* a client kind gets (boot file, option 43,
  vendor class). Pure, unit-tested against rpi-netboot.md and lab.md.
* :func:`build_reply` turns an answer into bytes with scapy (~200 µs), so the
  responder builds each distinct reply **once** per (client request, boot session,
  server address, port) and keeps it; every further packet of that boot goes through
  :func:`patch`, which copies the prepared bytes and writes the few per-packet fields
  (xid, flags, ciaddr, giaddr, chaddr) at their fixed RFC 2131 offsets (~1 µs).

PXE option 43 choices (each one learnt the hard way by someone in the field):

* Raspberry Pi: exactly dnsmasq's 32-byte ``pxe-service=0,"Raspberry Pi Boot"``
  encoding (discovery control 3, prompt ``00 'PXE'``, one menu item type 0). The
  firmware looks for the menu text; ``rpi.boot_string`` changes it (PXE_OPTION43).
* BIOS PXE ROMs and iPXE: discovery control 8 ("boot file present, skip boot-server
  discovery") with the boot file in the offer — the plain PXE path pixiecore uses.
  Without a PXE menu, iPXE boots the file name directly on BIOS and EFI alike.
* UEFI PXE (OVMF, vendor firmware): no option 43. Many UEFI firmwares ignore proxy
  offers that try to bypass discovery, but all of them then ask the proxy server on
  port 4011 (EDK2's "BINL" offer type); the 4011 ACK carries the file.
* UEFI HTTP boot: vendor class ``HTTPClient`` and an ``http://`` URL as boot file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import ClientKind
from ..render import ServerInfo
from ..settings import Settings
from . import packet as pk
from .classify import HTTP_ARM64_ARCHES, HTTP_X64_ARCHES, ClientInfo

PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_MENU = 9
PXE_MENU_PROMPT = 10
PXE_BOOT_ITEM = 71
#: Discovery control bit 3: "boot file in the offer, skip boot-server discovery".
PXEBS_SKIP = 8
#: DHCP messages are padded to the BOOTP minimum (RFC 1542: some relays/ROMs drop less).
MIN_REPLY = 300
#: Bootp ``file`` field size; longer names (URLs) go in option 67 only.
FILE_FIELD = 128


def rpi_option43(boot_string: str) -> bytes:
    """The PXE sub-options a Pi bootloader accepts (dnsmasq's encoding, rpi-netboot.md).

    ``06 01 03 | 0a 04 00 'PXE' | 09 len 00 00 len(desc) desc | ff`` — 32 bytes for
    "Raspberry Pi Boot".
    """
    desc = boot_string.encode("ascii")
    if len(desc) > 250:
        raise ValueError("rpi.boot_string is longer than a PXE menu entry can hold")
    menu = b"\x00\x00" + bytes((len(desc),)) + desc  # boot type 0, description
    return pk.encode_options([(PXE_DISCOVERY_CONTROL, b"\x03"),
                              (PXE_MENU_PROMPT, b"\x00PXE"),
                              (PXE_BOOT_MENU, menu)])


#: Option 43 for BIOS PXE and iPXE: skip discovery, boot the file in the offer.
SKIP_DISCOVERY_OPTION43 = pk.encode_options([(PXE_DISCOVERY_CONTROL, bytes((PXEBS_SKIP,)))])


@dataclass(frozen=True, slots=True)
class Answer:
    """The kind-specific part of a reply."""

    vendor_class: bytes
    bootfile: str | None
    option43: bytes | None


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """Why a boot client gets nothing although its plan says boot (event ``reason``)."""

    reason: str


def http_base(settings: Settings, server_ip: str) -> str:
    """Base URL of netbootd's HTTP service as the client should use it (``server_ip``
    came from :meth:`ServerInfo.for_arrival`; the URL rules live in ServerInfo too)."""
    return ServerInfo(ip=server_ip, http_port=settings.http.port,
                      public_url=settings.http.public_url).base_url


def answer_for(info: ClientInfo, server_ip: str, settings: Settings, *,
               pxe_request: bool = False,
               available: frozenset[str] | None = None) -> Answer | NoAnswer:
    """What this client kind gets. ``available``: iPXE binaries present (None = all).

    ``pxe_request`` is a port-4011 boot-server request: the ACK then echoes the
    client's boot item (sub-option 71), which iPXE and EDK2 check before booting.
    """
    d = settings.dhcp
    kind = info.kind
    if kind is ClientKind.RPI:
        return Answer(b"PXEClient", None, rpi_option43(settings.rpi.boot_string))
    if kind is ClientKind.IPXE:
        return Answer(b"PXEClient", http_base(settings, server_ip) + "/boot.ipxe",
                      _pxe43(info, pxe_request, SKIP_DISCOVERY_OPTION43))
    if kind is ClientKind.HTTP_BOOT:
        if info.arch in HTTP_X64_ARCHES:
            name = d.uefi_x64_bootfile
        elif info.arch in HTTP_ARM64_ARCHES:
            name = d.uefi_arm64_bootfile
        else:
            return NoAnswer(f"no HTTP boot binary for arch {info.arch}")
        if available is not None and name not in available:
            return NoAnswer(f"iPXE binary {name} missing")
        return Answer(b"HTTPClient", f"{http_base(settings, server_ip)}/ipxe/{name}", None)
    if kind is ClientKind.PXE_BIOS:
        name, opt43 = d.bios_bootfile, _pxe43(info, pxe_request, SKIP_DISCOVERY_OPTION43)
    elif kind is ClientKind.PXE_UEFI_X64:
        name, opt43 = d.uefi_x64_bootfile, _pxe43(info, pxe_request, None)
    elif kind is ClientKind.PXE_UEFI_ARM64:
        name, opt43 = d.uefi_arm64_bootfile, _pxe43(info, pxe_request, None)
    else:
        return NoAnswer(f"no boot file for client kind {kind.value} (arch {info.arch})")
    if available is not None and name not in available:
        return NoAnswer(f"iPXE binary {name} missing")
    return Answer(b"PXEClient", name, opt43)


def _pxe43(info: ClientInfo, pxe_request: bool, default: bytes | None) -> bytes | None:
    if pxe_request and info.boot_item is not None and len(info.boot_item) == 4:
        return pk.encode_options([(PXE_BOOT_ITEM, info.boot_item)])
    return default


def preload() -> None:
    """Import scapy's DHCP layers now (0.15-0.5 s): the service calls this at start-up,
    so the first client after a start is not the one that waits for it on the loop."""
    import scapy.layers.dhcp  # noqa: F401


def build_reply(info: ClientInfo, answer: Answer, message_type: int, server_ip: str) -> bytes:
    """Build one reply with scapy (the slow, general path; results are cached).

    yiaddr is never set: a proxy server gives no address. Option 54 = siaddr =
    option 66 = ``server_ip`` (rpi-netboot.md: the Pi's choice between siaddr and 66 is
    unconfirmed, so they must agree). Option 97 is echoed (PXE spec, Pi firmware).
    """
    from scapy.layers.dhcp import BOOTP, DHCP  # loaded by preload() at service start

    bootfile = answer.bootfile.encode("ascii") if answer.bootfile else None
    options: list = [("message-type", message_type), ("server_id", server_ip),
                     ("vendor_class_id", answer.vendor_class),
                     ("tftp_server_name", server_ip.encode("ascii"))]
    if bootfile is not None:
        if len(bootfile) > 255:
            raise ValueError("boot file name longer than 255 bytes")
        options.append(("boot-file-name", bootfile))
    if info.machine_id is not None:
        options.append(("pxe_client_machine_identifier", info.machine_id))
    if answer.option43 is not None:
        options.append(("vendor_specific", answer.option43))
    options.append("end")
    mac = bytes.fromhex(info.mac.replace(":", ""))
    file_field = bootfile if bootfile is not None and len(bootfile) < FILE_FIELD else b""
    msg = BOOTP(op=pk.BOOTREPLY, htype=pk.HTYPE_ETHER, hlen=6, xid=0,  # patched
                ciaddr=(info.ciaddr or "0.0.0.0") if message_type == pk.ACK else "0.0.0.0",
                yiaddr="0.0.0.0", siaddr=server_ip, chaddr=mac + b"\0" * 10,
                sname=server_ip.encode("ascii"), file=file_field) / DHCP(options=options)
    raw = bytes(msg)
    if len(raw) < MIN_REPLY:
        raw += b"\0" * (MIN_REPLY - len(raw))
    return raw


def patch(template: bytes, request: bytes, message_type: int) -> bytearray:
    """Copy a built reply and write this request's xid, flags, giaddr and chaddr (and
    ciaddr for an ACK) straight from the request bytes, at their RFC 2131 offsets.

    The responder does this once per distinct request content; per packet it only
    splices in xid and flags (``responder._Prepared.reply``)."""
    buf = bytearray(template)
    buf[pk.XID_SLICE] = request[pk.XID_SLICE]
    buf[pk.FLAGS_SLICE] = request[pk.FLAGS_SLICE]
    buf[pk.GIADDR_SLICE] = request[pk.GIADDR_SLICE]
    buf[pk.CHADDR_SLICE] = request[pk.CHADDR_SLICE]
    if message_type == pk.ACK:
        buf[pk.CIADDR_SLICE] = request[pk.CIADDR_SLICE]
    return buf
