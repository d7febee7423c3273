"""The per-client virtual TFTP tree: a request path is a *name*, never a disk path.

A name resolves to bytes in one of three ways:

1. a root file that is an iPXE binary (``undionly.kpxe``, ``ipxe.efi``, ...; the one
   list is :mod:`netbootd.bootfiles`) -> ``settings.tftp.ipxe_dir`` / ``extra_ipxe_dirs``;
2. a Raspberry Pi path ``<prefix>/<file>`` (prefix = 8-hex serial, MAC with dashes, or
   ``settings.rpi.prefix_string``) or a root path of a Pi that dropped its prefix
   (client IP -> MAC) -> the planner's :class:`BootPlan` for that machine -> a file of
   the planned image version's boot tree, or a rendered ``cmdline.txt`` /
   ``config.txt``;
3. a U-Boot name (:mod:`netbootd.tftp.uboot`): the boot script ``dhcp.uboot_bootfile``,
   ``pxelinux.cfg/<name>`` (an extlinux-style config rendered from the plan) or
   ``netbootd/<mac>/<image>/<version>/<artefact>`` (a file of the planned version);
4. anything else -> ERROR 1 (the Pi then tries its next candidate).

The tree sees the rest of the daemon only through the narrow views of
:mod:`netbootd.interfaces` (``Plans``, ``Artefacts``, ``Nodes``, ``Addresses``): it
cannot read past the plan, so it cannot disagree with it.

Files are opened from the version directory the plan names (``Artefacts.open``);
versions are immutable and an open mmap keeps the inode alive, so a hot swap never changes the
bytes of a transfer in flight. Containment is checked on the *resolved* path, so a
symlink in an image cannot point a client outside its boot tree.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..bootfiles import find_ipxe, ipxe_dirs, ipxe_names
from ..model import BootPlan, ClientFacts, ClientKind, normalise_mac
from ..render import RenderError, ServerInfo
from ..rpi import eeprom
from . import codec, uboot

if TYPE_CHECKING:
    from ..interfaces import Addresses, Artefacts, Nodes, Plans
    from ..settings import Settings

log = logging.getLogger("netbootd.tftp.vfs")

#: Files up to this size are read into memory at open; larger ones are mmapped (one
#: syscall to map, none per block, pages shared by every transfer of the same file).
SMALL_FILE = 256 * 1024

_SERIAL = re.compile(r"[0-9a-f]{8}")
_MAC_DASHED = re.compile(r"[0-9a-f]{2}(-[0-9a-f]{2}){5}")
_MAX_PATH = 255


class Refused(Exception):
    """The request cannot be served; ``code``/``message`` go into the ERROR packet."""

    def __init__(self, code: int, message: str, *, log_reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.log_reason = log_reason or message


def not_found(why: str) -> Refused:
    return Refused(codec.ERR_NOT_FOUND, "File not found", log_reason=why)


@dataclass(slots=True)
class FileSource:
    """Bytes for one transfer plus who/what they are for (event fields)."""

    data: bytes | mmap.mmap
    size: int
    name: str
    mac: str | None = None
    image: str | None = None
    version: str | None = None
    origin: str = field(default="", repr=False)  #: disk path or "rendered"
    #: Descriptor of the file ``data`` maps (large files only): the worker pool hands it
    #: to a worker process instead of copying the bytes. Owned by this source.
    fd: int | None = field(default=None, repr=False)
    #: A warning about these bytes for the operator (the transfer's event message), e.g.
    #: a U-Boot config whose append the board may refuse.
    note: str = ""

    def drop_fd(self) -> None:
        """Close the descriptor now (a transfer served from this process needs only
        the mapping)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.drop_fd()
        if isinstance(self.data, mmap.mmap):
            self.data.close()


