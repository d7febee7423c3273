#!/usr/bin/env python3
"""Build netbootd's test/demo images: a Debian cloud kernel + busybox initrd + busybox NFS rootfs.

Standard library only, so it runs before the project's venv exists (the bootstrap that
creates the embedded demo image calls it with the system python3).

Two kinds of build:

* default, kind ``kernel+initrd``: Debian's cloud kernel (``apt-get download`` of the versioned
  package behind ``linux-image-cloud-amd64``, cached in ``--cache``), an initrd made of
  busybox-static + the virtio-net and NFS modules + an ``/init`` that takes a DHCP lease,
  reports ``booted`` to netbootd's events API and, when the command line has ``nfsroot=``,
  mounts it and switch_roots into the busybox rootfs, whose ``/sbin/init`` reports
  ``provisioned``. Both print ``NETBOOTD-TEST:`` markers on the serial console.
* ``--arch arm64``: the same kernel+initrd image for arm64 boards (U-Boot, UEFI): Debian's
  ``linux-image-cloud-arm64`` and ``busybox-static:arm64``, fetched with ``apt-get download``
  (the host needs ``dpkg --add-architecture arm64`` and an ``apt-get update``; setup.sh does
  it), boards ``["arm64"]``, console ``ttyAMA0``. The same ``/init`` runs on both.
* ``--pi``, kind ``pi-boot+rootfs``: a synthetic Raspberry Pi 5 boot tree (config.txt,
  kernel_2712.img, bcm2712-rpi-5-b.dtb, initramfs_2712, overlays/...) with realistic sizes
  (~33 MB by default) and pseudo-random content that differs per version, plus a tiny rootfs.
  For Pi protocol tests and TFTP benchmarks, not for a real Pi.

Output: a build directory with ``manifest.json`` (docs/store.md), assembled under
a dot-prefixed temporary name inside the destination directory and renamed into place in one
step (the store's drop protocol: half-written builds are never visible under their final
name). Destination: ``--incoming DIR`` (default ``images/incoming`` next to this script) or
``--out DIR`` (the build directory itself; must not exist).

Why hand-written pieces: the initrd is a ``newc`` cpio archive written here (30 lines) because
the ``cpio`` package is not installed on the target machines and busybox cpio cannot create
device nodes from a tree we do not own as root.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")


#: Load order matters: each module needs the ones before it (lab.md pitfall 6).
NET_MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
               "virtio_pci", "failover", "net_failover", "virtio_net"]
NFS_MODULES = ["sunrpc", "grace", "lockd", "nfs_acl", "netfs", "fscache", "nfs", "nfsv3"]

MARKER = "NETBOOTD-TEST:"
#: Bumped whenever the initrd/rootfs scripts change: caches of built images (the
#: ``netbootd lab`` demo) are keyed by it, so an old build is not reused after a change.
RECIPE = "3"


class Arch:
    """What differs between the architectures the kernel+initrd image is built for."""

    def __init__(self, name: str, *, meta: str, boards: list[str], console: str,
                 foreign: bool, net_modules: list[str]) -> None:
        self.name = name
        #: virtio NIC modules in load order; arm64 boards may have virtio-mmio NICs too.
        self.net_modules = net_modules
        self.meta = meta  #: the kernel meta package (``apt-cache depends`` names the real one)
        self.boards = boards
        self.console = console
        #: A foreign Debian architecture here: packages are fetched as ``pkg:<name>`` and
        #: busybox comes from ``busybox-static:<name>`` instead of the host's /bin/busybox.
        self.foreign = foreign


ARCHES = {
    "amd64": Arch("amd64", meta=KERNEL_META_PACKAGE, boards=["x86_64"], console="ttyS0",
                  foreign=False, net_modules=NET_MODULES),
    # QEMU's virt machine with U-Boot 2023.01 uses a virtio-mmio NIC (virtio-net-device):
    # U-Boot reads a virtio-net-pci NIC's MAC as its first byte six times (52:52:52:...).
    "arm64": Arch("arm64", meta="linux-image-cloud-arm64", boards=["arm64"],
                  console="ttyAMA0", foreign=True,
                  net_modules=NET_MODULES[:2] + ["virtio_mmio"] + NET_MODULES[2:]),
}


class BuildError(RuntimeError):
    """A build step failed; the message says what to install or fix."""


def progress(msg: str) -> None:
    print(f"build-image: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- kernel

def _kernel_package(meta: str = KERNEL_META_PACKAGE) -> str | None:
    """The versioned kernel package the meta package depends on, or None if apt can't say.
    For a foreign architecture apt names it ``pkg:arch``, which ``apt-get download`` takes."""
    try:
        out = subprocess.run(["apt-cache", "depends", meta], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    return None


def fetch_kernel(cache: Path, arch: str = "amd64") -> Path:
    """Return a directory holding ``vmlinuz`` and ``modules/<name>.ko``, cached per version.

    Downloads with ``apt-get download`` (no root needed, no install) and extracts only what
    the initrd needs, so the cache stays ~10 MB per kernel. Offline, the newest cached kernel
    of ``arch`` is reused.
    """
    cache.mkdir(parents=True, exist_ok=True)
    meta = ARCHES[arch].meta
    pkg = _kernel_package(meta)
    if pkg is None:
        cached = sorted(p for p in cache.glob("kernel-*")
                        if p.name.endswith(f"-{arch}") and (p / "vmlinuz").exists())
        if not cached:
            hint = (f" (a foreign architecture: dpkg --add-architecture {arch} && "
                    "apt-get update)" if ARCHES[arch].foreign else "")
            raise BuildError(f"cannot resolve {meta} with apt-cache{hint} and no "
                             f"kernel is cached in {cache}")
        progress(f"apt-cache unavailable; using cached {cached[-1].name}")
        return cached[-1]
    kdir = cache / f"kernel-{pkg.split(':')[0]}"
    wanted = ARCHES[arch].net_modules + NFS_MODULES
    if (kdir / "vmlinuz").exists() and all((kdir / "modules" / f"{m}.ko").exists()
                                           for m in wanted):
        progress(f"kernel {pkg}: cached")
        return kdir
    debs = download_kernel_deb(cache, pkg)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        progress(f"extracting {debs[-1].name}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), tmp], check=True)
        root = Path(tmp)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        moddirs = sorted((root / "lib" / "modules").glob("*"))
        if not vmlinuz or not moddirs:
            raise BuildError(f"{debs[-1].name} has no /boot/vmlinuz-* or /lib/modules")
        stage = cache / f".{kdir.name}.tmp"
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[-1], stage / "vmlinuz")
        (stage / "release").write_text(moddirs[-1].name + "\n")
        for name in wanted:
            found = _find_module(moddirs[-1], name)
            shutil.copy2(found, stage / "modules" / (name + ".ko"))
        shutil.rmtree(kdir, ignore_errors=True)
        stage.rename(kdir)
    for deb in debs:  # the extracted subset is all we keep
        deb.unlink()
    return kdir


def download_kernel_deb(cache: Path, pkg: str) -> list[Path]:
    """The kernel package's .deb(s) in ``cache``, downloaded now if none is there.
    The caller extracts what it needs and deletes them."""
    base = pkg.split(":")[0]  # a foreign package is asked for as pkg:arch, saved as pkg_*
    debs = sorted(cache.glob(f"{base}_*.deb"))
    if not debs:
        progress(f"downloading {pkg} (apt-get download, ~27 MB)")
        try:
            subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BuildError(f"apt-get download {pkg} failed: {exc}") from exc
        debs = sorted(cache.glob(f"{base}_*.deb"))
        if not debs:
            raise BuildError(f"apt-get download {pkg} produced no .deb in {cache}")
    return debs


def download_deb(cache: Path, package: str, arch: str) -> list[Path]:
    """``package:arch``'s .deb in ``cache``, downloaded now (``apt-get download``) if none is
    there. The caller extracts what it needs and deletes it."""
    cache.mkdir(parents=True, exist_ok=True)
    pkg = f"{package}:{arch}"
    debs = sorted(cache.glob(f"{package}_*_{arch}.deb"))
    if not debs:
        progress(f"downloading {pkg} (apt-get download)")
        try:
            subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
                           cwd=cache, check=True, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BuildError(f"apt-get download {pkg} failed ({exc}); the host needs "
                             f"dpkg --add-architecture {arch} && apt-get update") from exc
        debs = sorted(cache.glob(f"{package}_*_{arch}.deb"))
        if not debs:
            raise BuildError(f"apt-get download {pkg} produced no .deb in {cache}")
    return debs


def fetch_busybox(cache: Path, arch: str = "amd64") -> Path:
    """The static busybox for ``arch``: the host's for its own architecture, else the one in
    Debian's ``busybox-static:<arch>`` (``apt-get download``, extracted once into ``cache``)."""
    if not ARCHES[arch].foreign:
        if not BUSYBOX.exists():
            raise BuildError(f"{BUSYBOX} missing: apt-get install busybox-static")
        return BUSYBOX
    target = cache / f"busybox-{arch}" / "busybox"
    if target.exists():
        return target
    debs = download_deb(cache, "busybox-static", arch)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), tmp], check=True)
        found = Path(tmp) / "bin" / "busybox"
        if not found.is_file():
            raise BuildError(f"{debs[-1].name} has no /bin/busybox")
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(".busybox.tmp")
        shutil.copy2(found, part)
        part.rename(target)
    for deb in debs:
        deb.unlink()
    return target


