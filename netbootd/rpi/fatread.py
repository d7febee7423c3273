"""Files out of a FAT16/FAT32 image in memory: how the Pi firmware reads a boot.img ramdisk.

The emulated Pi (:mod:`.httpclient`) reads ``config.txt``, ``cmdline.txt``, the dtb and
the kernel out of the image it downloaded. It does so here, in memory, rather than with
mtools: netbootd *builds* the image with mtools, and a reader that shared the builder's
tools would hide their bugs; and a storm of a hundred emulated Pis must not cost a
hundred temporary files and subprocesses (the per-Pi ``mcopy`` was most of the emulated
client's time, docs/benchmarks.md).

Enough FAT for a boot partition: the BIOS parameter block, FAT16 or FAT32 chosen by the
cluster count as the specification says, cluster chains, the fixed FAT16 root directory,
long file names (VFAT) with their checksum, case-insensitive lookup. Anything malformed
raises :class:`FatError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class FatError(Exception):
    """Not a FAT image this reader understands, or a path that is not in it."""


@dataclass(frozen=True)
class _Entry:
    name: str
    cluster: int
    size: int
    is_dir: bool


def _short_name(e: bytes) -> str:
    base, ext = e[0:8], e[8:11]
    if base[0] == 0x05:
        base = b"\xe5" + base[1:]
    b = base.rstrip(b" ").decode("latin-1")
    x = ext.rstrip(b" ").decode("latin-1")
    if e[12] & 0x08:
        b = b.lower()
    if e[12] & 0x10:
        x = x.lower()
    return f"{b}.{x}" if x else b


def _lfn_checksum(short: bytes) -> int:
    s = 0
    for c in short:
        s = (((s & 1) << 7) + (s >> 1) + c) & 0xFF
    return s


class FatImage:
    """A read-only view of one FAT image (``bytes``, ``bytearray`` or ``memoryview``)."""

    def __init__(self, image: bytes | bytearray | memoryview) -> None:
        self.img = memoryview(image)
        if len(self.img) < 512 or bytes(self.img[510:512]) != b"\x55\xaa":
            raise FatError("no boot sector signature")
        (bps, spc, rsv, nfats, root_ents, tot16, _media, fat16) = struct.unpack_from(
            "<HBHBHHBH", self.img, 11)
        tot32, fat32, root_cluster = struct.unpack_from("<IIxxxxI", self.img, 32)
        if bps not in (512, 1024, 2048, 4096) or spc == 0 or nfats == 0:
            raise FatError(f"bad BIOS parameter block (bytes/sector {bps}, sectors/cluster {spc})")
        fat_sectors = fat16 or fat32
        total = tot16 or tot32
        root_sectors = (root_ents * 32 + bps - 1) // bps
        first_data = rsv + nfats * fat_sectors + root_sectors
        clusters = (total - first_data) // spc
        if clusters < 4085:
            raise FatError(f"FAT12 ({clusters} clusters): not a boot.img layout")
        self.fat32 = clusters >= 65525
        self.cluster_bytes = bps * spc
        self.clusters = clusters
        self.fat_off = rsv * bps
        self.data_off = first_data * bps
        self.root_off = (rsv + nfats * fat_sectors) * bps
        self.root_len = root_ents * 32
        self.root_cluster = root_cluster if self.fat32 else 0
        if total * bps > len(self.img):
            raise FatError(f"image is {len(self.img)} bytes, its FAT says {total * bps}")

    # -- clusters ------------------------------------------------------------------------
    def _chain(self, first: int) -> list[int]:
        out: list[int] = []
        c = first
        end = 0x0FFFFFF8 if self.fat32 else 0xFFF8
        while True:
            if not 2 <= c < self.clusters + 2 or len(out) > self.clusters:
                raise FatError(f"broken cluster chain at {c}")
            out.append(c)
            if self.fat32:
                c = struct.unpack_from("<I", self.img, self.fat_off + 4 * c)[0] & 0x0FFFFFFF
            else:
                c = struct.unpack_from("<H", self.img, self.fat_off + 2 * c)[0]
            if c >= end:
                return out

    def _data(self, first: int, size: int | None) -> bytes:
        if first == 0:
            return b""
        cb, base = self.cluster_bytes, self.data_off
        chain = self._chain(first)
        parts: list[memoryview] = []
        run_start = prev = chain[0]
        for c in [*chain[1:], -1]:  # contiguous runs are one slice (mtools writes them so)
            if c == prev + 1:
                prev = c
                continue
            parts.append(self.img[base + (run_start - 2) * cb:base + (prev - 1) * cb])
            run_start = prev = c
        data = b"".join(parts)
        if size is not None:
            if size > len(data):
                raise FatError(f"file of {size} bytes in {len(data)} bytes of clusters")
            data = data[:size]
        return data

    # -- directories ---------------------------------------------------------------------
    def _entries(self, cluster: int) -> list[_Entry]:
        if cluster == 0:
            raw = bytes(self.img[self.root_off:self.root_off + self.root_len])
        else:
            raw = self._data(cluster, None)
        out: list[_Entry] = []
        lfn: dict[int, str] = {}
        lfn_sum = -1
        for i in range(0, len(raw) - 31, 32):
            e = raw[i:i + 32]
            if e[0] == 0:
                break
            if e[0] == 0xE5:
                lfn.clear()
                continue
            if e[11] == 0x0F:  # a long-name piece, last piece first
                if e[0] & 0x40:
                    lfn.clear()
                    lfn_sum = e[13]
                lfn[e[0] & 0x1F] = (e[1:11] + e[14:26] + e[28:32]).decode("utf-16-le")
                continue
            name = _short_name(e)
            if lfn and lfn_sum == _lfn_checksum(e[0:11]):
                name = "".join(lfn[k] for k in sorted(lfn)).split("\x00", 1)[0]
            lfn.clear()
            if e[11] & 0x08:  # volume label
                continue
            hi, lo = struct.unpack_from("<H", e, 20)[0], struct.unpack_from("<H", e, 26)[0]
            cluster_no = (hi << 16 | lo) if self.fat32 else lo
            out.append(_Entry(name, cluster_no, struct.unpack_from("<I", e, 28)[0],
                              bool(e[11] & 0x10)))
        return out

    def read(self, path: str) -> bytes:
        """The bytes of ``path`` ("cmdline.txt", "overlays/x.dtbo"); case-insensitive."""
        cluster = self.root_cluster
        parts = [p for p in path.split("/") if p]
        for depth, part in enumerate(parts):
            hit = next((e for e in self._entries(cluster) if e.name.lower() == part.lower()),
                       None)
            last = depth == len(parts) - 1
            if hit is None or hit.is_dir == last:
                raise FatError(f"{path}: not in the image")
            if last:
                return self._data(hit.cluster, hit.size)
            cluster = hit.cluster
        raise FatError(f"{path}: not a file")
