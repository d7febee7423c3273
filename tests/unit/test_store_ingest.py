"""Ingest: every drop format is accepted; every corrupt build lands in rejected/ with a
reason and leaves the active version alone."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from netbootd.errors import Conflict, Invalid
from netbootd.settings import StoreSettings
from netbootd.store.build import pack, sample_build, write_manifest
from netbootd.store.errors import TooLarge
from netbootd.store.store import ImageStore


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings())
    s.recover()
    return s


def drop_dir(store: ImageStore, tmp_path: Path, version: str, kind: str = "kernel+initrd",
             image: str = "demo", name: str | None = None) -> str:
    """CI recipe (1): build elsewhere, then rename into incoming/."""
    src = tmp_path / "ci" / f"{image}-{version}"
    sample_build(src, image, version, kind)
    name = name or src.name
    os.rename(src, store.layout.incoming / name)
    return name


def good_v1(store: ImageStore, tmp_path: Path) -> None:
    r = store.ingest_entry(drop_dir(store, tmp_path, "1"))
    assert r is not None and r.accepted, r
    assert store.active("demo", "dev") == "1"


def assert_rejected(store: ImageStore, name: str, needle: str) -> dict:
    r = store.ingest_entry(name)
    assert r is not None and not r.accepted
    assert needle in r.reason, r.reason
    assert not os.path.lexists(store.layout.incoming / name)
    assert os.path.lexists(store.layout.rejected / r.name)
    reason = json.loads((store.layout.rejected / (r.name + ".reason")).read_text())
    assert needle in reason["reason"] and reason["when"]
    assert any(x["name"] == r.name and needle in x["reason"] for x in store.rejected())
    assert not list(store.layout.staging.iterdir()), "staging must be cleaned"
    return reason


def test_directory_drop_is_promoted_and_auto_activated_on_dev(store, tmp_path) -> None:
    name = drop_dir(store, tmp_path, "1")
    r = store.ingest_entry(name)
    assert r.accepted and r.activated == "dev" and r.version == "1"
    root = store.layout.version_dir("demo", "1")
    assert (root / "boot/vmlinuz").read_bytes().startswith(b"KERNEL demo-1-")
    assert not (store.layout.incoming / name).exists()
    assert store.active("demo", "prod") is None, "prod is never auto-activated"
    ref = store.resolve("demo", "dev", None)
    assert ref.version == "1" and ref.root == root and ref.channel == "dev" and not ref.pinned
    assert ref.boot["kernel"] == "boot/vmlinuz" and "boot/initrd.img" in ref.artefacts
    assert store.history("demo")[-1]["by"] == "auto"


@pytest.mark.parametrize("compression, suffix", [("none", ".tar"), ("gz", ".tar.gz"),
                                                  ("zst", ".tar.zst")])
def test_tarball_drops(store, tmp_path, compression, suffix) -> None:
    src = tmp_path / "b"
    sample_build(src, "demo", "7", "pi-boot+rootfs")
    out = tmp_path / ("demo-7" + suffix)
    pack(src, out, compression=compression)
    os.rename(out, store.layout.incoming / out.name)
    r = store.ingest_entry(out.name)
    assert r.accepted, r.reason
    root = store.layout.version_dir("demo", "7")
    assert os.readlink(root / "rootfs/sbin/init") == "/lib/systemd/systemd"
    assert (root / "boot/config.txt").read_bytes() == b"arm_64bit=1\n"


def test_tarball_with_single_top_directory(store, tmp_path) -> None:
    src = tmp_path / "demo-3"
    sample_build(src, "demo", "3", "disk-image")
    out = tmp_path / "demo-3.tgz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src, arcname="demo-3")
    os.rename(out, store.layout.incoming / out.name)
    assert store.ingest_entry(out.name).accepted


def test_marker_protocol(store, tmp_path) -> None:
    src = store.layout.incoming / "demo-5"
    sample_build(src, "demo", "5")
    (store.layout.incoming / "demo-5.ready").touch()
    assert store.incoming_candidates() == ["demo-5"]
    r = store.ingest_entry("demo-5.ready")
    assert r.accepted
    assert not (store.layout.incoming / "demo-5.ready").exists()


def test_ignored_names(store, tmp_path) -> None:
    for n in (".demo.tmp", "demo.tar.partial", "x.tmp", ".hidden"):
        (store.layout.incoming / n).write_bytes(b"half")
    assert store.incoming_candidates() == []
    assert store.ingest_entry(".hidden") is None


# -- corrupt builds ------------------------------------------------------------------------

def test_bad_checksum(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    name = drop_dir(store, tmp_path, "2")
    p = store.layout.incoming / name / "boot/initrd.img"
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    reason = assert_rejected(store, name, "checksum mismatch")
    assert reason["version"] == "2"
    assert store.active("demo", "dev") == "1"
    assert not store.layout.version_dir("demo", "2").exists()


def test_truncated_file_is_a_size_mismatch(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    name = drop_dir(store, tmp_path, "2")
    p = store.layout.incoming / name / "boot/vmlinuz"
    p.write_bytes(p.read_bytes()[:10])
    assert_rejected(store, name, "size mismatch")
    assert store.active("demo", "dev") == "1"


def test_missing_required_file(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    src = tmp_path / "pi"
    sample_build(src, "demo", "2", "pi-boot+rootfs")
    (src / "boot/config.txt").unlink()
    write_manifest(src, "demo", "2", "pi-boot+rootfs", boot={"boot_tree": "boot",
                                                             "rootfs": "rootfs"})
    os.rename(src, store.layout.incoming / "pi")
    assert_rejected(store, "pi", "config.txt")
    assert store.active("demo", "dev") == "1"


def test_missing_kernel_for_kernel_initrd(store, tmp_path) -> None:
    src = tmp_path / "k"
    sample_build(src, "demo", "2")
    (src / "boot/vmlinuz").unlink()
    write_manifest(src, "demo", "2", "kernel+initrd",
                   boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img"})
    os.rename(src, store.layout.incoming / "k")
    assert_rejected(store, "k", "boot/vmlinuz")


def test_missing_listed_file_and_unlisted_file(store, tmp_path) -> None:
    name = drop_dir(store, tmp_path, "2")
    (store.layout.incoming / name / "boot/initrd.img").unlink()
    assert_rejected(store, name, "missing file 'boot/initrd.img'")
    name = drop_dir(store, tmp_path, "3")
    (store.layout.incoming / name / "boot/extra").write_bytes(b"?")
    assert_rejected(store, name, "not listed")


def test_missing_manifest(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    name = drop_dir(store, tmp_path, "2")
    (store.layout.incoming / name / "manifest.json").unlink()
    assert_rejected(store, name, "missing manifest.json")
    assert store.active("demo", "dev") == "1"


def _hostile_tar(store: ImageStore, tmp_path: Path, name: str, evil: tarfile.TarInfo,
                 data: bytes | None = b"x") -> str:
    src = tmp_path / ("src-" + name)
    sample_build(src, "demo", "9")
    path = store.layout.incoming / name
    # hostile member first, then the genuine build
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        if data is not None:
            evil.size = len(data)
            tf.addfile(evil, io.BytesIO(data))
        else:
            tf.addfile(evil)
        tf.add(src, arcname=".")
    return name


def test_tar_with_dotdot(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    name = _hostile_tar(store, tmp_path, "dotdot.tar", tarfile.TarInfo("../../evil"))
    assert_rejected(store, name, "leaves the build")
    assert not (store.layout.images / "evil").exists()
    assert not (store.layout.images.parent / "evil").exists()
    assert store.active("demo", "dev") == "1"


def test_tar_with_absolute_path(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    target = tmp_path / "abs-evil"
    name = _hostile_tar(store, tmp_path, "abs.tar", tarfile.TarInfo(str(target)))
    assert_rejected(store, name, "absolute path")
    assert not target.exists()
    assert store.active("demo", "dev") == "1"


def test_tar_symlink_escape_and_write_through(store, tmp_path) -> None:
    link = tarfile.TarInfo("boot/escape")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc"
    assert_rejected(store, _hostile_tar(store, tmp_path, "sym.tar", link, None), "leaves the build")
    # absolute link outside rootfs: extracted, then refused by validation
    link2 = tarfile.TarInfo("boot/abs")
    link2.type, link2.linkname = tarfile.SYMTYPE, "/etc/shadow"
    assert_rejected(store, _hostile_tar(store, tmp_path, "sym2.tar", link2, None),
                    "outside boot.rootfs")


def test_tar_device_node_refused_unless_allowed(store, tmp_path) -> None:
    dev = tarfile.TarInfo("rootfs/dev/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    assert_rejected(store, _hostile_tar(store, tmp_path, "dev.tar", dev, None), "device node")


def test_truncated_tarball(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    for comp, suffix in (("gz", ".tar.gz"), ("zst", ".tar.zst"), ("none", ".tar")):
        src = tmp_path / f"t{suffix}"
        sample_build(src, "demo", "2", payload=300_000)
        out = tmp_path / ("trunc" + suffix)
        pack(src, out, compression=comp)
        data = out.read_bytes()
        (store.layout.incoming / out.name).write_bytes(data[: len(data) // 2])
        r = store.ingest_entry(out.name)
        assert not r.accepted
        assert "truncated" in r.reason or "mismatch" in r.reason or "missing" in r.reason, \
            r.reason
        assert store.active("demo", "dev") == "1"
        assert not store.layout.version_dir("demo", "2").exists()
        shutil.rmtree(src)


def test_garbage_file(store) -> None:
    (store.layout.incoming / "junk.tar.gz").write_bytes(b"\x1f\x8bnot really gzip" * 10)
    assert_rejected(store, "junk.tar.gz", "corrupt")


def test_version_exists_is_a_rejection_identical_is_idempotent(store, tmp_path) -> None:
    good_v1(store, tmp_path)
    src = tmp_path / "again"
    sample_build(src, "demo", "1", payload=99)  # different bytes, same version
    os.rename(src, store.layout.incoming / "again")
    assert_rejected(store, "again", "version exists")
    # the very same build again (e.g. the incoming copy survived a crash): accepted, no-op
    ver = store.layout.version_dir("demo", "1")
    shutil.copytree(ver, store.layout.incoming / "same", symlinks=True)
    r = store.ingest_entry("same")
    assert r.accepted and r.already_present and r.activated is None
    assert len(store.history("demo")) == 1


def test_signature_required(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    kf = tmp_path / "trusted.pem"
    kf.write_bytes(key.public_key().public_bytes(Encoding.PEM,
                                                 PublicFormat.SubjectPublicKeyInfo))
    st = ImageStore(tmp_path / "images", tmp_path / "state",
                    StoreSettings(require_signature=True, trusted_keys=[kf]))
    sample_build(st.layout.incoming / "unsigned", "demo", "1")
    assert "not signed" in st.ingest_entry("unsigned").reason
    sample_build(st.layout.incoming / "signed", "demo", "2", private_key=key)
    assert st.ingest_entry("signed").accepted
    sample_build(st.layout.incoming / "other", "demo", "3",
                 private_key=Ed25519PrivateKey.generate())
    assert "does not verify" in st.ingest_entry("other").reason


def test_kinds_and_auto_activate_per_image(tmp_path) -> None:
    st = ImageStore(tmp_path / "images", tmp_path / "state",
                    StoreSettings(auto_activate={"pi": "prod", "*": "dev"}))
    for i, kind in enumerate(["installer", "disk-image", "rootfs"]):
        sample_build(st.layout.incoming / f"b{i}", f"img{i}", "1", kind)
        r = st.ingest_entry(f"b{i}")
        assert r.accepted and r.activated == "dev", r.reason
    sample_build(st.layout.incoming / "pi", "pi", "1", "pi-boot+rootfs")
    assert st.ingest_entry("pi").activated == "prod"
    st2 = ImageStore(tmp_path / "i2", tmp_path / "s2", StoreSettings(auto_activate={}))
    sample_build(st2.layout.incoming / "x", "demo", "1")
    r = st2.ingest_entry("x")
    assert r.accepted and r.activated is None and st2.channels("demo") == {}


async def test_http_upload(store, tmp_path) -> None:
    src = tmp_path / "u"
    sample_build(src, "demo", "4")
    out = tmp_path / "u.tar.zst"
    pack(src, out, compression="zst")
    data = out.read_bytes()

    async def body():
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]
            await asyncio.sleep(0)

    res = await store.ingest_upload("demo", "4", body())
    assert res["accepted"] and res["activated"] == "dev", res
    assert not list(store.layout.incoming.iterdir())
    # URL and manifest disagree -> rejected with a reason
    sample_build(tmp_path / "u2", "demo", "5")
    pack(tmp_path / "u2", tmp_path / "u2.tar", compression="none")
    with open(tmp_path / "u2.tar", "rb") as fh:  # noqa: ASYNC230 - a test
        res = await store.ingest_upload("demo", "6", fh)
    assert not res["accepted"] and "manifest says demo/5" in res["reason"]
    with pytest.raises(Invalid):
        await store.ingest_upload("../x", "1", [b""])
    with pytest.raises(TooLarge) as err:
        await store.ingest_upload("demo", "7", [b"x" * 600, b"x" * 600], max_bytes=1000)
    assert err.value.limit == 1000 and isinstance(err.value, Invalid)
    assert not list(store.layout.incoming.iterdir()), "the partial upload is gone"
    (store.layout.incoming / "demo-8.tar.zst").write_bytes(b"")  # an upload is pending
    with pytest.raises(Conflict, match="already pending"):
        await store.ingest_upload("demo", "8", [data])


def test_progress_is_logged_for_large_builds(caplog) -> None:
    import logging

    from netbootd.store.ingest import Progress

    caplog.set_level(logging.INFO, logger="netbootd.store.ingest")
    p = Progress("verify demo/1", 4 << 20, interval=0.0)
    p.add(1 << 20)
    assert "verify demo/1: 1048576 / 4194304 bytes (25%)" in caplog.text


def need_root(what: str) -> None:
    """Fail, never skip: the suite runs as root (./setup.sh test)."""
    if os.geteuid() != 0:
        pytest.fail(f"{what} need root: run the suite as root", pytrace=False)


def test_rootfs_tar_keeps_owner_mode_xattr_and_devices_when_allowed(tmp_path) -> None:
    need_root("owners and device nodes")
    st = ImageStore(tmp_path / "images", tmp_path / "state",
                    StoreSettings(allow_devices=True))
    src = tmp_path / "b"
    sample_build(src, "demo", "1", "rootfs")
    sudo = src / "rootfs/usr/bin/sudo"
    sudo.parent.mkdir(parents=True)
    sudo.write_bytes(b"#!sudo")
    write_manifest(src, "demo", "1", "rootfs", boot={"rootfs": "rootfs"})
    out = st.layout.incoming / "r.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        def meta(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            if ti.name.endswith("usr/bin/sudo"):
                ti.uid, ti.gid, ti.mode = 1234, 4321, 0o4755
                ti.pax_headers = {"SCHILY.xattr.user.netbootd": "kept"}
            return ti
        tf.add(src, arcname=".", filter=meta)
        dev = tarfile.TarInfo("rootfs/dev/null")
        dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tf.addfile(dev)
    r = st.ingest_entry("r.tar")
    assert r.accepted, r.reason
    root = st.layout.version_dir("demo", "1")
    s = (root / "rootfs/usr/bin/sudo").lstat()
    assert (s.st_uid, s.st_gid, s.st_mode & 0o7777) == (1234, 4321, 0o4755)
    assert os.getxattr(root / "rootfs/usr/bin/sudo", "user.netbootd") == b"kept"
    import stat as statmod

    assert statmod.S_ISCHR((root / "rootfs/dev/null").lstat().st_mode)


def test_directory_copy_keeps_owner_and_setuid(tmp_path) -> None:
    need_root("owners")
    st = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings())
    src = st.layout.incoming / "d"
    sample_build(src, "demo", "1", "rootfs")
    f = src / "rootfs/boot/vmlinuz"
    os.chown(f, 1234, 4321)
    os.chmod(f, 0o4750)
    os.chown(src / "rootfs/etc", 1111, 2222)
    assert st.ingest_entry("d").accepted
    root = st.layout.version_dir("demo", "1")
    s = (root / "rootfs/boot/vmlinuz").lstat()
    assert (s.st_uid, s.st_gid, s.st_mode & 0o7777) == (1234, 4321, 0o4750)
    assert (root / "rootfs/etc").lstat().st_uid == 1111


def test_tar_hard_links(store, tmp_path) -> None:
    """GNU tar's hard links (to an earlier file) are fine; a link to itself or to a
    member that is not an earlier regular file is a rejection, not a crash."""
    src = tmp_path / "h"
    sample_build(src, "demo", "1", "rootfs")
    os.link(src / "rootfs/boot/vmlinuz", src / "rootfs/boot/vmlinuz.old")
    write_manifest(src, "demo", "1", "rootfs", boot={"rootfs": "rootfs"})
    pack(src, store.layout.incoming / "h.tar", compression="none")
    assert store.ingest_entry("h.tar").accepted
    root = store.layout.version_dir("demo", "1")
    assert (root / "rootfs/boot/vmlinuz.old").stat().st_ino == \
        (root / "rootfs/boot/vmlinuz").stat().st_ino
    for target in ("rootfs/etc", "boot/self", "rootfs/missing"):
        link = tarfile.TarInfo("boot/self")
        link.type, link.linkname = tarfile.LNKTYPE, target
        name = _hostile_tar(store, tmp_path, f"hl-{target.replace('/', '-')}.tar", link, None)
        assert_rejected(store, name, "not an earlier regular file")
