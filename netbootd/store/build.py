"""Producing builds: write ``manifest.json`` for a directory, pack it as tar / tar.gz / tar.zst.

Used by CI (``python -m netbootd.store.build DIR --image demo --version 1 --kind ...``),
by the tests and by the benchmark, so all three make builds the same way the
store validates them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import stat
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .manifest import DETACHED_SIG, MANIFEST, sign_manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_for(root: Path, image: str, version: str, kind: str, *,
                 boards: list[str] | None = None, boot: dict[str, str] | None = None,
                 created: str | None = None) -> dict[str, Any]:
    """A manifest dict listing every regular file under ``root`` (except the manifest)."""
    artefacts = []
    for cur, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            p = Path(cur) / name
            rel = p.relative_to(root).as_posix()
            if rel in (MANIFEST, DETACHED_SIG) or not stat.S_ISREG(p.lstat().st_mode):
                continue
            artefacts.append({"path": rel, "size": p.lstat().st_size, "sha256": _sha256(p)})
    return {
        "image": image, "version": version,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "kind": kind, "boards": boards or ["x86_64"], "boot": boot or {},
        "artefacts": artefacts,
    }


def write_manifest(root: Path, image: str, version: str, kind: str, *,
                   boards: list[str] | None = None, boot: dict[str, str] | None = None,
                   created: str | None = None, private_key: Any = None) -> dict[str, Any]:
    """Write ``root/manifest.json`` (signed when ``private_key`` is an Ed25519PrivateKey)."""
    m = manifest_for(root, image, version, kind, boards=boards, boot=boot, created=created)
    if private_key is not None:
        m = sign_manifest(m, private_key)
    (root / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
    return m


def pack(root: Path, out: Path, *, compression: str = "gz") -> Path:
    """Pack a build directory (contents at the archive top) as tar, tar.gz or tar.zst."""
    if compression == "zst":
        import zstandard

        with open(out, "wb") as raw, \
                zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw, \
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            tf.add(root, arcname=".")
        return out
    mode = {"gz": "w:gz", "": "w", "none": "w"}[compression]
    with tarfile.open(out, mode, format=tarfile.PAX_FORMAT) as tf:
        tf.add(root, arcname=".")
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
    "disk-image": {"disk": "disk.img"},
}


def sample_build(root: Path, image: str, version: str, kind: str = "kernel+initrd", *,
                 payload: int = 1024, created: str | None = None,
                 private_key: Any = None) -> dict[str, Any]:
    """A small but complete build of ``kind`` (tests, bench, the demo image).

    ``payload`` bytes of version-specific content go into the biggest file, so two
    versions never share bytes (the hot-swap tests compare them).
    """
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
    elif kind == "disk-image":
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
                                                       "rootfs", "disk-image", "installer"])
    ap.add_argument("--board", action="append", dest="boards", default=None)
    ap.add_argument("--boot", action="append", default=[], metavar="KEY=VALUE",
                    help="boot section entry, e.g. kernel=boot/vmlinuz (repeatable)")
    ap.add_argument("--sign-key", type=Path, help="PEM ed25519 private key")
    ap.add_argument("--pack", type=Path, help="also write this archive (.tar, .tar.gz, .tar.zst)")
    a = ap.parse_args(argv)
    key = None
    if a.sign_key:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(a.sign_key.read_bytes(), password=None)
    boot = dict(kv.split("=", 1) for kv in a.boot)
    write_manifest(a.root, a.image, a.version, a.kind, boards=a.boards, boot=boot,
                   private_key=key)
    if a.pack:
        name = a.pack.name
        comp = "zst" if name.endswith(".zst") else "gz" if name.endswith(".gz") else "none"
        pack(a.root, a.pack, compression=comp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
