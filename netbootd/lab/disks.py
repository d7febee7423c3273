"""Guest disks for provisioning tests: blank raw files, and reading them back afterwards.

A provisioned guest gets a blank (sparse) raw file as its virtio disk; after QEMU has
stopped, the test compares the disk's bytes with the image and reads files from the
installed root file system without mounting anything: the root partition is copied out
(sparse), ``e2fsck -fy`` replays the journal on the copy (a guest that was stopped, not
shut down, may hold its last writes only in the journal), and ``debugfs`` reads files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

DISK_TOOLS = ["sfdisk", "e2fsck", "debugfs", "dd", "zstd"]


def blank_disk(path: Path, size: int) -> Path:
    """A sparse raw file of ``size`` bytes (all zeros), replacing any old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def decompress(packed: Path, raw: Path) -> Path:
    """``zstd -d`` a disk image (the golden builds are zstd) into ``raw``."""
    subprocess.run(["zstd", "-q", "-d", "-f", "-o", str(raw), str(packed)], check=True,
                   timeout=600)
    return raw


def same_prefix(disk: Path, image: Path, chunk: int = 4 << 20) -> int | None:
    """Byte offset of the first difference between ``disk`` and ``image`` over the image's
    length; None when the disk starts with exactly the image's bytes."""
    size = image.stat().st_size
    with disk.open("rb") as d, image.open("rb") as i:
        pos = 0
        while pos < size:
            a = i.read(min(chunk, size - pos))
            b = d.read(len(a))
            if a != b:
                n = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]),
                         min(len(a), len(b)))
                return pos + n
            pos += len(a)
    return None


def sha256_prefix(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        left = size
        while left:
            block = f.read(min(left, 4 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def partitions(disk: Path) -> list[dict]:
    """The MBR/GPT partitions of a raw disk file (``sfdisk -J``); [] for a blank disk."""
    proc = subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True,
                          check=False, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return json.loads(proc.stdout)["partitiontable"].get("partitions", [])


class RootFs:
    """Files of the ext4 root partition (the last ``83`` partition) of a raw disk."""

    def __init__(self, disk: Path, workdir: Path | None = None) -> None:
        parts = [p for p in partitions(disk) if p.get("type") == "83"]
        if not parts:
            raise ValueError(f"{disk}: no Linux partition")
        part = parts[-1]
        self._tmp = tempfile.TemporaryDirectory(prefix="rootfs-", dir=workdir)
        self.image = Path(self._tmp.name) / "root.ext4"
        subprocess.run(["dd", f"if={disk}", f"of={self.image}", "bs=4M",
                        "iflag=skip_bytes,count_bytes", f"skip={part['start'] * 512}",
                        f"count={part['size'] * 512}", "conv=sparse", "status=none"],
                       check=True, timeout=600)
        # 0: clean, 1: errors corrected (a journal replayed counts): both are usable.
        fsck = subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True,
                              text=True, check=False, timeout=600)
        if fsck.returncode not in (0, 1):
            raise ValueError(f"e2fsck of {disk}'s root: {fsck.returncode}\n{fsck.stdout}")

    def read(self, path: str) -> str | None:
        """The file's text, or None when it does not exist."""
        stat = subprocess.run(["debugfs", "-R", f"stat {path}", str(self.image)],
                              capture_output=True, text=True, check=False, timeout=60)
        if "Inode:" not in stat.stdout:
            return None
        out = subprocess.run(["debugfs", "-R", f"cat {path}", str(self.image)],
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> RootFs:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
