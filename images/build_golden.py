#!/usr/bin/env python3
"""Build the golden disk image: Debian 12, cloud kernel, systemd, cloud-init, ssh (kind ``disk``).

Standard library + Debian tools (debootstrap, e2fsprogs, dosfstools, mtools, syslinux,
fdisk, zstd); runs as root (debootstrap installs packages into a tree owned by root).

What it makes, in a build directory with ``manifest.json`` (kind ``disk``):

* ``<name>-<version>.img.zst``: a raw MBR disk image compressed with ``zstd -T0``:
  partition 1 = FAT32 ``/boot/bios`` (kernel, initrd, SYSLINUX, bootable), partition 2 =
  ext4 root (everything else). The MBR holds SYSLINUX's ``mbr.bin``, so the disk boots by
  itself on BIOS machines (and QEMU without firmware tricks). Kernel command line:
  ``root=UUID=<fs uuid> ro console=tty0 console=ttyS0,115200n8``.
* cloud-init is configured with the NoCloud datasource and a ``seedfrom`` URL given at
  build time (``--seed-url``, netbootd's ``/cloud-init/by-address/``), so the same bytes
  work on every node: netbootd tells nodes apart by the address they ask from.

How it is built without loop devices or mounts (debootstrap mounts /proc and /sys inside
its own target while it runs, nothing else does):

1. ``debootstrap --variant=minbase --include=...`` into a tree, cached in
   ``images/cache/golden/tree-<key>`` where ``<key>`` hashes the suite, the package list and
   the recipe; downloaded .debs are kept in ``images/cache/debootstrap-debs``. A second
   build reuses the tree and takes seconds.
2. The tree is hard-link copied (``cp -al``) and the per-build files (seed URL, fstab,
   hostname, version) are written into the copy, each unlinked first so the cache is never
   written through a hard link.
3. ``mkfs.ext4 -d TREE -E offset=...`` writes the root file system straight into the disk
   image file; ``mkfs.fat`` + ``mcopy`` make the boot partition in a small file;
   ``syslinux --install`` writes its boot sector and ``ldlinux.sys`` through mtools; ``sfdisk``
   writes the partition table; ``dd`` places the boot partition and ``mbr.bin``.

Output: like build_image.py, assembled under a dot-name in the destination directory and
renamed into place in one step. Progress on stderr, the final build path on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_image import (
    BuildError,
    _fsync_tree,
    default_version,
    sha256_file,
)

SUITE = "bookworm"
#: Everything the golden image carries (``--include`` of debootstrap's minbase variant).
PACKAGES = [
    "linux-image-cloud-amd64", "systemd", "systemd-sysv", "udev", "dbus",
    "cloud-init", "cloud-guest-utils", "openssh-server", "sudo",
    "ifupdown", "isc-dhcp-client", "iproute2", "netbase", "e2fsprogs", "ca-certificates",
    # debootstrap does not resolve virtual packages: python3-cryptography (cloud-init)
    # depends on python3-cffi-backend-api-*, which only this package provides.
    "python3-cffi-backend",
]
#: Bumped whenever the steps that make the cached tree change (part of the cache key).
RECIPE = "1"

SECTOR = 512
ALIGN = 1 << 20                 # partitions start on MiB boundaries
BOOT_PART_MIB = 128             # FAT32 /boot/bios: two kernels + initrds fit
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
TOOLS = ["debootstrap", "mkfs.ext4", "mkfs.fat", "mcopy", "syslinux", "sfdisk", "zstd", "dd"]


def progress(msg: str) -> None:
    print(f"build-golden: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} not found; apt-get install the package that has it") from exc
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace")[-2000:] if isinstance(exc.stderr, bytes) else ""
        raise BuildError(f"{' '.join(cmd[:3])} ... failed (exit {exc.returncode}) {err}") from exc


# --------------------------------------------------------------------------- mirror, cache key

def apt_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 ``.sources`` or one-line ``.list``)."""
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
                suites = fields.get("Suites", "").split()
                if SUITE in suites and "deb" in fields.get("Types", "").split():
                    return fields.get("URIs", "").split()[0]
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == SUITE:
                    return m.group(1)
    raise BuildError(f"no apt source for {SUITE} found in /etc/apt; pass --mirror URL")