def _find_module(moddir: Path, name: str) -> Path:
    for cand in moddir.rglob(name + ".ko*"):
        if cand.name == name + ".ko":
            return cand
        # Debian 12's cloud kernel ships uncompressed modules; a compressed one would need
        # decompressing here (busybox insmod cannot load .ko.xz).
        raise BuildError(f"module {cand.name} is compressed; not supported by this builder")
    raise BuildError(f"module {name}.ko not found under {moddir}")


# --------------------------------------------------------------------------- cpio

class Cpio:
    """A minimal ``newc`` (SVR4, no CRC) cpio writer: what the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.buf.write(hdr + encoded)
        self.buf.write(b"\0" * (-(len(hdr) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# --------------------------------------------------------------------------- scripts

# Shared shell helpers: reading the command line and reporting an event. `report` never
# fails the boot: a missing events URL or an unreachable server only logs.
SH_COMMON = r"""
bb=/bin/busybox
arg() { # arg NAME -> value of NAME=... on the kernel command line
    for w in $CMDLINE; do case "$w" in "$1="*) echo "${w#*=}"; return;; esac; done
}
json_escape() { $bb printf '%s' "$1" | $bb sed 's/\\/\\\\/g; s/"/\\"/g'; }
report() { # report PHASE MESSAGE
    echo "NETBOOTD-TEST: $1 version=$VERSION image=$IMAGE mac=$MAC message=$2"
    [ -n "$EVENTS" ] || { echo "NETBOOTD-TEST: no netbootd.events= on the cmdline"; return 0; }
    body="{\"mac\":\"$MAC\",\"phase\":\"$1\",\"message\":\"$(json_escape "$2")\",\"version\":\"$VERSION\",\"image\":\"$IMAGE\",\"token\":\"$(arg netbootd.token)\"}"
    i=0
    while [ $i -lt 5 ]; do
        # busybox 1.35's `wget -T` segfaults (Debian 12 busybox-static): use `timeout`.
        if $bb timeout 10 $bb wget -q -O /dev/null \
                --header 'Content-Type: application/json' --post-data "$body" "$EVENTS"; then
            echo "NETBOOTD-TEST: reported $1"; return 0
        fi
        i=$((i + 1)); $bb sleep 1
    done
    echo "NETBOOTD-TEST: report $1 to $EVENTS failed"
}
"""

INIT = r"""#!/bin/busybox sh
# netbootd test initrd: network up, report "booted", optional NFS root + switch_root.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt/root /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
CMDLINE="$(cat /proc/cmdline)"
. /etc/netbootd-common.sh
VERSION="$(cat /etc/netbootd-version)"
IMAGE="$(cat /etc/netbootd-image)"
echo "NETBOOTD-TEST: init version=$VERSION image=$IMAGE marker=$(cat /etc/netbootd-marker)"
for m in __NET_MODULES__; do insmod /lib/modules/$m.ko || echo "NETBOOTD-TEST: insmod $m failed"; done
IFACE=eth0
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/$IFACE ] && break; sleep 0.2; done
MAC="$(arg netbootd.mac)"
[ -n "$MAC" ] || MAC="$(cat /sys/class/net/$IFACE/address)"
EVENTS="$(arg netbootd.events)"
ip link set lo up
ip link set $IFACE up
if udhcpc -i $IFACE -s /etc/udhcpc.script -t 10 -T 2 -n -q -O hostname; then
    ADDR="$(ip -4 -o addr show dev $IFACE | awk '{print $4}')"
    echo "NETBOOTD-TEST: dhcp ok addr=$ADDR"
