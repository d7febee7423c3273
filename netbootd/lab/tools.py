"""What the lab needs from the host, and small helpers shared by the tests and the demo.

Kept apart from the fixtures so the demo command and the test files import one list of
tools and one install hint (the tests run with ``--import-mode=importlib``, where test
modules cannot import from ``conftest``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from .netns import missing_tools

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "images" / "build_image.py"

APT_PACKAGES = ("qemu-system-x86 ipxe-qemu ipxe ovmf dnsmasq-base busybox-static tcpdump "
                "nfs-ganesha nfs-ganesha-vfs rpcbind curl qemu-system-arm u-boot-qemu "
                "qemu-efi-aarch64 grub-common")
APT_HINT = f"apt-get install {APT_PACKAGES}"
LAB_TOOLS = ["ip", "dnsmasq", "tcpdump", "curl", "unshare"]
GUEST_TOOLS = ["qemu-system-x86_64", "timeout", "/bin/busybox", "apt-get", "dpkg-deb"]
NFS_TOOLS = ["rpcbind", "ganesha.nfsd"]
#: arm64 guests: QEMU's virt machine with Debian's U-Boot for it (u-boot-qemu).
ARM64_GUEST_TOOLS = ["qemu-system-aarch64", "timeout", "apt-get", "dpkg-deb",
                     "/usr/lib/u-boot/qemu_arm64/u-boot.bin"]
#: arm64 UEFI guests: AAVMF (qemu-efi-aarch64) and grub-mkimage (grub-common) for the GRUB
#: network image (images/build_grub.py).
ARM64_UEFI_TOOLS = ["qemu-system-aarch64", "timeout", "apt-get", "dpkg-deb", "grub-mkimage",
                    "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"]
GRUB_BUILDER = REPO / "images" / "build_grub.py"


def lab_problem(tools: list[str]) -> str | None:
    """Why a lab cannot run here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, taps, QEMU on a bridge)"
    missing = missing_tools(tools)
    if missing:
        return f"missing {', '.join(missing)}; install with: {APT_HINT}"
    return None


def require(tools: list[str]) -> None:
    """pytest: fail (never skip) the calling test with the reason when the lab cannot run.
    ``./setup.sh test`` installs every tool and runs as root, so a missing one is a broken
    machine, and a skip would turn a test that did not run green."""
    import pytest

    reason = lab_problem(tools)
    if reason:
        pytest.fail(f"the lab cannot run here: {reason}", pytrace=False)


def load_builder() -> ModuleType:
    """images/build_image.py as a module (it is a stdlib-only script, not a package)."""
    spec = importlib.util.spec_from_file_location("netbootd_build_image", BUILDER)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def drop_build(build: Path, incoming: Path) -> Path:
    """Copy a build into ``incoming`` the way CI does: a dot-prefixed temp name (ignored by
    the store's watcher), then one atomic rename."""
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f".{build.name}.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(build, tmp, symlinks=True)
    final = incoming / build.name
    tmp.rename(final)
    return final
