"""Raspberry Pi OS (or any Pi-style MBR disk image) -> a ``pi-boot+rootfs`` build.

A Pi SD-card image has an MBR with a FAT boot partition (firmware, kernel, dtbs,
overlays/, config.txt, cmdline.txt) and an ext4 root partition. netbootd serves the
first over TFTP and exports the second over NFS, so importing means taking both
apart, in user space: no loop devices, no mounts, no root-only kernel features.

- ``.img.xz`` / ``.img.gz`` / ``.img.zst`` are decompressed as a stream into a sparse
  temporary file (runs of zeros are skipped, not written);
- the partition table is read here (the four MBR entries: a few bytes, no tool needed);
- the FAT partition is copied with mtools (``mcopy -s -i IMAGE@@OFFSET``);
- the ext4 partition is copied with e2fsprogs (``debugfs -R "rdump / DIR"
  IMAGE?offset=N``). rdump keeps owners when run as root, but it changes the owner
  *after* the mode, and a chown clears setuid/setgid bits: so every inode's mode is read
  back from the file system (``ls -p`` of each directory in one debugfs run) and set
  again. Device nodes and FIFOs are skipped (a netbooted root gets its /dev from
  devtmpfs; the store refuses device nodes unless ``store.allow_devices``); extended
  attributes (file capabilities) are not copied: see docs/rpi-netboot.md;
- the result is made fit for a shared, read-only NFS root: ``cmdline.txt`` loses
  ``root=``, ``rootfstype=``, ``init=`` (first-boot resize scripts) and ``fsck.*``
  (netbootd renders the root arguments per node), ``/etc/fstab`` loses the SD-card
  mounts and gets tmpfs for the directories a running system writes to, and a small
  unit mounts the node's own NFS state directory (``netbootd.state=`` on the cmdline)
  at ``/var/lib/netbootd-state``.

The build's ``manifest.json`` is written by :mod:`netbootd.store.build`, so the store
validates an imported image exactly like any CI build.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .ingest import Rejected

log = logging.getLogger("netbootd.store.importer")

#: File names taken for disk images (in incoming/ and by ``images import``).
IMAGE_SUFFIXES = (".img", ".img.xz", ".img.gz", ".img.zst")
#: MBR partition types of a FAT file system, and of Linux.
FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
LINUX_TYPES = {0x83}
SECTOR = 512
CHUNK = 1 << 20
#: cmdline.txt arguments that describe the SD card root; netbootd renders its own.
DROPPED_ARGS = ("root=", "rootfstype=", "init=", "fsck.", "nfsroot=", "ip=", "resize",
                "systemd.run")
DROPPED_WORDS = {"ro", "rw", "rootwait", "fsck.repair=yes", "quiet", "splash",
                 "plymouth.ignore-serial-consoles"}
#: Where the node's own writable NFS directory is mounted (see the unit below).
STATE_MOUNT = "/var/lib/netbootd-state"

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Partition:
    index: int
    type: int
    start: int  # bytes
    size: int  # bytes


def is_disk_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def compression_of(path: Path) -> str:
    """``xz`` | ``gz`` | ``zst`` | ``none``, from the first bytes (the name may lie)."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zst"
    return "none"


def looks_like_disk_image(path: Path) -> bool:
    """A regular file named ``*.img[.xz|.gz|.zst]`` that is compressed or has an MBR
    signature (what an ``incoming/`` drop of a Pi image looks like)."""
    if not path.is_file() or path.is_symlink() or not is_disk_image_name(path.name):
        return False
    if compression_of(path) != "none":
        return True
    with open(path, "rb") as fh:
        fh.seek(510)
        return fh.read(2) == b"\x55\xaa"


def name_version(filename: str, mtime: float | None = None) -> tuple[str, str]:
    """Image name and version from a file name: ``2024-11-19-raspios-bookworm-arm64-lite
    .img.xz`` -> (``raspios-bookworm-arm64-lite``, ``2024-11-19``); without a date prefix
    the whole stem is the name and the version is the file's modification time (UTC)."""
    stem = filename
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._+-]", "-", stem).lstrip(".-") or "image"
    m = re.match(r"^(\d{4}-\d{2}-\d{2})-(.+)$", stem)
    if m:
        return m.group(2), m.group(1)
    when = time.gmtime(mtime if mtime is not None else time.time())
    return stem, time.strftime("%Y.%m.%d-%H%M%S", when)


