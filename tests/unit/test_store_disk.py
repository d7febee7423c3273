"""Disk images (kind ``disk``) and installers: build.py writes the disk section, ingest
checks it, ImageRef carries it."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from netbootd.settings import StoreSettings
from netbootd.store.build import disk_section, main, sample_build, write_manifest
from netbootd.store.store import ImageStore

#: A raw image that compresses well and is not all one byte (sizes differ per format).
RAW = b"".join(i.to_bytes(4, "big") * 64 for i in range(3000))

COMPRESS = {"zst": lambda b: zstandard.ZstdCompressor().compress(b), "xz": lzma.compress,
            "gz": gzip.compress, "none": lambda b: b}
SUFFIX = {"zst": ".img.zst", "xz": ".img.xz", "gz": ".img.gz", "none": ".img"}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings(auto_activate={}))


def disk_build(root: Path, comp: str, version: str = "1") -> Path:
    root.mkdir(parents=True)
    (root / f"os{SUFFIX[comp]}").write_bytes(COMPRESS[comp](RAW))
    write_manifest(root, "os", version, "disk", boards=["rpi5"])
    return root


@pytest.mark.parametrize("comp", ["zst", "xz", "gz", "none"])
def test_disk_build_is_described_and_ingested(store, comp) -> None:
    src = disk_build(store.layout.incoming / f"os-{comp}", comp)
    m = json.loads((src / "manifest.json").read_text())
    stored = (src / f"os{SUFFIX[comp]}").read_bytes()
    assert m["kind"] == "disk" and m["disk"] == {
        "path": f"os{SUFFIX[comp]}", "compression": comp, "size": len(stored),
        "sha256": hashlib.sha256(stored).hexdigest(), "uncompressed_size": len(RAW),
        "uncompressed_sha256": hashlib.sha256(RAW).hexdigest()}
    r = store.ingest_entry(f"os-{comp}")
    assert r.accepted, r.reason
    ref = store.ref("os", "1")
    assert ref.kind == "disk" and ref.boot["disk"] == f"os{SUFFIX[comp]}"
    assert ref.disk.compression == comp and ref.disk.uncompressed_size == len(RAW)
    assert ref.disk.sha256 == m["disk"]["sha256"] and ref.boards == ("rpi5",)


def test_zstd_program_when_the_module_is_missing(tmp_path, monkeypatch) -> None:
    (tmp_path / "a.img.zst").write_bytes(COMPRESS["zst"](RAW))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    d = disk_section(tmp_path, "a.img.zst")
    assert d["uncompressed_sha256"] == hashlib.sha256(RAW).hexdigest()


def test_tampered_disk_image_is_rejected(store) -> None:
    src = disk_build(store.layout.incoming / "os", "gz")
    (src / "os.img.gz").write_bytes(gzip.compress(RAW[:-1] + b"x"))
    r = store.ingest_entry("os")
    assert not r.accepted and ("mismatch" in r.reason), r.reason


def test_disk_build_without_a_disk_section_is_rejected(store) -> None:
    src = store.layout.incoming / "os"
    src.mkdir()
    (src / "os.img").write_bytes(RAW)
    m = write_manifest(src, "os", "1", "kernel+initrd")  # then made a disk by hand
    m.update(kind="disk-image", boot={"disk": "os.img"})
    (src / "manifest.json").write_text(json.dumps(m))
    r = store.ingest_entry("os")
    assert not r.accepted and "disk section" in r.reason


def test_older_disk_image_samples_still_build(store) -> None:
    sample_build(store.layout.incoming / "old", "os", "1", "disk-image")
    assert store.ingest_entry("old").accepted
    assert store.ref("os", "1").disk.compression == "none"


def test_build_cli_writes_a_disk_manifest_with_progress_on_stderr(tmp_path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "os.img.xz").write_bytes(COMPRESS["xz"](RAW))
    (root / "README").write_text("flash me")
    proc = subprocess.run([sys.executable, "-m", "netbootd.store.build", str(root),
                           "--image", "os", "--version", "1", "--kind", "disk",
                           "--board", "rpi5"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "decompress os.img.xz" in proc.stderr and "MB" in proc.stderr
    m = json.loads((root / "manifest.json").read_text())
    assert m["disk"]["path"] == "os.img.xz" and m["disk"]["uncompressed_size"] == len(RAW)


def test_build_refuses_two_disk_images_without_disk_option(tmp_path, capsys) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "a.img").write_bytes(b"a")
    (root / "b.img").write_bytes(b"b")
    assert main([str(root), "--image", "os", "--version", "1", "--kind", "disk"]) == 2
    assert "--disk" in capsys.readouterr().err
    assert main([str(root), "--image", "os", "--version", "1", "--kind", "disk",
                 "--disk", "b.img"]) == 0
    assert json.loads((root / "manifest.json").read_text())["disk"]["path"] == "b.img"


def test_installer_with_a_pi_boot_tree(store) -> None:
    src = store.layout.incoming / "inst"
    sample_build(src, "installer", "1", "installer")
    for name, data in (("boot/config.txt", b"arm_64bit=1\n"), ("boot/kernel_2712.img", b"K"),
                       ("boot/bcm2712-rpi-5-b.dtb", b"D")):
        (src / name).write_bytes(data)
    write_manifest(src, "installer", "1", "installer", boards=["rpi5", "x86_64"],
                   boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                         "boot_tree": "boot"})
    assert store.ingest_entry("inst").accepted
    bad = store.layout.incoming / "inst2"
    sample_build(bad, "installer", "2", "installer")
    write_manifest(bad, "installer", "2", "installer",
                   boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                         "boot_tree": "boot"})
    r = store.ingest_entry("inst2")
    assert not r.accepted and "config.txt" in r.reason
