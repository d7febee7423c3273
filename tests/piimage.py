"""A Raspberry Pi OS style SD-card image, made the way the real one is laid out.

MBR (sfdisk on a plain file), partition 1 FAT32 (type 0x0c) with the Pi 5 boot file
names, partition 2 Linux (0x83) ext4 made with ``mkfs.ext4 -d`` from a small root tree
with the things an import must keep: a setuid-root binary, a user's home owned by uid
1000, a sticky /tmp, an absolute symlink, a device node (skipped), and Raspberry Pi
OS's fstab and cmdline.txt (PARTUUID roots, a first-boot ``init=``). Each partition is
made as a file and ``dd``'d into the disk file: no loop devices, no mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = ("sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4", "debugfs", "dd", "xz")
PARTUUID = "3a1b2c4d"
CMDLINE = (f"console=serial0,115200 console=tty1 root=PARTUUID={PARTUUID}-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot "
           "cfg80211.ieee80211_regdom=GB\n")
FSTAB = (f"proc            /proc           proc    defaults          0       0\n"
         f"PARTUUID={PARTUUID}-01  /boot/firmware  vfat    defaults          0       2\n"
         f"PARTUUID={PARTUUID}-02  /               ext4    defaults,noatime  0       1\n"
         "# a comment the import may drop\n"
         "nas:/srv/media  /media/nas      nfs     defaults,_netdev  0       0\n")
#: Boot partition: name -> size (small stand-ins with the real names).
BOOT_FILES = {
    "bootcode.bin": 52_000, "start4.elf": 220_000, "fixup4.dat": 5_400,
    "kernel_2712.img": 900_000, "kernel8.img": 800_000, "initramfs_2712": 400_000,
    "bcm2712-rpi-5-b.dtb": 80_000, "bcm2711-rpi-4-b.dtb": 52_000,
    "overlays/overlay_map.dtb": 6_000, "overlays/bcm2712d0.dtbo": 1468 * 2,
    "overlays/vc4-kms-v3d-pi5.dtbo": 4_100, "overlays/README": 900,
}
CONFIG = "# Raspberry Pi OS config.txt\narm_64bit=1\ndtoverlay=vc4-kms-v3d-pi5\n[pi5]\n" \
         "dtoverlay=bcm2712d0\n[all]\n"


def need_tools() -> None:
    """Fail (never skip) when a tool is missing: setup.sh installs them for CI."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: apt-get install mtools dosfstools e2fsprogs "
                    "fdisk xz-utils (./setup.sh test installs them)")
    if os.geteuid() != 0:
        pytest.fail("the Pi image import tests run as root (owners in the rootfs)")


def boot_tree(dest: Path) -> Path:
    for rel, size in BOOT_FILES.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    (dest / "config.txt").write_text(CONFIG)
    (dest / "cmdline.txt").write_text(CMDLINE)
    return dest


def root_tree(dest: Path) -> Path:
    for d in ("etc", "usr/bin", "usr/sbin", "home/pi", "tmp", "var/log", "dev", "sbin",
              "usr/lib/systemd"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "etc" / "fstab").write_text(FSTAB)
    (dest / "etc" / "hostname").write_text("raspberrypi\n")
    (dest / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(dest / "etc" / "shadow", 0o640)
    os.chown(dest / "etc" / "shadow", 0, 42)
    shutil.copy(shutil.which("true") or "/bin/true", dest / "usr" / "bin" / "sudo")
    os.chown(dest / "usr" / "bin" / "sudo", 0, 0)
    os.chmod(dest / "usr" / "bin" / "sudo", 0o4755)
    (dest / "usr" / "bin" / "wall").write_bytes(b"#!/bin/sh\n")
    os.chown(dest / "usr" / "bin" / "wall", 0, 5)
    os.chmod(dest / "usr" / "bin" / "wall", 0o2755)
    (dest / "home" / "pi" / ".bashrc").write_text("# pi\n")
    for p in (dest / "home" / "pi", dest / "home" / "pi" / ".bashrc"):
        os.chown(p, 1000, 1000)
    os.chmod(dest / "home" / "pi", 0o700)
    os.chmod(dest / "tmp", 0o1777)
    (dest / "usr" / "lib" / "systemd" / "systemd").write_bytes(b"\x7fELF stand-in\n")
    os.chmod(dest / "usr" / "lib" / "systemd" / "systemd", 0o755)
    os.symlink("/usr/lib/systemd/systemd", dest / "sbin" / "init")
    os.mknod(dest / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    return dest


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def make_pi_image(work: Path, *, xz: bool = False, boot: Path | None = None,
                  root: Path | None = None, layout: str = "pi") -> Path:
    """The disk image file (``.img`` or ``.img.xz``). ``layout="one-ext4"`` makes an image
    with a single Linux partition (not a Pi image)."""
    need_tools()
    work.mkdir(parents=True, exist_ok=True)
    boot = boot or boot_tree(work / "boot-src")
    root = root or root_tree(work / "root-src")
    disk = work / "2025-05-13-raspios-test-arm64.img"
    mib = 1 << 20
    boot_mb, root_mb = 16, 24
    start1, start2 = 4, 4 + boot_mb
    with open(disk, "wb") as fh:
        fh.truncate((start2 + root_mb + 1) * mib)
    if layout == "one-ext4":
        table = f"label: dos\nlabel-id: 0x{PARTUUID}\nstart={start1 * 2048}, " \
                f"size={root_mb * 2048}, type=83\n"
    else:
        table = (f"label: dos\nlabel-id: 0x{PARTUUID}\n"
                 f"start={start1 * 2048}, size={boot_mb * 2048}, type=c\n"
                 f"start={start2 * 2048}, size={root_mb * 2048}, type=83\n")
    _run("sfdisk", "--no-reread", "--no-tell-kernel", str(disk), stdin=table)
    rootpart = work / "root.part"
    _run("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(root), str(rootpart),
         f"{root_mb}M")
    if layout == "one-ext4":
        _run("dd", f"if={rootpart}", f"of={disk}", "bs=1M", f"seek={start1}", "conv=notrunc",
             "status=none")
    else:
        bootpart = work / "boot.part"
        bootpart.unlink(missing_ok=True)
        _run("mkfs.vfat", "-n", "bootfs", "-C", str(bootpart),
             str(boot_mb * 1024))
        _run("mcopy", "-s", "-i", str(bootpart), *[str(p) for p in sorted(boot.iterdir())],
             "::/")
        for part, start in ((bootpart, start1), (rootpart, start2)):
            _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start}", "conv=notrunc",
                 "status=none")
        bootpart.unlink()
    rootpart.unlink()
    if xz:
        _run("xz", "-0", "-T1", "-f", str(disk))
        return disk.with_name(disk.name + ".xz")
    return disk
