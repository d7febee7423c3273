"""The store service on a temp dir with a real watchfiles watch: the three drop protocols,
the start-up scan, and hot-swap under readers (a boot on N finishes on N)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from netbootd.model import ClientFacts, ClientKind
from netbootd.store.build import pack, sample_build
from netbootd.store.service import StoreService
from tests.storekit import store_app, until

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"


def make_app(tmp_path: Path, **store: object):
    return store_app(tmp_path,
                     "nodes:\n"
                     f"  {MAC_A}: {{hostname: a, image: demo, channel: dev}}\n"
                     f"  {MAC_B}: {{hostname: b, image: demo, channel: dev}}\n",
                     {"paths": {"templates": str(tmp_path / "templates")},
                      "store": {"settle_seconds": 0.3, **store}})


@pytest.fixture
async def running(tmp_path: Path):
    app = make_app(tmp_path)
    svc = StoreService(app)
    # dropped while the daemon was down: the start-up scan must pick it up
    pre = tmp_path / "ci" / "demo-1"
    sample_build(pre, "demo", "1", payload=64 * 1024)
    incoming = tmp_path / "images" / "incoming"
    incoming.mkdir(parents=True)
    os.rename(pre, incoming / "demo-1")
    await svc.start()
    try:
        await asyncio.wait_for(svc.watcher.ready.wait(), 10)
        yield app, svc
    finally:
        t0 = time.monotonic()
        await svc.stop()
        assert time.monotonic() - t0 < 2.0
        app.events.close()


async def test_startup_scan_rename_and_marker_drops(running, tmp_path) -> None:
    app, svc = running
    store = app.store
    assert app.planner.images is store
    await until(lambda: store.active("demo", "dev") == "1")
    assert svc.health()["ok"]

    # (1) rename of a tarball
    src = tmp_path / "ci" / "v2"
    sample_build(src, "demo", "2")
    pack(src, tmp_path / "ci" / "demo-2.tar.gz")
    os.rename(tmp_path / "ci" / "demo-2.tar.gz", store.layout.incoming / "demo-2.tar.gz")
    await until(lambda: store.active("demo", "dev") == "2")

    # (2) written in place + marker: never ingested before the marker, however quiet
    target = store.layout.incoming / "demo-3"
    sample_build(tmp_path / "ci" / "v3", "demo", "3")
    target.mkdir()
    for p in sorted((tmp_path / "ci" / "v3").rglob("*")):
        rel = p.relative_to(tmp_path / "ci" / "v3")
        if p.is_dir():
            (target / rel).mkdir(parents=True, exist_ok=True)
        else:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(p.read_bytes())
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # > settle: quiet, but it was written in place
    assert store.active("demo", "dev") == "2"
    assert "demo-3" in svc.health()["waiting_for_marker"]
    (store.layout.incoming / "demo-3.ready").touch()
    await until(lambda: store.active("demo", "dev") == "3")
    # the incoming copy and its marker go only after activation (ingest_entry's order)
    await until(lambda: not (store.layout.incoming / "demo-3.ready").exists())

    # CI temp names are ignored until renamed
    (store.layout.incoming / ".demo-4.tmp").write_bytes(b"partial")
    await asyncio.sleep(0.6)
    assert (store.layout.incoming / ".demo-4.tmp").exists()

    # a corrupt drop is rejected and recorded
    bad = tmp_path / "ci" / "bad"
    sample_build(bad, "demo", "5")
    (bad / "boot/vmlinuz").write_bytes(b"tampered")
    os.rename(bad, store.layout.incoming / "bad")
    await until(lambda: any(r["name"] == "bad" for r in store.rejected()))

    def kinds() -> list:
        return [e.fields.get("outcome") for e in app.events.recent() if e.kind == "image"]

    # the reason file is written first, the event right after it (on the ingest thread)
    await until(lambda: "rejected" in kinds())
    assert store.active("demo", "dev") == "3"
    assert "ingested" in kinds() and "activated" in kinds()
    assert app.metrics.ingest_failures._value.get() == 1


async def test_out_of_process_activation_fires_on_change(running, tmp_path) -> None:
    app, _svc = running
    store = app.store
    await until(lambda: store.active("demo", "dev") == "1")
    changes: list[int] = []
    store.on_change.append(lambda: changes.append(1))
    from netbootd.settings import StoreSettings
    from netbootd.store.store import ImageStore

    cli = ImageStore(store.layout.images, store.layout.state, StoreSettings())
    cli.activate("demo", "1", "prod")
    await until(lambda: bool(changes))
    assert store.resolve("demo", "prod", None).version == "1"


async def test_hot_swap_readers_and_sessions(running, tmp_path) -> None:
    """20 concurrent readers of N's files while N+1 is activated all get N's bytes;
    the boot session planned before the swap keeps N; the next boot gets N+1."""
    app, svc = running
    store = app.store
    await until(lambda: store.active("demo", "dev") == "1")
    facts_a = ClientFacts(mac=MAC_A, kind=ClientKind.IPXE)
    plan_a = app.planner.plan(facts_a)
    assert plan_a.image.version == "1"
    ref = plan_a.image
    kernel = ref.path(ref.boot["kernel"])
    want = hashlib.sha256(kernel.read_bytes()).hexdigest()

    results: list[str] = []
    started = threading.Barrier(21)

    def reader() -> None:
        h = hashlib.sha256()
        with open(plan_a.image.path(plan_a.image.boot["kernel"]), "rb") as fh:
            started.wait()
            while chunk := fh.read(1024):
                h.update(chunk)
                time.sleep(0.001)  # a slow TFTP client: the swap lands mid-transfer
        results.append(h.hexdigest())

    threads = [threading.Thread(target=reader) for _ in range(20)]
    for t in threads:
        t.start()
    await asyncio.to_thread(started.wait)
    src = tmp_path / "ci" / "demo-2"
    sample_build(src, "demo", "2", payload=64 * 1024)
    os.rename(src, store.layout.incoming / "demo-2")
    await until(lambda: store.active("demo", "dev") == "2")
    for t in threads:
        await asyncio.to_thread(t.join)
    assert results == [want] * 20

    assert app.planner.plan(facts_a).image.version == "1", "a boot in flight stays on N"
    assert app.planner.plan(ClientFacts(mac=MAC_B, kind=ClientKind.IPXE)).image.version == "2"
    # GC keeps N while the session is open, and deletes nothing active
    assert ("demo", "1") in svc.in_use()
    app.planner.end_session(MAC_A)
    assert app.planner.plan(facts_a).image.version == "2", "the next boot gets N+1"


async def test_incoming_removed_under_the_daemon_is_recreated(running, tmp_path) -> None:
    import shutil

    app, svc = running
    store = app.store
    await until(lambda: store.active("demo", "dev") == "1")
    # the drop is consumed first (removing incoming/ under a running intake is another test)
    await until(lambda: not any(store.layout.incoming.iterdir()), timeout=120)
    shutil.rmtree(store.layout.incoming)
    await until(lambda: store.layout.incoming.is_dir() and svc.watcher.ready.is_set())
    src = tmp_path / "ci" / "again"
    sample_build(src, "demo", "2")
    os.rename(src, store.layout.incoming / "demo-2")
    await until(lambda: store.active("demo", "dev") == "2")


async def test_a_second_daemon_on_the_same_store_is_refused(running, tmp_path) -> None:
    """Two store services on one images directory: the second fails to start, naming the
    first's pid; the first keeps its store; after it stops, a new one starts."""
    from netbootd.store.errors import StoreLocked

    app, svc = running
    other = StoreService(make_app(tmp_path))
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()} \\(daemon\\)") as err:
        await other.start()
    other.app.events.close()
    assert err.value.pid == os.getpid()
    assert other.store is None and app.store is svc.store and svc.health()["ok"]
    await svc.stop()
    again = StoreService(make_app(tmp_path))
    await again.start()
    await again.stop()
    again.app.events.close()
