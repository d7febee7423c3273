"""The iPXE boot files netbootd serves, and where it finds them: one place for both.

TFTP serves them at the root for PXE firmware; HTTP serves them under ``/ipxe/`` for
UEFI HTTP-boot clients; proxy-DHCP names them. All three ask here, so a renamed boot
file in settings or an extra directory works on every path at once.
"""

from __future__ import annotations

from pathlib import Path

from .settings import Settings

#: iPXE binaries a client may fetch by name (Debian's ``ipxe`` package ships most of them).
#: The boot file names configured in ``settings.dhcp`` are added at run time.
IPXE_NAMES = frozenset({
    "undionly.kpxe", "undionly.kkpxe", "undionly.kkkpxe", "ipxe.pxe", "ipxe.kpxe",
    "ipxe.efi", "snponly.efi", "snp.efi", "ipxe-arm64.efi", "ipxe.lkrn",
})


def configured_names(settings: Settings) -> frozenset[str]:
    """The boot file names proxy-DHCP hands out (only plain names, never paths)."""
    d = settings.dhcp
    return frozenset(n for n in (d.bios_bootfile, d.uefi_x64_bootfile, d.uefi_arm64_bootfile,
                                 d.uefi_arm64_grub_bootfile)
                     if n and "/" not in n and not n.startswith("."))


def ipxe_names(settings: Settings) -> frozenset[str]:
    """Every name that is served as an iPXE binary."""
    return IPXE_NAMES | configured_names(settings)


def ipxe_dirs(settings: Settings) -> list[Path]:
    """Where iPXE binaries are looked up, in order."""
    t = settings.tftp
    return [t.ipxe_dir, *t.extra_ipxe_dirs]


def find_ipxe(settings: Settings, name: str) -> Path | None:
    """The file for an iPXE binary name, or None (not an iPXE name, or not installed)."""
    if name not in ipxe_names(settings):
        return None
    for d in ipxe_dirs(settings):
        path = d / name
        if path.is_file():
            return path
    return None
