"""Values every part of netbootd passes around.

Pure data, no I/O. The protocol servers turn a packet or request into a
:class:`ClientFacts` once (the smee ``NewInfo`` idea), hand it to the planner,
and get a :class:`BootPlan` back. Nothing downstream re-parses packets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class ClientKind(StrEnum):
    """What kind of boot firmware is asking; decided once per packet."""

    RPI = "rpi"
    IPXE = "ipxe"
    PXE_BIOS = "pxe-bios"
    PXE_UEFI_X64 = "pxe-uefi-x64"
    PXE_UEFI_ARM64 = "pxe-uefi-arm64"
    HTTP_BOOT = "http-boot"
    #: U-Boot's own DHCP client (vendor class ``U-Boot.<cpu>``, arch 21/22): it boots an
    #: extlinux-style ``pxelinux.cfg`` over TFTP (docs/dhcp.md, docs/tftp.md).
    UBOOT = "uboot"
    OTHER = "other"


class Action(StrEnum):
    """What a machine gets (design.md)."""

    NETBOOT = "netboot"
    INSTALL = "install"
    LOCAL = "local"
    IGNORE = "ignore"


_MAC_DIGITS = re.compile(r"[0-9a-fA-F]{12}")
_CANONICAL_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def normalise_mac(text: str) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for any common notation.

    Accepts ``AA:BB:..``, ``aa-bb-..``, ``aabb.ccdd.eeff`` (Cisco), ``aabbccddeeff``
    and the iPXE ``${mac:hexhyp}`` form. Raises ``ValueError`` with the input
    quoted, so config errors can say what was wrong.
    """
    if not isinstance(text, str):
        raise TypeError(f"MAC address must be a string, got {type(text).__name__}")
    if _CANONICAL_MAC.fullmatch(text):
        return text  # already in this form (a fleet's MACs, mostly): nothing to do
    digits = re.sub(r"[:\-.\s]", "", text.strip())
    if not _MAC_DIGITS.fullmatch(digits):
        raise ValueError(f"not a MAC address: {text!r}")
    digits = digits.lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def mac_dashes(mac: str) -> str:
    """``aa:bb:..`` -> ``aa-bb-..`` (Pi TFTP_PREFIX=2, cloud-init URLs)."""
    return normalise_mac(mac).replace(":", "-")


_SERIAL = re.compile(r"[0-9a-f]{8}")


def normalise_serial(text: str | int) -> str:
    """Pi serial as the bootloader's TFTP prefix: low 32 bits, 8 lower-case hex digits.

    ``/proc/cpuinfo`` shows 16 hex digits (``10000000abcdef01``); the bootloader
    uses only the low 32 bits, so both spellings map to the same node.
    """
    if isinstance(text, int):
        return f"{text & 0xFFFFFFFF:08x}"
    t = str(text).strip().lower()
    t = t.removeprefix("0x")
    if not t or len(t) > 16 or not all(c in "0123456789abcdef" for c in t):
        raise ValueError(f"not a Pi serial (hex): {text!r}")
    return t[-8:].rjust(8, "0")


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """Everything a service learnt about one client, computed once per request."""

    mac: str
    kind: ClientKind = ClientKind.OTHER
    arch: int | None = None
    serial: str | None = None
    ip: str | None = None
    uuid: str | None = None
    vendor_class: str | None = None
    user_class: str | None = None

    def selector_values(self) -> dict[str, str]:
        """The values profile selectors can match (matchbox-style)."""
        out = {"mac": self.mac, "kind": str(self.kind)}
        if self.serial:
            out["serial"] = self.serial
        if self.arch is not None:
            out["arch"] = str(self.arch)
        return out


@dataclass(frozen=True, slots=True)
class DiskImage:
    """The raw disk image of a ``disk`` build (manifest ``disk`` section): what an
    installer streams to the node's disk, and what it checks the result against."""

    path: str
    #: ``none`` | ``zst`` | ``xz`` | ``gz``: how the stored file is compressed.
    compression: str
    #: Size and sha256 of the stored (possibly compressed) file.
    size: int
    sha256: str
    #: Size and sha256 of the raw image once decompressed (declared by the builder).
    uncompressed_size: int
    uncompressed_sha256: str


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One immutable image version in the store, resolved once per boot session."""

    name: str
    version: str
    root: Path
    kind: str = "kernel+initrd"
    channel: str | None = None
    pinned: bool = False
    artefacts: tuple[str, ...] = ()
    #: The manifest's ``boards``: what the image boots on (``x86_64``, ``arm64``,
    #: ``rpi5``, ...); the planner never plans a client onto an image for other boards.
    boards: tuple[str, ...] = ()
    #: The manifest's ``boot`` section: kernel, initrd, cmdline, rootfs, boot_tree, disk.
    boot: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    #: The disk image of a ``disk`` build, else None.
    disk: DiskImage | None = None

    def path(self, relative: str) -> Path:
        """Path of an artefact inside this version (caller has validated ``relative``)."""
        return self.root / relative


@dataclass(frozen=True, slots=True)
class NodeView:
    """The inventory's answer about one machine (or the default profile)."""

    mac: str
    hostname: str
    known: bool
    profile: str
    role: str = "worker"
    serial: str | None = None
    channel: str = "prod"
    image: str | None = None
    pin: str | None = None
    #: Explicit action from the node or its profile; None = the planner decides.
    action: Action | None = None
    labels: dict[str, str] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    templates: dict[str, str] = field(default_factory=dict)
    #: What to install when the action is ``install``: {image, channel, pin, installer}.
    install: dict[str, str] = field(default_factory=dict)
    #: The inventory's own action (None when neither node nor profile names one);
    #: ``action`` above may be the lifecycle's (nodestate.py) once the planner decided.
    desired: Action | None = None


#: Actions that get an answer. A module constant: proxy-DHCP asks per packet, and two
#: enum attribute lookups on the class measured 0.2 µs there.
_ANSWERING = (Action.NETBOOT, Action.INSTALL)


@dataclass(frozen=True, slots=True)
class BootPlan:
    """What one machine gets for one boot session.

    Built by the planner, cached per MAC for ``boot.session_ttl`` seconds, so a
    boot that started on version N finishes on N even if N+1 is activated.
    """

    action: Action
    node: NodeView
    image: ImageRef | None
    reason: str
    session: str
    created: float
    facts: ClientFacts | None = None
    #: For ``install``: the disk image the installer (``image``) writes; for a node that
    #: runs from its disk: the version installed there, when known.
    disk: ImageRef | None = None
    #: Proof of this boot: rendered only into the node's own boot files (cmdline), asked
    #: back with every lifecycle report (installing/installed/booted/failed).
    token: str = ""
    #: The lifecycle stage the plan was made from ("" = none recorded).
    stage: str = ""

    @property
    def mac(self) -> str:
        return self.node.mac

    @property
    def answers(self) -> bool:
        """True when netbootd should say anything at all to this machine."""
        return self.action in _ANSWERING
