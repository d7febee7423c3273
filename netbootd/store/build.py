"""Producing builds: write ``manifest.json`` for a directory, pack it as tar / tar.gz / tar.zst.

Used by CI (``python -m netbootd.store.build DIR --image demo --version 1 --kind ...``),
by the tests and by the benchmark, so all three make builds the same way the
store validates them.

A ``disk`` build's manifest also gets its ``disk`` section: the stored file's size and
sha256, and the raw image's, found by decompressing it as a stream (zstd via the
``zstandard`` module or the ``zstd`` program, xz via ``lzma``, gzip via ``gzip``) --
the store never decompresses, so the figures the installer checks come from here.
Hashing a multi-GB image takes a while: progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .manifest import (
    DETACHED_SIG,
    DISK_SUFFIXES,
    KIND_ALIASES,
    MANIFEST,
    disk_compression,
    sign_manifest,
)

CHUNK = 1 << 20
#: Seconds between progress lines on stderr.
PROGRESS_EVERY = 2.0

#: Called with (what, bytes done, bytes total or None) while hashing.
ProgressFn = Callable[[str, int, int | None], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def stderr_progress() -> ProgressFn:
    """A progress sink that prints at most every PROGRESS_EVERY seconds to stderr."""
    last = [0.0]

    def report(what: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY and (total is None or done < total):
            return
        last[0] = now
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        size = f" / {total / 1e6:.1f}" if total else ""
        print(f"{what}: {done / 1e6:.1f}{size} MB{pct}", file=sys.stderr, flush=True)

    return report


def _decompressed(path: Path, compression: str) -> Iterator[bytes]:
    """The raw image's bytes, streamed (never the whole image in memory)."""
    if compression == "none":
        with open(path, "rb") as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")
    elif compression == "xz":
        with lzma.open(path, "rb") as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")
    elif compression == "gz":
        with gzip.open(path, "rb") as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")
    elif compression == "zst":
        yield from _unzstd(path)
    else:
        raise ValueError(f"unknown compression {compression!r}")


