"""A zip bomb in the shape of the one that once filled the store's file system: a complete,
valid-looking build (tar.zst) whose manifest declares a small initrd while the archive
carries ``unpacked`` bytes of zeros under that name (~100 KB on disk for 3 GiB). The zeros
are streamed into the compressor, never held in memory.
"""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[2]
CHUNK = 4 << 20


def _member(out, name: str, size: int, chunks) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    out.write(info.tobuf(format=tarfile.PAX_FORMAT))
    for chunk in chunks:
        out.write(chunk)
    if size % 512:
        out.write(bytes(512 - size % 512))


def _zeros(size: int):
    block = bytes(CHUNK)
    left = size
    while left > 0:
        yield block[:min(CHUNK, left)]
        left -= CHUNK


def write_bomb(path: Path, work: Path, *, unpacked: int = 3 << 30) -> Path:
    """Write the bomb to ``path`` (a ``.tmp`` name first, then renamed: an announced drop)."""
    sys.path.insert(0, str(REPO))
    from netbootd.store.build import sample_build

    src = work / "bomb-src"
    sample_build(src, "demo", "2026.12.05-bomb")
    files = sorted((p for p in src.rglob("*") if p.is_file()),
                   key=lambda p: p.name != "manifest.json")  # manifest first, as CI packs
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw:
        for p in files:
            rel = p.relative_to(src).as_posix()
            if p.name == "initrd.img":
                _member(zw, rel, unpacked, _zeros(unpacked))
            else:
                data = p.read_bytes()
                _member(zw, rel, len(data), [data])
        zw.write(bytes(1024))
    os.replace(tmp, path)
    return path