def tree_key(packages: list[str]) -> str:
    blob = json.dumps({"suite": SUITE, "variant": "minbase", "packages": sorted(packages),
                       "recipe": RECIPE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the tree

def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mounts), deepest first."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mp = line.split()[1].replace("\\040", " ")
        if mp == prefix or mp.startswith(prefix + "/"):
            found.append(mp)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf a build tree, but never through a mount a failed debootstrap left behind
    (its /proc, /sys, or a bind-mounted /dev): unmount those first, refuse if that fails."""
    if not path.exists():
        return
    for mp in mounts_under(path):
        subprocess.run(["umount", "-l", mp], check=False)
    left = mounts_under(path)
    if left:
        raise BuildError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


def debootstrap_tree(cache: Path, mirror: str, packages: list[str]) -> Path:
    """The installed Debian tree, from the cache or made now (debootstrap, a few minutes)."""
    key = tree_key(packages)
    gdir = cache / "golden"
    tree = gdir / f"tree-{key}"
    if (gdir / f"tree-{key}.done").exists() and tree.is_dir():
        progress(f"debootstrap tree {key}: cached ({tree})")
        return tree
    gdir.mkdir(parents=True, exist_ok=True)
    debs = cache / "debootstrap-debs"
    debs.mkdir(parents=True, exist_ok=True)
    tmp = gdir / f".tree-{key}.tmp"
    remove_tree(tmp)
    remove_tree(tree)
    progress(f"debootstrap {SUITE} minbase + {len(packages)} packages from {mirror} "
             f"(a few minutes; .debs cached in {debs})")
    t0 = time.monotonic()
    log = gdir / f"debootstrap-{key}.log"
    try:
        with log.open("wb") as out:
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                 f"--cache-dir={debs}", "--merged-usr", SUITE, str(tmp), mirror],
                check=True, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.CalledProcessError) as exc:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        inner = tmp / "debootstrap" / "debootstrap.log"
        if inner.exists():
            shutil.copy2(inner, log.with_suffix(".dpkg.log"))
            tail.append(f"(dpkg's log: {log.with_suffix('.dpkg.log')})")
        remove_tree(tmp)
        raise BuildError(f"debootstrap failed ({exc}); log {log}:\n" + "\n".join(tail)) from exc
    if mounts_under(tmp):
        raise BuildError(f"debootstrap left mounts under {tmp}: {mounts_under(tmp)}")
    progress(f"debootstrap done in {time.monotonic() - t0:.0f}s; generalising the tree")
    generalise(tmp)
    tmp.rename(tree)
    (gdir / f"tree-{key}.done").write_text(json.dumps(
        {"suite": SUITE, "packages": sorted(packages), "recipe": RECIPE, "mirror": mirror,
         "seconds": round(time.monotonic() - t0)}) + "\n")
    return tree


def generalise(root: Path) -> None:
    """Remove what must differ per machine or must not ship (same for every build)."""
    for rel in ("etc/machine-id",):
        p = root / rel
        if p.exists():
            p.unlink()
            p.write_text("")          # empty: systemd makes a fresh id on first boot
    for pattern in ("etc/ssh/ssh_host_*", "var/lib/dbus/machine-id", "var/cache/apt/*.bin",
                    "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages",
                    "var/log/*.log", "var/log/apt/*", "etc/resolv.conf"):
        for p in root.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()
    shutil.rmtree(root / "var/lib/cloud", ignore_errors=True)


def kernel_files(tree: Path) -> tuple[Path, Path]:
    boot = tree / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if not kernels:
        raise BuildError(f"no kernel in {boot}: linux-image-cloud-amd64 not installed?")
    release = kernels[-1].name[len("vmlinuz-"):]
    initrd = boot / f"initrd.img-{release}"
    if not initrd.exists():
        raise BuildError(f"no {initrd.name} in {boot}: initramfs-tools did not run?")
    return kernels[-1], initrd


# --------------------------------------------------------------------------- per-build files

CLOUD_CFG = """\
# netbootd: cloud-init asks netbootd for this node's meta-data and user-data. The URL is
# the same for every node (baked in at build time); netbootd finds the node by the address
# the request comes from.
datasource_list: [NoCloud, None]
datasource:
  NoCloud:
    seedfrom: {seed_url}
"""

FSTAB = """\
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID={root_uuid}  /  ext4  errors=remount-ro  0  1
UUID={boot_uuid}  /boot/bios  vfat  umask=0077,nofail  0  2
"""

SYSLINUX_CFG = """\
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND {cmdline}
"""

# The boot partition holds copies named vmlinuz / initrd.img (FAT has no symlinks); these
# hooks keep them current when the node installs a new kernel or rebuilds its initramfs.
BOOTPART_HOOK = """\
#!/bin/sh
# netbootd golden image: copy the newest kernel and initrd to the SYSLINUX boot partition.
set -e
dir=/boot/bios
mountpoint -q "$dir" || exit 0
k=$(ls -1v /boot/vmlinuz-* 2>/dev/null | tail -n 1)
[ -n "$k" ] || exit 0
v=${k#/boot/vmlinuz-}
[ -f "/boot/initrd.img-$v" ] || exit 0
cp "$k" "$dir/vmlinuz.new" && mv "$dir/vmlinuz.new" "$dir/vmlinuz"
cp "/boot/initrd.img-$v" "$dir/initrd.img.new" && mv "$dir/initrd.img.new" "$dir/initrd.img"
sync
"""

SSH_KEYGEN_DROPIN = """\
# netbootd golden image: host keys are not shipped; cloud-init makes them, this is the
# fallback when cloud-init could not run.
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""


def replace_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``path`` in the hard-linked copy without touching the cached tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)


def personalise(stage: Path, *, name: str, version: str, seed_url: str, mirror: str,
                root_uuid: str, boot_uuid: str) -> None:
    replace_file(stage / "etc/cloud/cloud.cfg.d/90_netbootd.cfg",
                 CLOUD_CFG.format(seed_url=seed_url))
    replace_file(stage / "etc/fstab", FSTAB.format(root_uuid=root_uuid, boot_uuid=boot_uuid))
    replace_file(stage / "etc/hostname", "debian\n")
    replace_file(stage / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n"
                 "::1\tlocalhost ip6-localhost ip6-loopback\n")
    replace_file(stage / "etc/network/interfaces",
                 "# cloud-init writes the node's interfaces into interfaces.d/\n"
                 "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
    replace_file(stage / "etc/apt/sources.list",
                 f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n")
    replace_file(stage / "etc/netbootd-image", f"{name} {version}\n")
    for hook in ("etc/kernel/postinst.d/zz-netbootd-bootpart",
                 "etc/initramfs/post-update.d/zz-netbootd-bootpart"):
        replace_file(stage / hook, BOOTPART_HOOK, 0o755)
    replace_file(stage / "etc/systemd/system/ssh.service.d/netbootd-hostkeys.conf",
                 SSH_KEYGEN_DROPIN)
    (stage / "boot/bios").mkdir(exist_ok=True)


# --------------------------------------------------------------------------- disk assembly

def _mib_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tree_bytes(root: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "--apparent-size", str(root)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def make_disk(disk: Path, stage: Path, *, kernel: Path, initrd: Path, root_uuid: str,
              boot_volid: str, disk_id: str, size_mib: int | None) -> int:
    """Write the raw disk image; returns its size in bytes."""
    used = tree_bytes(stage)
    boot_bytes = BOOT_PART_MIB << 20
    # The tree + 30 % fits (file system overhead, small files' last blocks); the default
    # adds room for a first apt upgrade. growpart takes the root to the whole disk at
    # first boot either way, so a smaller image only installs faster.
    least = ALIGN + boot_bytes + _mib_up(int(used * 1.3))
    root_bytes = _mib_up(int(used * 1.3) + (384 << 20))
    total = ALIGN + boot_bytes + root_bytes
    if size_mib is not None:
        if (size_mib << 20) < least:
            raise BuildError(f"--size-mib {size_mib} is too small; needs {least >> 20}")
        total = size_mib << 20
        root_bytes = total - ALIGN - boot_bytes
    progress(f"disk {total >> 20} MiB: boot {boot_bytes >> 20} MiB FAT32, root "
             f"{root_bytes >> 20} MiB ext4 (tree {used >> 20} MiB)")
    with disk.open("wb") as f:
        f.truncate(total)
    sfdisk_script = (f"label: dos\nlabel-id: 0x{disk_id}\nunit: sectors\n"
                     f"start={ALIGN // SECTOR}, size={boot_bytes // SECTOR}, type=c, bootable\n"
                     f"start={(ALIGN + boot_bytes) // SECTOR}, size={root_bytes // SECTOR}, "
                     f"type=83\n")
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
        input=sfdisk_script.encode(), capture_output=True)
    # Root file system: straight into the image at its partition's offset.
    progress("mkfs.ext4 -d (root file system from the tree)")
    root_off = ALIGN + boot_bytes
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "root", "-U", root_uuid,
         "-E", f"offset={root_off},hash_seed={root_uuid}", "-d", str(stage),
         str(disk), f"{root_bytes // 4096}"], capture_output=True,
        env={**os.environ, "MKE2FS_CONFIG": "/etc/mke2fs.conf"})
    # Boot partition: a FAT32 file of its own, filled with mtools, then placed with dd.
    progress("boot partition: mkfs.fat, mcopy, syslinux --install")
    bootimg = disk.with_name(disk.name + ".boot")
    with bootimg.open("wb") as f:
        f.truncate(boot_bytes)
    try:
        run(["mkfs.fat", "-F", "32", "-n", "BOOT", "-i", boot_volid,
             "-h", str(ALIGN // SECTOR), str(bootimg)], capture_output=True)
        cmdline = f"root=UUID={root_uuid} ro console=tty0 console=ttyS0,115200n8"
        cfg = disk.with_name("syslinux.cfg")
        cfg.write_text(SYSLINUX_CFG.format(cmdline=cmdline))
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        run(["mcopy", "-i", str(bootimg), str(kernel), "::vmlinuz"], env=env, capture_output=True)
        run(["mcopy", "-i", str(bootimg), str(initrd), "::initrd.img"], env=env,
            capture_output=True)
        run(["mcopy", "-i", str(bootimg), str(cfg), "::syslinux.cfg"], env=env,
            capture_output=True)
        cfg.unlink()
        run(["syslinux", "--install", str(bootimg)], env=env, capture_output=True)
        run(["dd", f"if={bootimg}", f"of={disk}", "bs=1M", f"seek={ALIGN >> 20}",
             "conv=notrunc,sparse", "status=none"], capture_output=True)
    finally:
        bootimg.unlink(missing_ok=True)
    # SYSLINUX's MBR code: first 440 bytes, the partition table behind it stays.
    if not MBR_BIN.exists():
        raise BuildError(f"{MBR_BIN} missing: apt-get install syslinux-common")
    run(["dd", f"if={MBR_BIN}", f"of={disk}", "bs=440", "count=1", "conv=notrunc",
         "status=none"], capture_output=True)
    return total


def compress(raw: Path, dest: Path, level: int) -> None:
    progress(f"zstd -T0 -{level} {raw.name}")
    run(["zstd", "-q", "-T0", f"-{level}", "-f", "-o", str(dest), str(raw)])


# --------------------------------------------------------------------------- build

def build(*, name: str, version: str, seed_url: str, cache: Path, out: Path | None,
          incoming: Path | None, mirror: str | None = None, size_mib: int | None = None,
          zstd_level: int = 3, packages: list[str] | None = None) -> Path:
    """Build one golden image; return the final build directory (renamed into place)."""
    if os.geteuid() != 0:
        raise BuildError("needs root (debootstrap, and files owned by root in the image)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing {', '.join(missing)}: apt-get install debootstrap "
                         "e2fsprogs dosfstools mtools syslinux syslinux-common fdisk zstd")
    if not re.match(r"^https?://[^/\s]+/\S*/$", seed_url):
        raise BuildError(f"--seed-url {seed_url!r}: an http(s) URL ending in '/'")
    if out is not None:
        final = out.resolve()
        parent = final.parent
    else:
        parent = (incoming or HERE / "incoming").resolve()
        final = parent / f"{name}-{version}"
    if final.exists():
        raise BuildError(f"{final} already exists")
    mirror = mirror or apt_mirror()
    packages = packages or PACKAGES
    t0 = time.monotonic()
    tree = debootstrap_tree(cache.resolve(), mirror, packages)
    kernel, initrd = kernel_files(tree)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=parent))
    # Identifiers derived from name+version: a rebuild of one version gives the same ids.
    seed = hashlib.sha256(f"{name}/{version}".encode()).digest()
    root_uuid = str(uuid.UUID(bytes=seed[:16], version=4))
    boot_volid = seed[16:20].hex()
    disk_id = seed[20:24].hex()
    boot_uuid = f"{boot_volid[:4]}-{boot_volid[4:]}".upper()
    stage = tmp / ".stage"
    try:
        progress(f"building {name} {version} (kind disk) in {tmp}")
        run(["cp", "-al", str(tree), str(stage)])
        personalise(stage, name=name, version=version, seed_url=seed_url, mirror=mirror,
                    root_uuid=root_uuid, boot_uuid=boot_uuid)
        raw = tmp / f"{name}-{version}.img"
        usize = make_disk(raw, stage, kernel=kernel, initrd=initrd, root_uuid=root_uuid,
                          boot_volid=boot_volid, disk_id=disk_id, size_mib=size_mib)
        shutil.rmtree(stage)
        progress("sha256 of the raw image")
        usha = sha256_file(raw)
        packed = tmp / f"{name}-{version}.img.zst"
        compress(raw, packed, zstd_level)
        raw.unlink()
        manifest = {
            "image": name,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": "disk",
            "boards": ["x86_64"],
            "boot": {"disk": packed.name},
            "disk": {"path": packed.name, "compression": "zst",
                     "size": packed.stat().st_size, "sha256": sha256_file(packed),
                     "uncompressed_size": usize, "uncompressed_sha256": usha},
            "artefacts": [],
        }
        manifest["artefacts"] = [{"path": packed.name, "size": manifest["disk"]["size"],
                                  "sha256": manifest["disk"]["sha256"]}]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _fsync_tree(tmp)
        tmp.rename(final)
        progress(f"done in {time.monotonic() - t0:.0f}s: {final} ({usize >> 20} MiB raw, "
                 f"{manifest['disk']['size'] / 1e6:.0f} MB zst)")
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="golden", help="image name (default: golden)")
    ap.add_argument("--version", default=None, help="version (default: a UTC timestamp)")
    ap.add_argument("--seed-url", required=True,
                    help="cloud-init NoCloud seedfrom URL baked into the image, e.g. "
                         "http://10.0.0.2:8080/cloud-init/by-address/")
    dest = ap.add_mutually_exclusive_group()
    dest.add_argument("--out", type=Path, help="write the build directory here (must not exist)")
    dest.add_argument("--incoming", type=Path,
                      help=f"drop the build into this incoming/ dir (default {HERE / 'incoming'})")
    ap.add_argument("--cache", type=Path, default=HERE / "cache",
                    help="cache of the debootstrap tree and .debs (default images/cache)")
    ap.add_argument("--mirror", default=None, help="Debian mirror (default: apt's bookworm source)")
    ap.add_argument("--size-mib", type=int, default=None,
                    help="raw disk size (default: the tree + 30%% + 384 MiB, + boot; "
                         "at least the tree + 30%% + boot)")
    ap.add_argument("--zstd-level", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        final = build(name=args.name, version=args.version or default_version(),
                      seed_url=args.seed_url, cache=args.cache, out=args.out,
                      incoming=args.incoming, mirror=args.mirror, size_mib=args.size_mib,
                      zstd_level=args.zstd_level)
    except BuildError as exc:
        print(f"build-golden: error: {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