def normalise(path: str) -> list[str]:
    """Split a request path into safe components.

    ``//`` and a leading ``/`` are normalised away (Pi 5 asks for
    ``<serial>//cmdline.txt``), ``.`` components are dropped; ``..``, NUL, control
    characters and backslashes are refused outright rather than interpreted.
    """
    if len(path) > _MAX_PATH:
        raise Refused(codec.ERR_ACCESS, "Access violation", log_reason="path too long")
    if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in path):
        raise Refused(codec.ERR_ACCESS, "Access violation",
                      log_reason="control character or backslash in path")
    parts = [p for p in path.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise Refused(codec.ERR_ACCESS, "Access violation", log_reason="'..' in path")
    if not parts:
        raise not_found("empty path")
    return parts


def open_file(path: Path) -> tuple[bytes | mmap.mmap, int, int | None]:
    """Open a regular file for serving: small ones as bytes (descriptor closed), large
    ones as an mmap plus the read-only descriptor it maps (a worker process maps the
    same inode from it; whoever serves in-process closes it with ``drop_fd``)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > SMALL_FILE:
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ), size, fd
        chunks, off = [], 0
        while off < size:
            chunk = os.pread(fd, size - off, off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        data = b"".join(chunks)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return data, len(data), None


def _contained(base: Path, rel: str) -> Path | None:
    """``base/rel`` resolved (symlinks followed), or None when it leaves ``base``."""
    try:
        target = (base / rel).resolve()
        target.relative_to(base)
    except (ValueError, OSError, RuntimeError):
        return None
    return target


class VirtualTree:
    """Resolves (path, client) -> :class:`FileSource` through the plan."""

    def __init__(self, settings: Settings, *, plans: Plans, artefacts: Artefacts,
                 nodes: Nodes, addresses: Addresses) -> None:
        self.settings = settings
        self.plans = plans
        self.artefacts = artefacts
        self.nodes = nodes
        self.addresses = addresses

    # -- configuration checks ---------------------------------------------------------------
    def startup_warnings(self) -> list[str]:
        """Problems an operator should see at start (missing iPXE directory/binaries)."""
        dirs = ipxe_dirs(self.settings)
        found = [d for d in dirs if d.is_dir()]
        if not found:
            return [(f"no iPXE directory found ({', '.join(map(str, dirs))}); PXE clients "
                    "will get 'File not found' (install Debian's 'ipxe' package or set "
                    "tftp.ipxe_dir)")]
        d = self.settings.dhcp
        return [f"iPXE boot file {name!r} not found in {', '.join(map(str, found))}"
                for name in (d.bios_bootfile, d.uefi_x64_bootfile)
                if not any((p / name).is_file() for p in found)]

    # -- resolution -------------------------------------------------------------------------
    def open(self, path: str, client_ip: str, local_ip: str) -> FileSource:
        """The bytes a client gets for ``path``; raises :class:`Refused`."""
        parts = normalise(path)
        name = "/".join(parts)
        if len(parts) == 1 and parts[0] == self.settings.dhcp.uefi_arm64_grub_bootfile:
            return self._grub_image(parts[0], client_ip, local_ip)
        if len(parts) == 1 and parts[0] in ipxe_names(self.settings):
            return self._ipxe(parts[0], client_ip)
        if self._is_uboot(parts):
            return self._uboot(parts, name, client_ip, local_ip)
        return self._pi(parts, name, client_ip, local_ip)

    def _ipxe(self, name: str, client_ip: str) -> FileSource:
        p = find_ipxe(self.settings, name)
        if p is None:
            dirs = ", ".join(map(str, ipxe_dirs(self.settings)))
            raise not_found(f"iPXE binary {name} not in {dirs}")
        data, size, fd = open_file(p)
        return FileSource(data, size, name, mac=self.addresses.mac_for(client_ip),
                          origin=str(p), fd=fd)

    def _grub_image(self, name: str, client_ip: str, local_ip: str) -> FileSource:
        """netbootd's GRUB image (found like an iPXE binary) with its server slot filled
        with the address this request reached us on (``ServerInfo.for_arrival``)."""
        src = self._ipxe(name, client_ip)
        try:
            raw = bytes(src.data)
        finally:
            src.close()
        server = ServerInfo.for_arrival(self.settings, local_ip).ip
        data = uboot.fill_server_slot(raw, server)
        return FileSource(data, len(data), name, mac=src.mac, origin=src.origin)

    # -- U-Boot (tftp/uboot.py) ---------------------------------------------------------------
    def _is_uboot(self, parts: list[str]) -> bool:
        return ((len(parts) == 1 and parts[0] == self.settings.dhcp.uboot_bootfile)
                or uboot.is_pxelinux(parts) or uboot.is_grub_cfg(parts)
                or uboot.version_file(parts) is not None)

    def _uboot(self, parts: list[str], name: str, client_ip: str, local_ip: str
               ) -> FileSource:
        """The boot script, a pxelinux.cfg config, GRUB's grub.cfg, or a file of the
        planned version, for the MAC the name carries (``01-<mac>``, ``grub.cfg-<mac>``,
        ``netbootd/<mac>/...``) or, failing that, the MAC behind the client's address.
        Always through the node's plan (a GRUB client is arm64 UEFI, a U-Boot one kind
        ``uboot``; both arm64 for the planner)."""
        wanted = uboot.version_file(parts)
        grub = uboot.is_grub_cfg(parts)
        if wanted:
            mac: str | None = wanted[0]
        elif grub:
            mac = uboot.grub_cfg_mac(parts[1])
        else:
            mac = uboot.pxelinux_mac(parts[1]) if uboot.is_pxelinux(parts) else None
        if mac is None:
            mac = self.addresses.mac_for(client_ip)
        if mac is None:
            raise not_found(f"U-Boot/GRUB {name}: no MAC known for {client_ip}")
        kind = ClientKind.PXE_UEFI_ARM64 if grub else ClientKind.UBOOT
        plan = self.plans.plan(ClientFacts(mac=mac, kind=kind, ip=client_ip))
        if not plan.answers or plan.image is None:
            raise not_found(f"plan for {mac}: {plan.action.value} ({plan.reason})")
        image = plan.image
        meta = {"mac": mac, "image": image.name, "version": image.version}
        if wanted is None:
            if grub:
                data = self.rendered("grub.cfg", plan, local_ip).encode()
            elif uboot.is_pxelinux(parts):
                text = self.rendered("extlinux.conf", plan, local_ip)
                note = "; ".join(
                    f"append is {n} bytes: U-Boot builds with a {uboot.UBOOT_BOOTARGS_SIZE}"
                    "-byte bootargs buffer refuse it (bootarg overflow)"
                    for n in uboot.long_appends(text))
                if note:  # served anyway: the board's U-Boot may have a larger buffer
                    log.warning("pxelinux.cfg for %s: %s", mac, note)
                return FileSource(text.encode(), len(text.encode()), name, origin="rendered",
                                  note=note, **meta)
            else:
                data = uboot.script_image(self.rendered("boot.scr", plan, local_ip))
            return FileSource(data, len(data), name, origin="rendered", **meta)
        _, img, version, rel = wanted
        if (img, version) != (image.name, image.version):
            # A config rendered for another session (or a guessed name): the plan decides.
            raise not_found(f"{img} {version} is not the plan of {mac} "
                            f"({image.name} {image.version})")
        boot = image.boot
        fdtdir = (boot.get("fdtdir") or "").strip("/")
        if rel not in {boot.get(k) for k in ("kernel", "initrd", "fdt")} - {None, ""} and \
                not (fdtdir and rel.startswith(fdtdir + "/")):
            raise not_found(f"{rel} is not a boot file of {image.name} {image.version}")
        target = self.artefacts.open(image, rel)
        if target is None:
            raise not_found(f"{rel} not in {image.name} {image.version}")
        data, size, fd = open_file(target)
        return FileSource(data, size, name, origin=str(target), fd=fd, **meta)

    # -- Raspberry Pi -------------------------------------------------------------------------
    def _pi(self, parts: list[str], name: str, client_ip: str, local_ip: str) -> FileSource:
        serial: str | None = None
        mac: str | None = None
        rest = parts
        if len(parts) > 1:
            first = parts[0].lower()
            prefix_string = self.settings.rpi.prefix_string
            if _SERIAL.fullmatch(first):
                serial = first
                mac = self.nodes.mac_for_serial(serial)
                rest = parts[1:]
            elif _MAC_DASHED.fullmatch(first):
                mac = normalise_mac(first)
                rest = parts[1:]
            elif prefix_string and parts[0] == prefix_string.strip("/"):
                rest = parts[1:]
        if mac is None:
            mac = self.addresses.mac_for(client_ip)
        if mac is None:
            raise not_found(f"no MAC known for {client_ip} (prefix {parts[0]!r})")
        facts = ClientFacts(mac=mac, kind=ClientKind.RPI, serial=serial, ip=client_ip)
        plan = self.plans.plan(facts)
        if not plan.answers or plan.image is None:
            raise not_found(f"plan for {mac}: {plan.action.value} ({plan.reason})")
        rel = "/".join(rest)
        image = plan.image
        meta = {"mac": mac, "image": image.name, "version": image.version}
        if rel in eeprom.NAMES:
            return self._pieeprom(plan, rel, name, meta)
        if rel == "cmdline.txt":
            text = self.rendered("cmdline.txt", plan, local_ip).encode()
            return FileSource(text, len(text), name, origin="rendered", **meta)
        tree, boot = self._boot_tree(plan)
        if rel == "config.txt":
            base = b""
            own = self._boot_file(plan, tree, boot, rel)
            if own is not None:
                base = own.read_bytes()
                if base and not base.endswith(b"\n"):
                    base += b"\n"
            text = base + self.rendered("config.txt", plan, local_ip).encode()
            return FileSource(text, len(text), name, origin="rendered", **meta)
        target = self._boot_file(plan, tree, boot, rel)
        if target is None:
            if _contained(boot, rel) is None:
                raise Refused(codec.ERR_ACCESS, "Access violation",
                              log_reason=f"{rel!r} leaves the boot tree of {image.name}")
            raise not_found(f"{rel} not in {image.name} {image.version}")
        data, size, fd = open_file(target)
        return FileSource(data, size, name, origin=str(target), fd=fd, **meta)

    def _pieeprom(self, plan: BootPlan, rel: str, name: str, meta: dict[str, str]
                  ) -> FileSource:
        """``pieeprom.sig`` / ``pieeprom.upd``: the bootloader update the node's vars name
        (``vars.pieeprom``, netbootd/rpi/eeprom.py), else "File not found" (normal: the
        Pi then keeps its bootloader)."""
        try:
            upd = eeprom.update_for(plan, self.settings)
            if rel == "pieeprom.sig":
                return FileSource(upd.sig, len(upd.sig), name, origin="rendered", **meta)
            data = eeprom.read_update(upd)
        except eeprom.NotOffered as exc:
            raise not_found(f"{rel}: {exc}") from None
        return FileSource(data, len(data), name, origin=str(upd.path), **meta)

    def _boot_tree(self, plan: BootPlan) -> tuple[str, Path]:
        """The plan's boot tree: its name in the version, and its resolved directory."""
        image = plan.image
        assert image is not None
        tree = (image.boot.get("boot_tree", "boot") or "boot").strip("/")
        boot = _contained(image.root.resolve(), tree)
        if boot is None:
            raise Refused(codec.ERR_ACCESS, "Access violation",
                          log_reason=f"boot_tree of {image.name} leaves the image")
        return tree, boot

    def _boot_file(self, plan: BootPlan, tree: str, boot: Path, rel: str) -> Path | None:
        """A file of the version (``Artefacts.open``) that also stays inside its boot
        tree once symlinks are followed."""
        assert plan.image is not None
        path = self.artefacts.open(plan.image, f"{tree}/{rel}")
        if path is None:
            return None
        try:
            path.resolve().relative_to(boot)
        except (ValueError, OSError, RuntimeError):
            return None
        return path

    def rendered(self, artefact: str, plan: BootPlan, local_ip: str) -> str:
        """Render a per-node file. A template error is a refusal the operator sees in
        the log and the event timeline, never a crash."""
        try:
            return self.artefacts.renderer().render(
                artefact, plan, ServerInfo.for_arrival(self.settings, local_ip))
        except RenderError as exc:
            log.error("tftp: cannot render %s for %s: %s", artefact, plan.mac, exc)
            raise Refused(codec.ERR_UNDEFINED, f"cannot render {artefact}",
                          log_reason=str(exc)) from exc