else
    echo "NETBOOTD-TEST: dhcp failed"
fi
export CMDLINE VERSION IMAGE MAC EVENTS
NFSROOT="$(arg nfsroot)"
if [ -z "$NFSROOT" ]; then
    report booted "initrd up, planned version $(arg netbootd.version)"
    echo "NETBOOTD-TEST: idle"
    while true; do sleep 3600; done
fi
for m in __NFS_MODULES__; do insmod /lib/modules/$m.ko || echo "NETBOOTD-TEST: insmod $m failed"; done
SPEC="${NFSROOT%%,*}"          # server:/path
OPTS="${NFSROOT#"$SPEC"}"; OPTS="${OPTS#,}"
SERVER="${SPEC%%:*}"
# busybox mount passes options to the kernel as text: the kernel needs addr= and nolock.
MOPTS="ro,nolock,vers=3,tcp,addr=$SERVER"
[ -n "$OPTS" ] && MOPTS="$MOPTS,$OPTS"
# netbootd.nfs_ports=NFS:MOUNTD names both ports, so the kernel skips its rpcbind queries
# (useful when rpcbind refuses remote callers).
PORTS="$(arg netbootd.nfs_ports)"
[ -n "$PORTS" ] && MOPTS="$MOPTS,port=${PORTS%%:*},mountport=${PORTS#*:},mountproto=tcp"
ok=
for i in 1 2 3 4 5; do
    if mount -t nfs -o "$MOPTS" "$SPEC" /mnt/root; then ok=1; break; fi
    sleep 1