def _unzstd(path: Path) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:
        zstandard = None  # type: ignore[assignment]
    if zstandard is not None:
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")
        return
    exe = shutil.which("zstd")
    if exe is None:
        raise RuntimeError("a .zst disk image needs the zstandard module or the zstd program")
    with subprocess.Popen([exe, "-dc", "--", str(path)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        yield from iter(lambda: proc.stdout.read(CHUNK), b"")  # type: ignore[union-attr]
        if proc.wait() != 0:
            raise RuntimeError(f"zstd -dc {path} failed (exit {proc.returncode})")


def disk_section(root: Path, path: str, *, progress: ProgressFn | None = None
                 ) -> dict[str, Any]:
    """The manifest's ``disk`` section for the image file ``root/path``: its compression
    (from the name), size and sha256, and the raw image's size and sha256."""
    compression = disk_compression(path)
    if compression is None:
        raise ValueError(f"disk image {path!r} must end in {', '.join(DISK_SUFFIXES)}")
    f = root / path
    size = f.stat().st_size
    stored = hashlib.sha256()
    with open(f, "rb") as fh:
        done = 0
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            stored.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"sha256 {path}", done, size)
    if compression == "none":
        raw_size, raw_sha = size, stored.hexdigest()
    else:
        h = hashlib.sha256()
        raw_size = 0
        for chunk in _decompressed(f, compression):
            h.update(chunk)
            raw_size += len(chunk)
            if progress:
                progress(f"decompress {path}", raw_size, None)
        if progress:  # the raw size is known only now: the closing line says it
            progress(f"decompress {path}", raw_size, raw_size)
        raw_sha = h.hexdigest()
    return {"path": path, "compression": compression, "size": size,
            "sha256": stored.hexdigest(), "uncompressed_size": raw_size,
            "uncompressed_sha256": raw_sha}


def find_disk(artefacts: list[dict[str, Any]]) -> str:
    """The one disk image file among the artefacts (``*.img``, ``*.img.zst``...)."""
    found = [a["path"] for a in artefacts if disk_compression(a["path"]) is not None]
    if len(found) != 1:
        raise ValueError(f"a disk build has exactly one disk image file "
                         f"({', '.join(DISK_SUFFIXES)}); found {found or 'none'}: "
                         "name it with --disk")
    return str(found[0])


def manifest_for(root: Path, image: str, version: str, kind: str, *,
                 boards: list[str] | None = None, boot: dict[str, str] | None = None,
                 created: str | None = None, disk: str | None = None,
                 progress: ProgressFn | None = None) -> dict[str, Any]:
    """A manifest dict listing every regular file under ``root`` (except the manifest).

    For kind ``disk`` (or its old name ``disk-image``) it adds the ``disk`` section for
    ``disk`` (default: ``boot.disk``, else the one ``*.img*`` file of the build).
    """
    artefacts = []
    for cur, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            p = Path(cur) / name
            rel = p.relative_to(root).as_posix()
            if rel in (MANIFEST, DETACHED_SIG) or not stat.S_ISREG(p.lstat().st_mode):
                continue
            artefacts.append({"path": rel, "size": p.lstat().st_size, "sha256": _sha256(p)})
    kind = KIND_ALIASES.get(kind, kind)
    out: dict[str, Any] = {
        "image": image, "version": version,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "kind": kind, "boards": boards or ["x86_64"], "boot": dict(boot or {}),
        "artefacts": artefacts,
    }
    if kind == "disk":
        path = disk or out["boot"].get("disk") or find_disk(artefacts)
        out["disk"] = disk_section(root, path, progress=progress)
        out["boot"].pop("disk", None)  # the disk section says it (ImageRef.boot still has it)
    return out


def write_manifest(root: Path, image: str, version: str, kind: str, *,
                   boards: list[str] | None = None, boot: dict[str, str] | None = None,
                   created: str | None = None, private_key: Any = None,
                   disk: str | None = None, progress: ProgressFn | None = None
                   ) -> dict[str, Any]:
    """Write ``root/manifest.json`` (signed when ``private_key`` is an Ed25519PrivateKey)."""
    m = manifest_for(root, image, version, kind, boards=boards, boot=boot, created=created,
                     disk=disk, progress=progress)
    if private_key is not None:
        m = sign_manifest(m, private_key)
    (root / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
    return m


def _add_build(tf: tarfile.TarFile, root: Path) -> None:
    """The build at the archive top, ``manifest.json`` (and its signature) first: the
    store then knows the declared sizes before any payload arrives and bounds the
    unpacking by them from the first byte (docs/store.md, "Limits")."""
    tf.add(root, arcname=".", recursive=False)
    firsts = [n for n in (MANIFEST, DETACHED_SIG) if (root / n).is_file()]
    for n in firsts:
        tf.add(root / n, arcname=n)
    for e in sorted(os.listdir(root)):
        if e not in firsts:
            tf.add(root / e, arcname=e)


def pack(root: Path, out: Path, *, compression: str = "gz") -> Path:
    """Pack a build directory (contents at the archive top) as tar, tar.gz or tar.zst."""
    if compression == "zst":
        import zstandard

        with open(out, "wb") as raw, \
                zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw, \
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            _add_build(tf, root)
        return out
    mode = {"gz": "w:gz", "": "w", "none": "w"}[compression]
    with tarfile.open(out, mode, format=tarfile.PAX_FORMAT) as tf:
        _add_build(tf, root)
    return out


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar archive from hand-made members (tests build hostile archives with it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


#: Boot sections of the sample builds (one per kind), as CI would write them.
SAMPLE_BOOT = {
    "kernel+initrd": {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                      "cmdline": "console=ttyS0"},
    "installer": {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img"},
    "pi-boot+rootfs": {"boot_tree": "boot", "rootfs": "rootfs"},
    "rootfs": {"rootfs": "rootfs", "kernel": "rootfs/boot/vmlinuz"},
    "disk": {},
}


def sample_build(root: Path, image: str, version: str, kind: str = "kernel+initrd", *,
                 payload: int = 1024, created: str | None = None,
                 private_key: Any = None) -> dict[str, Any]:
    """A small but complete build of ``kind`` (tests, bench, the demo image).

    ``payload`` bytes of version-specific content go into the biggest file, so two
    versions never share bytes (the hot-swap tests compare them).
    """
    kind = KIND_ALIASES.get(kind, kind)
    root.mkdir(parents=True, exist_ok=True)
    fill = (f"{image}-{version}-".encode() * (payload // 8 + 1))[:payload]

    def put(rel: str, data: bytes) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    if kind in ("kernel+initrd", "installer"):
        put("boot/vmlinuz", b"KERNEL " + fill)
        put("boot/initrd.img", b"INITRD " + version.encode())
    elif kind == "pi-boot+rootfs":
        put("boot/config.txt", b"arm_64bit=1\n")
        put("boot/kernel_2712.img", b"PIKERNEL " + fill)
        put("boot/bcm2712-rpi-5-b.dtb", b"DTB")
        put("boot/start4.elf", b"START")
        put("rootfs/etc/hostname", b"pi\n")
        put("rootfs/etc/os-release", f"VERSION={version}\n".encode())
        (root / "rootfs/sbin").mkdir(parents=True, exist_ok=True)
        os.symlink("/lib/systemd/systemd", root / "rootfs/sbin/init")
    elif kind == "rootfs":
        put("rootfs/boot/vmlinuz", b"KERNEL " + fill)
        put("rootfs/etc/os-release", f"VERSION={version}\n".encode())
    elif kind == "disk":
        put("disk.img", b"DISK " + fill)
    boards = ["rpi5"] if kind == "pi-boot+rootfs" else ["x86_64"]
    return write_manifest(root, image, version, kind, boards=boards,
                          boot=dict(SAMPLE_BOOT[kind]), created=created,
                          private_key=private_key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write manifest.json for a build directory "
                                 "(and optionally pack it) for the netbootd image store.")
    ap.add_argument("root", type=Path)
    ap.add_argument("--image", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--kind", required=True, choices=["kernel+initrd", "pi-boot+rootfs",
                                                       "rootfs", "disk", "installer",
                                                       *KIND_ALIASES])
    ap.add_argument("--board", action="append", dest="boards", default=None)
    ap.add_argument("--boot", action="append", default=[], metavar="KEY=VALUE",
                    help="boot section entry, e.g. kernel=boot/vmlinuz (repeatable)")
    ap.add_argument("--disk", metavar="PATH", help="kind disk: the disk image file (default: "
                    "the one *.img, *.img.zst, *.img.xz or *.img.gz of the build)")
    ap.add_argument("--sign-key", type=Path, help="PEM ed25519 private key")
    ap.add_argument("--pack", type=Path, help="also write this archive (.tar, .tar.gz, .tar.zst)")
    a = ap.parse_args(argv)
    key = None
    if a.sign_key:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(a.sign_key.read_bytes(), password=None)
    boot = dict(kv.split("=", 1) for kv in a.boot)
    try:
        write_manifest(a.root, a.image, a.version, a.kind, boards=a.boards, boot=boot,
                       private_key=key, disk=a.disk, progress=stderr_progress())
    except (ValueError, RuntimeError) as exc:
        print(f"netbootd.store.build: {exc}", file=sys.stderr)
        return 2
    if a.pack:
        name = a.pack.name
        comp = "zst" if name.endswith(".zst") else "gz" if name.endswith(".gz") else "none"
        pack(a.root, a.pack, compression=comp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
