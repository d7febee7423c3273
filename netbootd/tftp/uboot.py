"""What U-Boot fetches over TFTP, as names and bytes: pure functions, no I/O.

U-Boot's network boot, as read in its source (``net/bootp.c``, ``cmd/pxe.c``,
``boot/pxe_utils.c``, ``include/config_distro_bootcmd.h``) and seen on the wire in
``tests/e2e/test_boot_arm64.py``:

* ``bootcmd_dhcp`` (distro boot) runs ``dhcp ${scriptaddr} boot.scr.uimg`` and ``source``\\ s
  the result: a *legacy image* of type "script" (64-byte header, two CRC32s, a list of
  part lengths, then the text). :func:`script_image` builds one.
* ``pxe get`` asks, next to the directory of ``$bootfile``, for ``pxelinux.cfg/01-<mac>``
  (MAC with dashes), then the client IP in upper-case hex, shortened one digit at a time
  (``C0A80001``, ``C0A8000``, ... ``C``), then ``default-<arch>-<soc>-<board>``,
  ``default-<arch>-<soc>``, ``default-<arch>`` and ``default``. :func:`pxelinux_mac`
  says which name carries a MAC; every other ``pxelinux.cfg/`` name is answered for the
  MAC behind the client's address.
* ``pxe boot`` fetches ``kernel``, ``initrd`` and ``fdt`` over TFTP, relative to the same
  directory: netbootd names them ``netbootd/<mac>/<image>/<version>/<artefact>``
  (:func:`version_file`), so the version is in the name, like ``/files/`` URLs over HTTP.
  It copies the label's ``append`` into a ``CONFIG_SYS_CBSIZE`` buffer and refuses a longer
  one ("bootarg overflow"): :func:`long_appends` finds them before a board does.

netbootd's GRUB image for arm64 UEFI (images/build_grub.py) asks for
``grub/grub.cfg-<mac>`` (:func:`is_grub_cfg`) and then the same version files.
"""

from __future__ import annotations

import re
import struct
import zlib

from ..model import normalise_mac

#: Legacy image header (include/image.h): magic, header CRC, time, data size, load address,
#: entry point, data CRC, then OS, arch, type, compression (one byte each), 32-byte name.
_HEADER = struct.Struct(">7I4B32s")
IH_MAGIC = 0x27051956
IH_OS_LINUX = 5
IH_ARCH_ARM64 = 22
IH_TYPE_SCRIPT = 6
IH_COMP_NONE = 0

PXELINUX_DIR = "pxelinux.cfg"
#: First component of the version files U-Boot's pxe fetches (render.py's ``tftp.*``).
VERSION_DIR = "netbootd"

_MAC_NAME = re.compile(r"01-([0-9a-f]{2}(?:-[0-9a-f]{2}){5})")


def script_image(text: str, name: str = "netbootd boot script") -> bytes:
    """``text`` as a U-Boot legacy script image (what ``mkimage -T script`` makes).

    The data part is a zero-terminated list of part lengths (one part) followed by the
    script. The timestamp is 0, so the same text always gives the same bytes; ``source``
    checks magic, both CRCs and the type, not the architecture.
    """
    body = text.encode()
    data = struct.pack(">II", len(body), 0) + body
    fields = [IH_MAGIC, 0, 0, len(data), 0, 0, zlib.crc32(data), IH_OS_LINUX,
              IH_ARCH_ARM64, IH_TYPE_SCRIPT, IH_COMP_NONE, name.encode()[:31]]
    fields[1] = zlib.crc32(_HEADER.pack(*fields))
    return _HEADER.pack(*fields) + data


def is_pxelinux(parts: list[str]) -> bool:
    """``pxelinux.cfg/<name>``: a U-Boot (or PXELINUX) configuration request."""
    return len(parts) == 2 and parts[0] == PXELINUX_DIR


