"""The content pool: versions share files equal in content *and* metadata, never others;
ingest writes only what the pool lacks; GC frees only what no version links."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from netbootd.settings import StoreSettings
from netbootd.store.build import pack, write_manifest
from netbootd.store.ingest import validate_build
from netbootd.store.objects import Meta
from netbootd.store.store import ImageStore

#: A fixed mtime: package files keep the time of their .deb, equal between builds.
T0 = 1_700_000_000


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings(keep=1,
                                                                          keep_booted_hours=0))
    s.recover()
    return s


def rootfs(root: Path, version: str, *, changed: dict[str, bytes] | None = None,
           files: int = 40) -> None:
    """A rootfs build: ``files`` package files (same bytes and mtime in every version)
    plus ``changed`` (path -> bytes) that differ."""
    for i in range(files):
        p = root / f"rootfs/usr/share/pkg{i % 4}/file{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"package file {i}\n".encode() * (50 + i))
        os.utime(p, (T0, T0))
    for rel, data in (changed or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    write_manifest(root, "demo", version, "rootfs", boot={"rootfs": "rootfs"})


def drop(store: ImageStore, tmp_path: Path, version: str, fmt: str, **kw) -> str:
    src = tmp_path / "ci" / f"demo-{version}"
    rootfs(src, version, **kw)
    if fmt == "dir":
        name = src.name
        os.rename(src, store.layout.incoming / name)
    else:
        name = f"demo-{version}.tar.zst"
        pack(src, tmp_path / "ci" / name, compression="zst")
        os.rename(tmp_path / "ci" / name, store.layout.incoming / name)
    return name


def ino(store: ImageStore, version: str, rel: str) -> int:
    return os.lstat(store.layout.version_dir("demo", version) / rel).st_ino


def assert_pool_clean(store: ImageStore) -> None:
    """Every object is linked by some version, and every artefact links its object."""
    objects = dict(store.pool.objects())
    assert all(st.st_nlink >= 2 for st in objects.values()), "unreferenced object"
    temps = [p for d in store.layout.objects.iterdir() for p in d.iterdir()
             if p.name.startswith(".")]
    assert not temps, temps
    linked = set()
    for v in store.versions("demo"):
        root = store.layout.version_dir("demo", v)
        m = validate_build(root)
        for a in m.artefacts:
            obj = store.pool.path(a.sha256, Meta.of_file(root / a.path))
            assert os.lstat(obj).st_ino == os.lstat(root / a.path).st_ino, a.path
            linked.add(obj)
    assert set(objects) == linked, "an object no version links"


@pytest.mark.parametrize("fmt", ["dir", "tar.zst"])
def test_next_version_shares_equal_files_and_writes_only_the_changed(store, tmp_path,
                                                                       fmt) -> None:
    r1 = store.ingest_entry(drop(store, tmp_path, "1", fmt,
                                 changed={"rootfs/etc/version": b"1\n"}))
    assert r1 is not None and r1.accepted, r1
    assert r1.shared_files == 0
    big = os.urandom(300_000)
    r2 = store.ingest_entry(drop(store, tmp_path, "2", fmt,
                                 changed={"rootfs/etc/version": b"2\n",
                                          "rootfs/usr/lib/new.so": big}))
    assert r2 is not None and r2.accepted, r2
    assert r2.shared_files == 40, "every unchanged package file linked, not written"
    manifest = (store.layout.version_dir("demo", "2") / "manifest.json").stat().st_size
    assert r2.written_bytes == len(big) + 2 + manifest, "the new files and the manifest"
    for i in (0, 17, 39):
        rel = f"rootfs/usr/share/pkg{i % 4}/file{i}"
        assert ino(store, "1", rel) == ino(store, "2", rel)
    assert ino(store, "1", "rootfs/etc/version") != ino(store, "2", "rootfs/etc/version")
    assert (store.layout.version_dir("demo", "1") / "rootfs/etc/version").read_bytes() == b"1\n"
    assert_pool_clean(store)
    # each version is still a full tree of ordinary files
    assert sorted(p.relative_to(store.layout.version_dir("demo", "1")).as_posix()
                  for p in store.layout.version_dir("demo", "1").rglob("file*")) == \
        sorted(p.relative_to(store.layout.version_dir("demo", "2")).as_posix()
               for p in store.layout.version_dir("demo", "2").rglob("file*"))


def test_metadata_differing_twins_are_not_shared(store, tmp_path) -> None:
    """Same bytes, another mode / mtime / owner / xattr: each its own inode, within a
    build and across builds."""
    same = b"identical content\n" * 100
    twins = {f"rootfs/twin/{k}": same for k in ("a", "mode", "mtime", "owner", "xattr", "b",
                                                 ".share-b")}
    src = tmp_path / "ci" / "demo-1"
    rootfs(src, "1", changed=twins, files=4)
    t = src / "rootfs/twin"
    for name in twins:
        os.utime(src / name, (T0, T0))
    os.chmod(t / "mode", 0o600)
    os.utime(t / "mtime", (T0 + 1, T0 + 1))
    os.chown(t / "owner", 4321, 4321)
    os.setxattr(t / "xattr", "user.netbootd.test", b"1")
    os.rename(src, store.layout.incoming / "demo-1")
    r = store.ingest_entry("demo-1")
    assert r is not None and r.accepted, r
    v1 = store.layout.version_dir("demo", "1") / "rootfs/twin"
    inodes = {n: os.lstat(v1 / n).st_ino for n in ("a", "mode", "mtime", "owner", "xattr")}
    assert len(set(inodes.values())) == 5, inodes
    assert os.lstat(v1 / "b").st_ino == inodes["a"], "the true twin is shared"
    assert os.lstat(v1 / "mode").st_mode & 0o777 == 0o600
    assert os.lstat(v1 / "owner").st_uid == 4321
    assert os.getxattr(v1 / "xattr", "user.netbootd.test") == b"1"
    # the next version: the same file with a new mode is a new inode; the rest shared
    src2 = tmp_path / "ci" / "demo-2"
    rootfs(src2, "2", changed=twins, files=4)
    for name in twins:
        os.utime(src2 / name, (T0, T0))
    os.chmod(src2 / "rootfs/twin/a", 0o755)
    write_manifest(src2, "demo", "2", "rootfs", boot={"rootfs": "rootfs"})
    os.rename(src2, store.layout.incoming / "demo-2")
    r2 = store.ingest_entry("demo-2")
    assert r2 is not None and r2.accepted, r2
    v2 = store.layout.version_dir("demo", "2") / "rootfs/twin"
    assert os.lstat(v2 / "a").st_ino != inodes["a"]
    assert os.lstat(v2 / "a").st_mode & 0o777 == 0o755
    assert os.lstat(v1 / "a").st_mode & 0o777 == 0o644, "version 1 unchanged"
    assert os.lstat(v2 / "b").st_ino == inodes["a"]
    assert_pool_clean(store)


def test_archive_with_wrong_bytes_for_a_pooled_file_is_rejected(store, tmp_path) -> None:
    """A member whose manifest digest the pool holds is still hashed: wrong bytes under a
    right manifest are a corrupt build, not a free pass to the pool's copy."""
    r = store.ingest_entry(drop(store, tmp_path, "1", "tar.zst"))
    assert r is not None and r.accepted
    src = tmp_path / "ci" / "demo-2"
    rootfs(src, "2")
    rel = "rootfs/usr/share/pkg1/file5"
    good = (src / rel).read_bytes()
    (src / rel).write_bytes(good.replace(b"package", b"pockage"))  # same size
    os.utime(src / rel, (T0, T0))
    m = json.loads((src / "manifest.json").read_text())
    for a in m["artefacts"]:
        if a["path"] == rel:
            import hashlib
            a["sha256"] = hashlib.sha256(good).hexdigest()
    (src / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "demo-2.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src / "manifest.json", arcname="manifest.json")
        tf.add(src / "rootfs", arcname="rootfs")
    os.rename(out, store.layout.incoming / "demo-2.tar")
    r2 = store.ingest_entry("demo-2.tar")
    assert r2 is not None and not r2.accepted
    assert "checksum mismatch" in r2.reason and "file5" in r2.reason
    assert store.versions("demo") == ["1"]
    assert_pool_clean(store)


def test_gc_frees_only_content_no_version_links(store, tmp_path) -> None:
    only1 = os.urandom(100_000)
    store.ingest_entry(drop(store, tmp_path, "1", "dir", changed={"rootfs/only1": only1}))
    store.ingest_entry(drop(store, tmp_path, "2", "tar.zst",
                            changed={"rootfs/only2": os.urandom(50_000)}))
    before = store.bytes_used()
    assert before["logical_bytes"] > before["physical_bytes"]
    shared = ino(store, "1", "rootfs/usr/share/pkg0/file0")
    assert store.gc(in_use=set()) == [("demo", "1")]
    assert ino(store, "2", "rootfs/usr/share/pkg0/file0") == shared
    assert os.lstat(store.layout.version_dir("demo", "2") / "rootfs/usr/share/pkg0/file0"
                    ).st_nlink == 2, "the version and its object"
    assert_pool_clean(store)
    after = store.bytes_used()
    assert before["physical_bytes"] - after["physical_bytes"] >= len(only1)
    assert after["logical_bytes"] == after["physical_bytes"], "one version: nothing shared"


def test_bytes_per_image_and_store(store, tmp_path) -> None:
    store.ingest_entry(drop(store, tmp_path, "1", "dir"))
    store.ingest_entry(drop(store, tmp_path, "2", "dir", changed={"rootfs/x": b"x" * 1000}))
    [img] = store.list_images()
    one = sum(a.size for a in store.manifest("demo", "1").artefacts)
    m1 = (store.layout.version_dir("demo", "1") / "manifest.json").stat().st_size
    m2 = (store.layout.version_dir("demo", "2") / "manifest.json").stat().st_size
    assert img["logical_bytes"] == 2 * one + 1000 + m1 + m2
    assert img["physical_bytes"] == one + 1000 + m1 + m2
    assert store.bytes_used() == {"logical_bytes": img["logical_bytes"],
                                  "physical_bytes": img["physical_bytes"]}


def test_versions_from_before_the_pool_are_enrolled_without_touching_their_files(
        store, tmp_path) -> None:
    """A version promoted by a store without the pool (one link per file): recovery makes
    its files objects by adding links, never by replacing a file a client may hold, and
    the next build shares with it."""
    src = tmp_path / "ci" / "old"
    rootfs(src, "1")
    old = store.layout.version_dir("demo", "1")
    old.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, old)  # what promotion did before the pool
    before = {p: p.lstat().st_ino for p in old.rglob("*") if p.is_file()}
    done = store.recover()
    assert any("enrolled in the content pool" in line for line in done), done
    assert {p: p.lstat().st_ino for p in before} == before, "files untouched"
    assert_pool_clean(store)
    assert store.recover() == [], "enrolled once"
    r = store.ingest_entry(drop(store, tmp_path, "2", "tar.zst"))
    assert r is not None and r.accepted and r.shared_files == 40, r
    assert ino(store, "2", "rootfs/usr/share/pkg3/file7") == \
        before[old / "rootfs/usr/share/pkg3/file7"]