def partitions(raw: Path) -> list[Partition]:
    """The primary MBR partitions of a raw disk image (a GPT is refused by name)."""
    with open(raw, "rb") as fh:
        mbr = fh.read(SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise Rejected("not a disk image: no MBR partition table (boot signature 55 aa)")
    out = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        ptype = entry[4]
        start, count = struct.unpack("<II", entry[8:16])
        if ptype == 0xEE:
            raise Rejected("GPT disk image: only MBR (Raspberry Pi style) images are imported")
        if ptype and count:
            out.append(Partition(i + 1, ptype, start * SECTOR, count * SECTOR))
    return out


def _decompress(src: Path, dest: Path, kind: str, progress: ProgressFn | None,
                cancel: Any = None) -> None:
    """Stream-decompress into a sparse file: zero chunks become holes."""
    reader: BinaryIO
    proc = None
    if kind == "xz":
        reader = lzma.open(src, "rb")  # noqa: SIM115 - closed by the with below
    elif kind == "gz":
        reader = gzip.open(src, "rb")  # noqa: SIM115 - closed by the with below
    else:
        try:
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(open(src, "rb"))  # noqa: SIM115
        except ImportError:
            proc = subprocess.Popen(["zstd", "-dc", str(src)], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            reader = proc.stdout
    zero = bytes(CHUNK)
    done = 0
    last = time.monotonic()
    try:
        with reader, open(dest, "wb") as out:
            while True:
                if cancel is not None and cancel.is_set():
                    from .ingest import Cancelled

                    raise Cancelled()
                chunk = reader.read(CHUNK)
                if not chunk:
                    break
                if chunk == zero[: len(chunk)]:
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
                done += len(chunk)
                if progress and time.monotonic() - last >= 3:
                    last = time.monotonic()
                    progress(f"decompress {src.name}: {done / 1e6:.0f} MB")
            out.truncate(done)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise Rejected(f"cannot decompress {src.name} ({kind}): {exc}") from None
    finally:
        if proc is not None:
            proc.wait()
    if proc is not None and proc.returncode:
        raise Rejected(f"cannot decompress {src.name}: zstd exit {proc.returncode}")


def _tool(name: str) -> str | None:
    """The program, also from the sbin directories a non-login PATH may lack."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def _run(argv: list[str], what: str) -> str:
    exe = _tool(argv[0])
    if exe is None:
        raise Rejected(f"{what} needs the {argv[0]!r} program "
                       f"(Debian package {'mtools' if argv[0].startswith('m') else 'e2fsprogs'})")
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace",
                          check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise Rejected(f"{what} failed ({argv[0]} exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout + proc.stderr


def copy_fat(raw: Path, part: Partition, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["mcopy", "-s", "-p", "-m", "-n", "-Q", "-i", f"{raw}@@{part.start}", "::/*",
          str(dest) + "/"], f"copying the boot partition (partition {part.index})")
    for root, dirs, files in os.walk(dest):  # FAT knows no modes: make them sane
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(dest, 0o755)


def _debugfs_target(raw: Path, part: Partition) -> str:
    return f"{raw}?offset={part.start}"


def copy_ext4(raw: Path, part: Partition, dest: Path) -> dict[str, int]:
    """rdump the ext4 partition, then put back what rdump loses. Returns counts."""
    dest.mkdir(parents=True, exist_ok=True)
    target = _debugfs_target(raw, part)
    out = _run(["debugfs", "-R", f"rdump / {dest}", target],
               f"copying the root partition (partition {part.index})")
    problems = [ln for ln in out.splitlines() if "rdump:" in ln or "error" in ln.lower()]
    if problems:
        log.warning("debugfs: %s", "; ".join(problems[:5]))
    lost = dest / "lost+found"
    if lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()
    return restore_modes(target, dest)


_LS_LINE = re.compile(r"^/(\d+)/([0-7]+)/(\d+)/(\d+)/(.*)/(\d*)/$")


def restore_modes(target: str, dest: Path) -> dict[str, int]:
    """Set every file's and directory's mode (setuid, setgid, sticky included) and owner
    as the ext4 inode says; count what was skipped (devices, FIFOs, sockets)."""
    dirs = ["/"]
    for root, dnames, _ in os.walk(dest):
        rel = "/" + os.path.relpath(root, dest) if root != str(dest) else "/"
        dirs += [os.path.join(rel, d) for d in dnames]
    dirs = sorted(set(dirs))
    script = "".join(f'ls -p "{d}"\n' for d in dirs)
    cmd = dest.parent / ".debugfs-ls"
    cmd.write_text(script)
    try:
        out = _run(["debugfs", "-f", str(cmd), target], "reading the root partition's modes")
    finally:
        cmd.unlink(missing_ok=True)
    counts = {"fixed": 0, "skipped_special": 0}
    current = "/"
    is_root = os.geteuid() == 0
    for line in out.splitlines():
        if line.startswith("debugfs: ls -p "):
            current = line[len("debugfs: ls -p "):].strip().strip('"')
            continue
        m = _LS_LINE.match(line)
        if not m:
            continue
        mode, uid, gid, name = int(m.group(2), 8), int(m.group(3)), int(m.group(4)), m.group(5)
        if name == "..":
            continue
        path = dest / current.lstrip("/") if name == "." else dest / current.lstrip("/") / name
        if name != "." and not os.path.lexists(path):
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) \
                    or stat.S_ISSOCK(mode):
                counts["skipped_special"] += 1
            continue
        if stat.S_ISLNK(mode):
            if is_root:
                os.lchown(path, uid, gid)
            continue
        st = os.lstat(path)
        if is_root and (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)  # clears setuid: the chmod comes after
        if stat.S_IMODE(os.lstat(path).st_mode) != stat.S_IMODE(mode):
            os.chmod(path, stat.S_IMODE(mode))
            counts["fixed"] += 1
    return counts


def fit_cmdline(text: str) -> tuple[str, str]:
    """(cmdline.txt for the boot tree, the kernel arguments kept for the manifest).

    The arguments that name the SD card's root or run first-boot scripts go; what is
    left (consoles, cgroup flags, cfg80211 regdom...) is kept and netbootd appends it to
    the root arguments it renders per node."""
    kept = []
    for word in text.split():
        if word in DROPPED_WORDS or word.startswith(DROPPED_ARGS) or word.startswith("console="):
            continue
        kept.append(word)
    args = " ".join(kept)
    line = " ".join(["console=serial0,115200", "console=tty1", "root=/dev/nfs", "ro",
                     "ip=dhcp", "rootwait", *kept])
    return line + "\n", args


FSTAB_HEADER = """\
# netbootd: this root is shared by every node and mounted read-only over NFS.
# The SD card mounts of the original image are commented out below; what a running
# system writes goes to tmpfs, and the node's own NFS directory (netbootd.state= on
# the kernel command line) is mounted at {state} by netbootd-state.service.
proc            /proc           proc    defaults                      0 0
tmpfs           /tmp            tmpfs   mode=1777,nosuid,nodev        0 0
tmpfs           /var/tmp        tmpfs   mode=1777,nosuid,nodev        0 0
tmpfs           /var/log        tmpfs   mode=0755,nosuid,nodev        0 0
tmpfs           /var/lib/systemd tmpfs  mode=0755                     0 0
tmpfs           /var/cache      tmpfs   mode=0755                     0 0
"""

STATE_UNIT = """\
[Unit]
Description=Mount this node's writable state from netbootd (netbootd.state= on the cmdline)
ConditionKernelCommandLine=netbootd.state
After=network-online.target
Wants=network-online.target
Before=multi-user.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for a in $(cat /proc/cmdline); do case "$a" in netbootd.state=*) \
mkdir -p {state} 2>/dev/null; exec mount -t nfs -o vers=3,tcp,nolock "${{a#netbootd.state=}}" {state};; \
esac; done'

[Install]
WantedBy=multi-user.target
"""


def fit_fstab(text: str) -> str:
    """The SD card's mounts commented out, tmpfs and proc for a read-only NFS root."""
    lines = [FSTAB_HEADER.format(state=STATE_MOUNT)]
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        mountpoint = fields[1] if len(fields) > 1 else ""
        sd = fields[0].startswith(("PARTUUID=", "UUID=", "LABEL=", "/dev/mmcblk", "/dev/sd",
                                   "/dev/nvme"))
        if sd or mountpoint in ("/", "/boot", "/boot/firmware", "/proc", "/tmp"):
            lines.append(f"# (not on an NFS root) {line}\n")
        else:
            lines.append(line + "\n")
    return "".join(lines)


def fit_rootfs(rootfs: Path) -> None:
    fstab = rootfs / "etc" / "fstab"
    old = fstab.read_text(errors="replace") if fstab.is_file() else ""
    st = fstab.lstat() if fstab.is_file() else None
    fstab.parent.mkdir(parents=True, exist_ok=True)
    fstab.write_text(fit_fstab(old))
    if st is not None and os.geteuid() == 0:
        os.chown(fstab, st.st_uid, st.st_gid)
    units = rootfs / "etc" / "systemd" / "system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    unit = units / "netbootd-state.service"
    unit.write_text(STATE_UNIT.format(state=STATE_MOUNT))
    link = wants / "netbootd-state.service"
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/netbootd-state.service", link)
    (rootfs / STATE_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # Raspberry Pi OS resizes the SD card's root on first boot; there is no card here.
    for name in ("etc/init.d/resize2fs_once", "etc/rc3.d/S01resize2fs_once",
                 "etc/systemd/system/multi-user.target.wants/rpi-resizerootfs.service"):
        p = rootfs / name
        if os.path.lexists(p):
            p.unlink()


def boards_of(boot: Path) -> list[str]:
    names = {p.name for p in boot.glob("bcm27*.dtb")}
    boards = []
    if any(n.startswith("bcm2712") for n in names):
        boards.append("rpi5")
    if any(n.startswith("bcm2711") for n in names):
        boards.append("rpi4")
    if any(n.startswith(("bcm2710", "bcm2837")) for n in names):
        boards.append("rpi3")
    return boards or ["rpi"]


@dataclass
class Imported:
    image: str
    version: str
    boards: list[str]
    files: int
    bytes: int
    modes_fixed: int
    skipped_special: int


def import_image(src: Path, build: Path, *, image: str, version: str,
                 progress: ProgressFn | None = None, cancel: Any = None,
                 scratch: Path | None = None) -> Imported:
    """Turn the disk image ``src`` into the build directory ``build`` (created; with
    ``boot/``, ``rootfs/`` and ``manifest.json``). Raises :class:`Rejected` with the
    reason when ``src`` is not a Pi-style image."""
    from .build import write_manifest

    say = progress or (lambda msg: log.info("%s", msg))
    build.mkdir(parents=True, exist_ok=False)
    scratch = scratch or build.parent
    kind = compression_of(src)
    raw = src
    tmp: Path | None = None
    try:
        if kind != "none":
            tmp = scratch / f".raw-{os.getpid()}-{time.time_ns()}.img"
            say(f"decompressing {src.name} ({kind})")
            _decompress(src, tmp, kind, progress, cancel)
            raw = tmp
        parts = partitions(raw)
        fat = next((p for p in parts if p.type in FAT_TYPES), None)
        linux = next((p for p in parts if p.type in LINUX_TYPES), None)
        if fat is None or linux is None:
            found = ", ".join(f"{p.index}: type 0x{p.type:02x}" for p in parts) or "none"
            raise Rejected("not a Raspberry Pi style image: needs a FAT boot partition and a "
                           f"Linux (0x83) root partition; found {found}")
        size = raw.stat().st_size
        for p in (fat, linux):
            if p.start + p.size > size:
                raise Rejected(f"partition {p.index} ends past the end of the image "
                               "(truncated download?)")
        say(f"boot partition {fat.index} ({fat.size / 1e6:.0f} MB, FAT) -> boot/")
        copy_fat(raw, fat, build / "boot")
        say(f"root partition {linux.index} ({linux.size / 1e6:.0f} MB, ext4) -> rootfs/")
        counts = copy_ext4(raw, linux, build / "rootfs")
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    boot = build / "boot"
    if not (boot / "config.txt").is_file():
        raise Rejected("the boot partition has no config.txt: not a Raspberry Pi boot partition")
    if not any((boot / k).is_file() for k in ("kernel_2712.img", "kernel8.img")):
        raise Rejected("the boot partition has no kernel_2712.img or kernel8.img (a 64-bit "
                       "Raspberry Pi OS image is needed)")
    cmdline = boot / "cmdline.txt"
    line, args = fit_cmdline(cmdline.read_text(errors="replace") if cmdline.is_file() else "")
    cmdline.write_text(line)
    fit_rootfs(build / "rootfs")
    boards = boards_of(boot)
    say("writing manifest.json (hashing every file)")
    # created = the image file's time: importing the same file again gives the same
    # manifest, which the store recognises as already present (not a conflict)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(src.stat().st_mtime))
    m = write_manifest(build, image, version, "pi-boot+rootfs", boards=boards,
                       boot={"boot_tree": "boot", "rootfs": "rootfs", "cmdline": args},
                       created=created)
    total = sum(a["size"] for a in m["artefacts"])
    return Imported(image=image, version=version, boards=boards, files=len(m["artefacts"]),
                    bytes=total, modes_fixed=counts["fixed"],
                    skipped_special=counts["skipped_special"])