def pxelinux_mac(name: str) -> str | None:
    """The MAC in ``01-aa-bb-cc-dd-ee-ff`` (htype 1 = Ethernet), else None."""
    m = _MAC_NAME.fullmatch(name.lower())
    return normalise_mac(m.group(1)) if m else None


#: ``CONFIG_SYS_CBSIZE`` of Debian's U-Boot 2023.01 for qemu_arm64, measured: "bootarg
#: overflow 1163+0+0+1 > 512". pxe_utils needs ``len(append) + 1 <= CBSIZE`` (no ipappend),
#: so an append of 512 bytes or more never boots. Other builds may allow more (1024, 2048);
#: netbootd warns at this size because it is the smallest seen.
UBOOT_BOOTARGS_SIZE = 512

_APPEND = re.compile(r"^[ \t]*append[ \t]+(.*)$", re.MULTILINE | re.IGNORECASE)


def long_appends(config: str, size: int = UBOOT_BOOTARGS_SIZE) -> list[int]:
    """Lengths (bytes) of the ``append`` lines of an extlinux config that do not fit a
    ``size``-byte bootargs buffer: U-Boot prints "bootarg overflow" and boots nothing.
    Why it matters: the append carries the version's NFS root path, the seed URL and the
    boot's token, so a deep store path alone can push it over."""
    return [n for m in _APPEND.finditer(config) if (n := len(m.group(1).encode())) + 1 > size]


GRUB_DIR = "grub"
_GRUB_CFG = "grub.cfg"


#: The 48 bytes in netbootd's GRUB image (images/build_grub.py ``SERVER_SLOT``) that TFTP
#: fills with the server's address when it serves the image: GRUB 2.06 takes its server
#: from the firmware's cached DHCP ACK (the site server's), not from the proxy offer.
GRUB_SERVER_SLOT = b"@netbootd-server" + b"@" * 32


def fill_server_slot(image: bytes, server_ip: str) -> bytes:
    """``image`` with its server slot overwritten by ``server_ip`` (space-padded, so the
    length and every offset stay the same); unchanged when it has no slot (an operator's
    own GRUB build)."""
    value = server_ip.encode("ascii")
    if len(value) > len(GRUB_SERVER_SLOT):
        raise ValueError(f"address {server_ip!r} does not fit the GRUB server slot")
    return image.replace(GRUB_SERVER_SLOT, value.ljust(len(GRUB_SERVER_SLOT)))


def is_grub_cfg(parts: list[str]) -> bool:
    """``grub/grub.cfg`` or ``grub/grub.cfg-<suffix>``: asked by netbootd's GRUB image."""
    return len(parts) == 2 and parts[0] == GRUB_DIR and (
        parts[1] == _GRUB_CFG or parts[1].startswith(_GRUB_CFG + "-"))


def grub_cfg_mac(name: str) -> str | None:
    """The MAC in ``grub.cfg-<mac>`` (GRUB's ``$net_default_mac``: colons; dashes and a
    ``01-`` prefix, GRUB's own search names, are taken too), else None."""
    suffix = name.removeprefix(_GRUB_CFG + "-")
    if suffix == name:
        return None
    try:
        return normalise_mac(suffix)
    except ValueError:
        return pxelinux_mac(suffix)


def version_file(parts: list[str]) -> tuple[str, str, str, str] | None:
    """``netbootd/<mac>/<image>/<version>/<artefact...>`` -> (mac, image, version,
    artefact), else None."""
    if len(parts) < 5 or parts[0] != VERSION_DIR:
        return None
    try:
        mac = normalise_mac(parts[1])
    except ValueError:
        return None
    return mac, parts[2], parts[3], "/".join(parts[4:])


__all__ = ["GRUB_SERVER_SLOT", "UBOOT_BOOTARGS_SIZE", "fill_server_slot", "grub_cfg_mac",
           "is_grub_cfg", "is_pxelinux", "long_appends", "pxelinux_mac", "script_image",
           "version_file"]
