"""Hostile and careless builds against the real store and its real incoming/ watcher:
zip bombs, a full disk (a reserve set just below the free space), builds written in
place with pauses, and a dropper that rewrites its files after the drop.

Nothing here fills a disk: the limits come from the settings (``max_unpacked_bytes``,
``min_free_bytes``, ``keep_rejected_max_bytes``), and a bomb is refused at its first
header, before it writes its payload.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from netbootd.errors import TooLarge
from netbootd.settings import StoreSettings
from netbootd.store.build import pack, sample_build
from netbootd.store.store import ImageStore
from netbootd.store.watcher import IncomingWatcher
from tests.storekit import until

GiB = 1 << 30


def write_bomb(out: Path, work: Path, *, unpacked: int, manifest_first: bool = True,
               version: str = "1") -> Path:
    """A tar.zst of a small but complete build whose initrd is ``unpacked`` bytes of
    zeros: the manifest declares the small initrd, the archive carries the big one.
    ~100 KB on disk for 1 GiB (zstd on zeros); the zeros are streamed, never held."""
    src = work / f"bomb-src-{version}"
    sample_build(src, "demo", version)
    small = [(p.relative_to(src).as_posix(), p.read_bytes())
             for p in sorted(src.rglob("*")) if p.is_file() and p.name != "initrd.img"]
    small.sort(key=lambda kv: kv[0] != "manifest.json" if manifest_first
               else kv[0] == "manifest.json")

    def put(zw, name: str, size: int, chunks) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        zw.write(info.tobuf(format=tarfile.PAX_FORMAT))
        for c in chunks:
            zw.write(c)
        if size % 512:
            zw.write(bytes(512 - size % 512))

    zero = bytes(8 << 20)
    with open(out, "wb") as raw, \
            zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw:
        head = small if manifest_first else []
        tail = [] if manifest_first else small
        for name, data in head:
            put(zw, name, len(data), [data])
        put(zw, "boot/initrd.img", unpacked,
            (zero[: min(len(zero), unpacked - i)] for i in range(0, unpacked, len(zero))))
        for name, data in tail:
            put(zw, name, len(data), [data])
        zw.write(bytes(1024))
    return out


def fs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def rejection_done(store: ImageStore) -> bool:
    """The whole refusal happened: its reason is written *and* the drop has left
    incoming/ (the reason comes first, by design: a crash between the two re-rejects the
    build rather than losing the reason)."""
    return bool(store.rejected()) and not list(store.layout.incoming.iterdir())


class Watched:
    """A real ImageStore with its real IncomingWatcher running on this loop."""

    def __init__(self, tmp_path: Path, **settings: object) -> None:
        self.store = ImageStore(tmp_path / "images", tmp_path / "state",
                                StoreSettings(**{"settle_seconds": 0.3, **settings}))
        self.watcher = IncomingWatcher(self.store, settle=self.store.settings.settle_seconds,
                                       rescan=0.2)
        self.results: list = []
        self.watcher.on_result = self.results.append
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.watcher.run(self.stop))
        await asyncio.wait_for(self.watcher.ready.wait(), 30)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    async def rescans(self, n: int) -> None:
        """Wait until the watcher has rescanned incoming/ ``n`` more times."""
        target = self.watcher.scans + n
        await until(lambda: self.watcher.scans >= target, timeout=60)


@pytest.fixture
async def watched(tmp_path: Path, request):
    w = Watched(tmp_path, **getattr(request, "param", {}))
    await w.start()
    try:
        yield w
    finally:
        await w.close()


# -- 1. zip bombs and a full disk ------------------------------------------------------------

@pytest.mark.parametrize("watched", [{"max_unpacked_bytes": 64 << 20}], indirect=True)
async def test_bomb_declared_small_is_rejected_before_it_writes(watched, tmp_path) -> None:
    """98 KB that unpacks to 3 GiB (the attack's bomb, 1 GiB here): the manifest comes
    first and declares a few KB, so the bomb stops at the header of its big member."""
    L = watched.store.layout
    bomb = write_bomb(tmp_path / "bomb.tar.zst", tmp_path, unpacked=GiB)
    assert bomb.stat().st_size < 1 << 20
    os.rename(bomb, L.incoming_entry("demo-1.tar.zst"))
    await until(lambda: rejection_done(watched.store), timeout=60)
    [rej] = watched.store.rejected()
    assert "more than its manifest declares" in rej["reason"], rej
    assert (rej.get("image"), rej.get("version")) == ("demo", "1")
    assert L.rejected_entry(rej["name"]).is_file(), "a small archive is kept as it came"
    # the reason is written first, then the build leaves incoming/ (kill -9 order)
    await until(lambda: not list(L.staging.iterdir()) and not list(L.incoming.iterdir()),
                timeout=60)
    await watched.rescans(3)
    assert len(watched.store.rejected()) == 1 and len(watched.results) == 1, "not retried"
    assert watched.store.versions("demo") == []


@pytest.mark.parametrize("watched", [{"max_unpacked_bytes": 16 << 20}], indirect=True)
async def test_bomb_without_manifest_first_stops_at_max_unpacked(watched, tmp_path) -> None:
    """Manifest last: only ``store.max_unpacked_bytes`` bounds the unpacking, still
    before the payload is written."""
    L = watched.store.layout
    bomb = write_bomb(tmp_path / "bomb.tar.zst", tmp_path, unpacked=GiB, manifest_first=False)
    os.rename(bomb, L.incoming_entry("demo-2.tar.zst"))
    await until(lambda: rejection_done(watched.store), timeout=60)
    [rej] = watched.store.rejected()
    assert "store.max_unpacked_bytes" in rej["reason"], rej
    # the reason is written first, then the build leaves incoming/ (kill -9 order)
    await until(lambda: not list(L.staging.iterdir()) and not list(L.incoming.iterdir()),
                timeout=60)
    await watched.rescans(3)
    assert len(watched.results) == 1, "not retried"


async def test_disk_full_fails_the_build_once_with_a_reason(tmp_path) -> None:
    """An honest build that does not fit (its manifest declares 256 MiB; the reserve is
    the file system's whole size, so no other process freeing space on a shared machine
    can make it fit): rejected as "disk full" with nothing written, not retried by every
    rescan as before (an OSError kept it in incoming/)."""
    work = tmp_path / "ci"
    src = work / "big"
    sample_build(src, "demo", "3")
    os.truncate(src / "boot" / "initrd.img", 256 << 20)  # sparse: nothing on disk
    from netbootd.store.build import write_manifest
    write_manifest(src, "demo", "3", "kernel+initrd", boards=["x86_64"],
                   boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img"})
    os.rename(pack(src, work / "demo-3.tar.zst", compression="zst"),
              work / "demo-3.tar.zst.x")
    shutil.rmtree(src)
    w = Watched(tmp_path, min_free_bytes=fs_size(tmp_path), keep_rejected_max_bytes=1 << 20)
    await w.start()
    try:
        os.rename(work / "demo-3.tar.zst.x", w.store.layout.incoming_entry("demo-3.tar.zst"))
        await until(lambda: rejection_done(w.store), timeout=60)
        [rej] = w.store.rejected()
        assert rej["reason"].startswith("disk full"), rej
        assert "store.min_free_bytes" in rej["reason"]
        L = w.store.layout
        # the reason is written first, then the build leaves incoming/ (kill -9 order)
        await until(lambda: not list(L.staging.iterdir()) and not list(L.incoming.iterdir()),
                    timeout=60)
        await w.rescans(3)
        assert len(w.results) == 1 and len(w.store.rejected()) == 1, "not retried"
    finally:
        await w.close()


async def test_a_large_rejected_build_keeps_its_reason_and_manifest_only(tmp_path) -> None:
    """Past ``keep_rejected_max_bytes`` rejected/ keeps the reason and the manifest, not
    the payload (a CI pushing a broken multi-GB build must not fill rejected/)."""
    st = ImageStore(tmp_path / "images", tmp_path / "state",
                    StoreSettings(keep_rejected_max_bytes=1 << 20))
    src = tmp_path / "ci" / "demo-4"
    sample_build(src, "demo", "4", payload=2 << 20)
    kernel = src / "boot" / "vmlinuz"
    kernel.write_bytes(kernel.read_bytes()[::-1])  # same size, other bytes
    os.rename(src, st.layout.incoming_entry("demo-4"))
    r = st.ingest_entry("demo-4")
    assert r is not None and not r.accepted and "checksum mismatch" in r.reason
    [rej] = st.rejected()
    assert rej["payload"].startswith("deleted: "), rej
    assert not os.path.lexists(st.layout.rejected_entry(rej["name"]))
    kept = json.loads(st.layout.rejected_manifest(rej["name"]).read_bytes())
    assert (kept["image"], kept["version"]) == ("demo", "4")
    assert not list(st.layout.incoming.iterdir()) and not list(st.layout.staging.iterdir())
    assert st.prune_rejected(0) == [rej["name"]]
    assert not list(st.layout.rejected.iterdir())


# -- 4. uploads stop at the free-space reserve -----------------------------------------------

async def test_upload_stops_before_the_reserve_and_leaves_nothing(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    # The reserve is the whole file system: whatever other processes write or free on a
    # shared machine meanwhile, the first chunk already crosses it.
    st = ImageStore(images, tmp_path / "state", StoreSettings(min_free_bytes=fs_size(images)))
    sent = [0]

    def body():
        chunk = bytes(1 << 20)
        for _ in range(1024):  # 1 GiB if nothing stopped it
            sent[0] += len(chunk)
            yield chunk

    with pytest.raises(TooLarge) as exc:
        await st.ingest_upload("demo", "5", body())
    assert "store.min_free_bytes" in str(exc.value)
    assert sent[0] < 64 << 20, "stopped during the stream, not after it"
    assert not list(st.layout.incoming.iterdir()) and not list(st.layout.staging.iterdir())
    assert st.rejected() == []


# -- 2. drops written in place are never taken mid-write ---------------------------------------

def slow_copy(src: Path, dest: Path, pause: threading.Event | None = None,
              gap: float = 0.05) -> None:
    """Write ``src`` (file or tree) to ``dest`` in place, 64 KiB at a time, waiting
    ``gap`` between writes (a CI writer on a slow link)."""
    ev = pause or threading.Event()
    if src.is_file():
        data = src.read_bytes()
        with open(dest, "wb") as fh:
            for i in range(0, len(data), 64 << 10):
                fh.write(data[i:i + (64 << 10)])
                fh.flush()
                ev.wait(gap)
        return
    dest.mkdir()
    first = [src / "manifest.json"]  # the manifest first: the dangerous order
    rest = [p for p in sorted(src.rglob("*")) if p not in first]
    for p in first + rest:
        out = dest / p.relative_to(src)
        if p.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            slow_copy(p, out, ev, gap)
        ev.wait(gap)


async def write_then_mark(src: Path, dest: Path, marker: Path) -> None:
    await asyncio.to_thread(slow_copy, src, dest)
    marker.write_bytes(b"")


@pytest.mark.parametrize("kind", ["archive", "directory"])
async def test_a_drop_being_written_when_the_watch_starts_waits(tmp_path, kind) -> None:
    """The start-up scan (and every rescan) has no event history: an entry someone is
    still writing was taken as complete (a truncated archive / a directory with only its
    manifest, rejected). Now it must stay unchanged for a settle window first; the
    writer's next writes make it an in-place drop that waits for its marker."""
    work = tmp_path / "ci"
    src = work / "demo-6"
    sample_build(src, "demo", "6", payload=1 << 20)
    if kind == "archive":  # uncompressed: 1 MiB takes 16 writes, 0.8 s
        src = pack(src, work / "demo-6.tar", compression="none")
    w = Watched(tmp_path)
    L = w.store.layout
    name = src.name
    dest, marker = L.incoming_entry(name), L.ready_marker(name)
    started = threading.Event()

    def writer() -> None:
        if src.is_file():
            with open(dest, "wb") as fh:  # the first 64 KiB, then a pause
                data = src.read_bytes()
                fh.write(data[: 64 << 10])
                fh.flush()
                started.set()
                for i in range(64 << 10, len(data), 64 << 10):
                    threading.Event().wait(0.05)
                    fh.write(data[i:i + (64 << 10)])
                    fh.flush()
        else:
            dest.mkdir()
            shutil.copy2(src / "manifest.json", dest / "manifest.json")
            started.set()
            threading.Event().wait(0.05)
            shutil.rmtree(dest)  # re-written from scratch, slowly, manifest first
            slow_copy(src, dest)
        marker.write_bytes(b"")

    t = threading.Thread(target=writer)
    t.start()
    try:
        await asyncio.to_thread(started.wait, 30)
        await w.start()  # the start-up scan sees the half-written entry
        await until(lambda: w.results, timeout=60)
    finally:
        await asyncio.to_thread(t.join)
        await w.close()
    assert [r.accepted for r in w.results] == [True], [r.reason for r in w.results]
    assert w.store.rejected() == []
    assert w.store.versions("demo") == ["6"]


@pytest.mark.parametrize("kind", ["archive", "directory"])
async def test_a_slow_writer_in_place_is_never_taken_mid_write(watched, tmp_path, kind) -> None:
    """Written in place in 64 KiB steps 50 ms apart (a directory: manifest first), then
    the marker: ingested once, complete, never rejected half-written."""
    work = tmp_path / "ci"
    src = work / "demo-7"
    sample_build(src, "demo", "7", payload=512 << 10)
    if kind == "archive":
        src = pack(src, work / "demo-7.tar", compression="none")
    L = watched.store.layout
    await write_then_mark(src, L.incoming_entry(src.name), L.ready_marker(src.name))
    await until(lambda: watched.results, timeout=60)
    await watched.rescans(2)
    assert [r.accepted for r in watched.results] == [True], \
        [r.reason for r in watched.results]
    assert watched.store.rejected() == []


# -- 3. a stored version never changes ---------------------------------------------------------

def stored_matches_manifest(st: ImageStore, image: str, version: str) -> None:
    root = st.layout.version_dir(image, version)
    m = json.loads((root / "manifest.json").read_bytes())
    for a in m["artefacts"]:
        data = (root / a["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a["sha256"], a["path"]
        assert len(data) == a["size"]


def rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as fh:  # what CI did: same inode, new bytes
        fh.write(data)


async def test_rewriting_the_source_after_a_directory_drop_changes_nothing(watched,
                                                                          tmp_path) -> None:
    """CI builds in out/, drops a hard-linked copy (``cp -al out incoming/.x.tmp && mv``)
    and keeps a file open, then reuses out/ for the next build, rewriting in place: the
    stored version stays byte-identical to its manifest."""
    out = tmp_path / "ci" / "out"
    sample_build(out, "demo", "8", payload=256 << 10)
    L = watched.store.layout
    tmp = L.incoming_entry(".demo-8.tmp")
    shutil.copytree(out, tmp, copy_function=os.link)
    held = os.open(tmp / "boot" / "vmlinuz", os.O_RDWR)  # CI keeps a file open
    try:
        os.rename(tmp, L.incoming_entry("demo-8"))
        await until(lambda: watched.results, timeout=60)
        assert watched.results[0].accepted, watched.results[0].reason
        await asyncio.to_thread(rewrite_in_place, out / "boot" / "initrd.img", b"REWRITTEN")
        os.pwrite(held, b"X" * 4096, 0)
        os.fsync(held)
    finally:
        os.close(held)
    stored_matches_manifest(watched.store, "demo", "8")
    for p in ("boot/initrd.img", "boot/vmlinuz"):
        stored = os.stat(L.version_dir("demo", "8") / p)
        assert stored.st_ino != os.stat(out / p).st_ino, "a copy, not the CI source's inode"
        # its links: the version's path and its object in the content pool, nothing else
        assert stored.st_nlink == 2
        assert [o for o, ost in watched.store.pool.objects() if ost.st_ino == stored.st_ino]


def test_bomb_in_memory_stream_is_capped(tmp_path) -> None:
    """A gzip tar whose headers alone are huge (no big member): the decompressed stream
    is capped at what the build may write, plus a small overhead."""
    from netbootd.store.ingest import Budget, Rejected, unpack_archive

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("x")
        info.pax_headers = {"comment": "y" * (8 << 20)}
        tf.addfile(info, io.BytesIO(b""))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(Rejected, match="zip bomb"):
        unpack_archive(tmp_path / "a.tar.gz", tmp_path / "out", budget=Budget(1 << 20))