done
if [ -z "$ok" ]; then
    report failed "nfs mount $SPEC failed"
    while true; do sleep 3600; done
fi
report booted "nfs root mounted $SPEC"
mount --move /dev /mnt/root/dev 2>/dev/null
mount --move /proc /mnt/root/proc 2>/dev/null
mount --move /sys /mnt/root/sys 2>/dev/null
echo "NETBOOTD-TEST: switch_root"
exec switch_root /mnt/root /sbin/init
"""

UDHCPC_SCRIPT = r"""#!/bin/busybox sh
# udhcpc event script: configure the address, default route and resolver.
case "$1" in
deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "NETBOOTD-TEST: lease $ip/${mask:-24} router=${router:-none} server=${serverid:-?}"
    ;;
esac
exit 0
"""

# The rootfs is read-only NFS: applets are installed into a tmpfs on /run, and the
# initrd passes what it knows through the environment (switch_root keeps it).
ROOTFS_INIT = r"""#!/bin/busybox sh
# netbootd test rootfs init (runs from the NFS root after switch_root).
/bin/busybox mount -t tmpfs tmpfs /run 2>/dev/null
/bin/busybox mkdir -p /run/bin
/bin/busybox --install -s /run/bin
export PATH=/run/bin
mount -t proc proc /proc 2>/dev/null
[ -n "$CMDLINE" ] || CMDLINE="$(cat /proc/cmdline)"
. /etc/netbootd-common.sh
VERSION="$(cat /etc/netbootd-version)"
IMAGE="$(cat /etc/netbootd-image)"
[ -n "$MAC" ] || MAC="$(cat /sys/class/net/eth0/address)"
[ -n "$EVENTS" ] || EVENTS="$(arg netbootd.events)"
echo "NETBOOTD-TEST: rootfs init version=$VERSION marker=$(cat /etc/netbootd-marker)"
report provisioned "nfs root up"
echo "NETBOOTD-TEST: idle"
while true; do sleep 3600; done
"""


# --------------------------------------------------------------------------- builders

def build_initrd(kdir: Path, *, name: str, version: str, marker: str,
                 busybox: Path = BUSYBOX, net_modules: list[str] = NET_MODULES) -> bytes:
    """The gzip-compressed newc initrd (busybox, modules, /init, version files)."""
    cp = Cpio()
    for d in ("bin", "sbin", "etc", "lib", "lib/modules", "proc", "sys", "dev", "tmp", "run",
              "mnt", "mnt/root", "usr", "usr/bin", "usr/sbin"):
        cp.dir(d)
    cp.chardev("dev/console", 5, 1)
    cp.chardev("dev/null", 1, 3, 0o666)
    cp.file("bin/busybox", busybox.read_bytes(), 0o755)
    cp.symlink("bin/sh", "busybox")
    init = INIT.replace("__NET_MODULES__", " ".join(net_modules)).replace(
        "__NFS_MODULES__", " ".join(NFS_MODULES))
    cp.file("init", init.encode(), 0o755)
    cp.file("etc/netbootd-common.sh", SH_COMMON.encode())
    cp.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    cp.file("etc/netbootd-version", (version + "\n").encode())
    cp.file("etc/netbootd-image", (name + "\n").encode())
    cp.file("etc/netbootd-marker", (marker + "\n").encode())
    for mod in net_modules + NFS_MODULES:
        cp.file(f"lib/modules/{mod}.ko", (kdir / "modules" / f"{mod}.ko").read_bytes())
    # mtime=0 and a fixed level: the same inputs give the same bytes (reproducible).
    return gzip.compress(cp.finish(), compresslevel=6, mtime=0)


def write_rootfs(root: Path, *, name: str, version: str, marker: str,
                 with_busybox: bool = True, busybox: Path = BUSYBOX) -> None:
    """A tiny busybox root: regular files only (no symlinks, no device nodes), so every
    store backend copies it faithfully; ``.keep`` files keep the mount-point directories."""
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
        if d in ("proc", "sys", "dev", "run", "tmp", "mnt"):
            (root / d / ".keep").write_bytes(b"")
    if with_busybox:
        shutil.copy2(busybox, root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        (root / "sbin" / "init").write_text(ROOTFS_INIT)
        os.chmod(root / "sbin" / "init", 0o755)
        (root / "etc" / "netbootd-common.sh").write_text(SH_COMMON)
    (root / "etc" / "netbootd-version").write_text(version + "\n")
    (root / "etc" / "netbootd-image").write_text(name + "\n")
    (root / "etc" / "netbootd-marker").write_text(marker + "\n")
    (root / "etc" / "hostname").write_text("netbootd-test\n")


def build_kernel_initrd(dest: Path, *, name: str, version: str, marker: str, cache: Path,
                        rootfs: bool, arch: str = "amd64") -> dict:
    spec = ARCHES[arch]
    kdir = fetch_kernel(cache, arch)
    busybox = fetch_busybox(cache, arch)
    (dest / "boot").mkdir(parents=True)
    shutil.copy2(kdir / "vmlinuz", dest / "boot" / "vmlinuz")
    progress(f"building initrd ({arch})")
    initrd = build_initrd(kdir, name=name, version=version, marker=marker, busybox=busybox,
                          net_modules=spec.net_modules)
    (dest / "boot" / "initrd.img").write_bytes(initrd)
    progress(f"initrd: {len(initrd) / 1e6:.1f} MB")
    boot = {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
            "cmdline": f"console={spec.console}"}
    (dest / "DEMO").write_text(
        f"netbootd DEMO image ({name} {version}): Debian's cloud kernel and a busybox initrd "
        "that reports its boot to netbootd; not an operating system for your fleet.\n")
    if rootfs:
        progress("writing busybox rootfs")
        write_rootfs(dest / "rootfs", name=name, version=version, marker=marker,
                     busybox=busybox)
        boot["rootfs"] = "rootfs"
    return {"kind": "kernel+initrd", "boards": list(spec.boards), "boot": boot,
            "kernel_release": (kdir / "release").read_text().strip()
            if (kdir / "release").exists() else ""}


#: Pi 5 boot tree: path -> size in bytes at scale 1.0 (rpi-netboot.md "Typical sizes").
PI_FILES = {
    "kernel_2712.img": 9_900_000,
    "initramfs_2712": 22_800_000,
    "bcm2712-rpi-5-b.dtb": 80_000,
    "overlays/overlay_map.dtb": 6_000,
    "overlays/bcm2712d0.dtbo": 1_800,
    "overlays/vc4-kms-v3d-pi5.dtbo": 3_900,
}

PI_CONFIG = """# netbootd synthetic Raspberry Pi 5 boot tree ({marker})
# netbootd-version: {version}
[all]
arm_64bit=1
kernel=kernel_2712.img
initramfs initramfs_2712 followkernel
enable_uart=1
uart_2ndstage=1
dtoverlay=vc4-kms-v3d-pi5
dtparam=audio=off
disable_overscan=1
auto_initramfs=0
camera_auto_detect=0
display_auto_detect=0
max_framebuffers=2
disable_fw_kms_setup=1
[pi5]
dtoverlay=bcm2712d0
[all]
"""


#: First line of the demo's config.txt: a Pi's serial console shows whose tree it is.
PI_DEMO_LINE = "# netbootd DEMO boot tree: synthetic files, not a bootable Raspberry Pi OS\n"


def build_pi(dest: Path, *, name: str, version: str, marker: str, scale: float) -> dict:
    """A synthetic Pi 5 boot tree; content is pseudo-random (incompressible, like real
    kernels) and seeded by name+version so two versions differ byte for byte."""
    boot = dest / "boot"
    (boot / "overlays").mkdir(parents=True)
    config = PI_CONFIG.format(marker=marker, version=version)
    config += "".join(f"# padding line {i:03d} to a realistic size\n" for i in range(24))
    (boot / "config.txt").write_text(PI_DEMO_LINE + config)
    (boot / "DEMO.txt").write_text(
        f"netbootd DEMO Raspberry Pi 5 boot tree ({name} {version}): synthetic files with "
        "the real names and sizes, for protocol tests; it does not boot a real Pi.\n"
        "Import Raspberry Pi OS instead: netbootd images import IMAGE.img.xz\n")
    (boot / "cmdline.txt").write_text(
        "console=serial0,115200 console=tty1 root=/dev/nfs ip=dhcp rootwait\n")
    rng = random.Random(f"{name}/{version}/{marker}")
    for rel, size in PI_FILES.items():
        n = max(64, int(size * scale))
        head = f"netbootd synthetic {rel} {name} {version} {marker}\n".encode()
        (boot / rel).write_bytes(head + rng.randbytes(max(0, n - len(head))))
    progress(f"pi boot tree: {sum(p.stat().st_size for p in boot.rglob('*') if p.is_file()) / 1e6:.1f} MB")
    write_rootfs(dest / "rootfs", name=name, version=version, marker=marker, with_busybox=False)
    return {"kind": "pi-boot+rootfs", "boards": ["rpi5"],
            "boot": {"boot_tree": "boot", "rootfs": "rootfs", "cmdline": ""}}


# --------------------------------------------------------------------------- manifest

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artefacts(build: Path) -> list[dict]:
    """Every regular file except manifest.json, sorted, with size and sha256."""
    out = []
    for p in sorted(build.rglob("*")):
        rel = p.relative_to(build).as_posix()
        if rel == "manifest.json" or p.is_symlink() or not p.is_file():
            continue
        out.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def write_manifest(build: Path, *, name: str, version: str, spec: dict) -> dict:
    manifest = {
        "image": name,
        "version": version,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": spec["kind"],
        "boards": spec["boards"],
        "boot": spec["boot"],
        "artefacts": artefacts(build),
    }
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_build(build: Path) -> list[str]:
    """Problems found checking a build against its manifest (empty list = valid)."""
    problems = []
    manifest = json.loads((build / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artefacts"]}
    actual = {a["path"]: a for a in artefacts(build)}
    for path in sorted(set(listed) | set(actual)):
        if path not in actual:
            problems.append(f"{path}: listed but missing")
        elif path not in listed:
            problems.append(f"{path}: present but not listed")
        elif listed[path]["sha256"] != actual[path]["sha256"] or \
                listed[path]["size"] != actual[path]["size"]:
            problems.append(f"{path}: checksum or size mismatch")
    for key in ("kernel", "initrd", "boot_tree", "rootfs"):
        rel = manifest["boot"].get(key)
        if rel and not (build / rel).exists():
            problems.append(f"boot.{key}: {rel} does not exist")
    return problems


# --------------------------------------------------------------------------- main

def default_version() -> str:
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y.%m.%d-%H%M%S") + f"-{now.microsecond // 1000:03d}"


def build(*, name: str, version: str, marker: str, pi: bool, cache: Path,
          out: Path | None, incoming: Path | None, rootfs: bool = True,
          pi_scale: float = 1.0, arch: str = "amd64") -> Path:
    """Build one image; return the final build directory (renamed into place)."""
    if out is not None:
        final = out.resolve()
        parent = final.parent
    else:
        parent = (incoming or HERE / "incoming").resolve()
        final = parent / f"{name}-{version}"
    if final.exists():
        raise BuildError(f"{final} already exists")
    if arch not in ARCHES:
        raise BuildError(f"unknown --arch {arch!r} (one of {', '.join(ARCHES)})")
    if not pi and not ARCHES[arch].foreign and not BUSYBOX.exists():
        raise BuildError(f"{BUSYBOX} missing: apt-get install busybox-static")
    parent.mkdir(parents=True, exist_ok=True)
    # Dot-prefixed temp dir in the same directory: same filesystem (rename is atomic) and
    # ignored by the store's incoming watcher until the rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=parent))
    try:
        what = "pi" if pi else f"kernel+initrd, {arch}"
        progress(f"building {name} {version} ({what}) in {tmp}")
        if pi:
            spec = build_pi(tmp, name=name, version=version, marker=marker, scale=pi_scale)
        else:
            spec = build_kernel_initrd(tmp, name=name, version=version, marker=marker,
                                       cache=cache, rootfs=rootfs, arch=arch)
        progress("checksumming")
        manifest = write_manifest(tmp, name=name, version=version, spec=spec)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; NFS and HTTP readers need to enter it
        for p in tmp.rglob("*"):
            if p.is_dir():
                os.chmod(p, 0o755)
        _fsync_tree(tmp)
        tmp.rename(final)
        total = sum(a["size"] for a in manifest["artefacts"])
        progress(f"done: {final} ({len(manifest['artefacts'])} files, {total / 1e6:.1f} MB)")
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes the build (crash safety)."""
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default=None, help="image name (default: demo, or pi-demo with --pi)")
    ap.add_argument("--version", default=None, help="version (default: a UTC timestamp)")
    dest = ap.add_mutually_exclusive_group()
    dest.add_argument("--out", type=Path, help="write the build directory here (must not exist)")
    dest.add_argument("--incoming", type=Path,
                      help=f"drop the build into this incoming/ dir (default {HERE / 'incoming'})")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="kernel download cache")
    ap.add_argument("--marker-text", default=None,
                    help="text baked into /etc/netbootd-marker (console shows it)")
    ap.add_argument("--arch", choices=sorted(ARCHES), default="amd64",
                    help="CPU architecture of the kernel+initrd image (default amd64)")
    ap.add_argument("--pi", action="store_true", help="synthetic Pi 5 pi-boot+rootfs image")
    ap.add_argument("--pi-scale", type=float, default=1.0,
                    help="size factor for --pi files (1.0 = ~33 MB boot tree)")
    ap.add_argument("--no-rootfs", action="store_true", help="skip the NFS rootfs tree")
    ap.add_argument("--verify", type=Path, metavar="BUILD",
                    help="only check BUILD against its manifest.json and exit")
    args = ap.parse_args(argv)
    if args.verify:
        problems = verify_build(args.verify)
        for p in problems:
            print(p)
        return 1 if problems else 0
    name = args.name or ("pi-demo" if args.pi else "demo")
    version = args.version or default_version()
    marker = args.marker_text or f"{name}-{version}"
    try:
        final = build(name=name, version=version, marker=marker, pi=args.pi, cache=args.cache,
                      out=args.out, incoming=args.incoming, rootfs=not args.no_rootfs,
                      pi_scale=args.pi_scale, arch=args.arch)
    except BuildError as exc:
        print(f"build-image: error: {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
