"""The emulated Pi's in-memory FAT reader against images made by mtools (what netbootd
builds boot.img with): FAT16 as boot.img uses it and FAT32, long and short names, a
subdirectory, a file spread over many clusters, an empty file, a fragmented file."""

from __future__ import annotations

import os
import random
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest

from netbootd.rpi.bootimg import Content, write_image
from netbootd.rpi.fatread import FatError, FatImage

ENV = {**os.environ, "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"}


def tree(tmp: Path) -> dict[str, bytes]:
    rng = random.Random(7)
    files = {
        "kernel_2712.img": rng.randbytes(3_000_001),
        "bcm2712-rpi-5-b.dtb": rng.randbytes(80_000),
        "overlays/overlay_map.dtb": rng.randbytes(5_000),
        "overlays/bcm2712d0.dtbo": b"",
        "start4.elf": rng.randbytes(4096),
        "A Long Name With Spaces.txt": b"spaces\n",
    }
    for rel, data in files.items():
        (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "src" / rel).write_bytes(data)
    return files


def test_reads_every_file_of_a_boot_img_built_by_netbootd(tmp_path: Path) -> None:
    files = tree(tmp_path)
    content = Content.make("pi", "1", [(r, tmp_path / "src" / r) for r in files],
                           {"cmdline.txt": b"console=tty1 netbootd.mac=x\n",
                            "config.txt": b"arm_64bit=1\n"})
    img = tmp_path / "boot.img"
    write_image(content, img, tmp_path / "work")
    fat = FatImage(img.read_bytes())
    assert not fat.fat32
    for rel, data in files.items():
        assert fat.read(rel) == data, rel
    assert fat.read("cmdline.txt") == b"console=tty1 netbootd.mac=x\n"
    assert fat.read("CONFIG.TXT") == b"arm_64bit=1\n"  # FAT is case-insensitive
    for missing in ("initramfs_2712", "overlays", "overlays/nope.dtbo", "cmdline.txt/x"):
        with pytest.raises(FatError):
            fat.read(missing)


def test_fat32_and_a_fragmented_file(tmp_path: Path) -> None:
    img = tmp_path / "fat32.img"
    with open(img, "wb") as f:
        f.truncate(40 << 20)
    # 512-byte clusters: >= 65525 of them makes FAT32 in 40 MiB
    subprocess.run(["mformat", "-i", str(img), "-F", "-c", "1", "::"], check=True, env=ENV)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(10_000))
    b.write_bytes(os.urandom(20_000))
    for p in (a, b):
        subprocess.run(["mcopy", "-i", str(img), str(p), "::/"], check=True, env=ENV)
    # fill the disk but for 15,000 bytes, delete a, then write a file bigger than a's
    # hole and than the space left: its clusters cannot be contiguous
    subprocess.run(["mmd", "-i", str(img), "::/sub"], check=True, env=ENV)
    listing = subprocess.run(["mdir", "-i", str(img), "::/"], check=True, env=ENV,
                             capture_output=True, text=True).stdout
    line = next(ln for ln in listing.splitlines() if "bytes free" in ln)
    free = int("".join(ch for ch in line if ch.isdigit()))  # "41 281 024 bytes free"
    filler = tmp_path / "filler.bin"
    with open(filler, "wb") as f:
        f.truncate(free - 15_000)
    subprocess.run(["mcopy", "-i", str(img), str(filler), "::/"], check=True, env=ENV)
    subprocess.run(["mdel", "-i", str(img), "::/a.bin"], check=True, env=ENV)
    frag = tmp_path / "fragmented_long_name.bin"
    frag.write_bytes(os.urandom(25_000))
    subprocess.run(["mcopy", "-i", str(img), str(frag), "::/sub/"], check=True, env=ENV)
    fat = FatImage(img.read_bytes())
    assert fat.fat32
    assert fat.read("b.bin") == b.read_bytes()
    assert fat.read("sub/fragmented_long_name.bin") == frag.read_bytes()
    sub = next(e for e in fat._entries(fat.root_cluster) if e.name == "sub")
    entry = next(e for e in fat._entries(sub.cluster) if e.name.startswith("fragmented"))
    chain = fat._chain(entry.cluster)
    assert any(b != a + 1 for a, b in pairwise(chain)), "the file is not fragmented"
    with pytest.raises(FatError):
        fat.read("a.bin")


def test_not_a_fat_image() -> None:
    with pytest.raises(FatError):
        FatImage(b"\0" * 4096)
    sector = bytearray(512)
    sector[510:512] = b"\x55\xaa"
    with pytest.raises(FatError):
        FatImage(bytes(sector))  # a signature but no BIOS parameter block
