"""Hot swap under real HTTP downloads: 20 slow HTTP clients fetch version N's kernel (the
URL a booting node gets from its plan) while N+1 is dropped, auto-activated and GC runs;
every download completes with N's bytes, and only the next boot gets N+1."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp

from netbootd.http.app import create as create_http
from netbootd.model import ClientFacts, ClientKind
from netbootd.store.service import StoreService
from tests.conftest import free_port
from tests.storekit import ONE_VERSION, drop_build, store_app, until

MAC_A, MAC_B = "52:54:00:00:01:0a", "52:54:00:00:01:0b"
KERNEL = 8 << 20


async def test_twenty_http_downloads_of_n_survive_activation_of_n_plus_1(tmp_path) -> None:
    port = free_port()
    app = store_app(tmp_path,
                    "nodes:\n"
                    f"  {MAC_A}: {{hostname: a, image: demo, channel: dev}}\n"
                    f"  {MAC_B}: {{hostname: b, image: demo, channel: dev}}\n",
                    {"store": ONE_VERSION, "http": {"port": port, "bind": "127.0.0.1"}})
    store_svc, http = StoreService(app), create_http(app)
    await store_svc.start()
    await http.start()
    try:
        store = app.store
        drop_build(app, tmp_path, "demo", "1", payload=KERNEL)
        await until(lambda: store.active("demo", "dev") == "1")
        plan = app.planner.plan(ClientFacts(mac=MAC_A, kind=ClientKind.IPXE))
        ref = plan.image
        want = hashlib.sha256(ref.path(ref.boot["kernel"]).read_bytes()).hexdigest()
        url = f"http://127.0.0.1:{port}/files/{ref.name}/{ref.version}/{ref.boot['kernel']}"

        async def slow_download(session: aiohttp.ClientSession) -> str:
            """A slow client (a Pi on a busy link): reads 64 KiB, pauses, reads on."""
            h = hashlib.sha256()
            async with session.get(url) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    h.update(chunk)
                    await asyncio.sleep(0.02)
            return h.hexdigest()

        async with aiohttp.ClientSession() as session:
            downloads = [asyncio.create_task(slow_download(session)) for _ in range(20)]
            gauge = {"service": "http"}
            await until(lambda: (app.metrics.registry.get_sample_value(
                "netbootd_active_transfers", gauge) or 0) >= len(downloads), timeout=120)
            drop_build(app, tmp_path, "demo", "2", payload=KERNEL)
            await until(lambda: store.active("demo", "dev") == "2")
            assert not any(d.done() for d in downloads), "the swap must land mid-transfer"
            assert await store_svc.run_gc() == [], "version 1 is in a boot session: kept"
            got = await asyncio.gather(*downloads)
        assert got == [want] * 20
        assert app.planner.plan(ClientFacts(mac=MAC_A, kind=ClientKind.IPXE)).image.version \
            == "1", "the boot in flight stays on N"
        assert app.planner.plan(ClientFacts(mac=MAC_B, kind=ClientKind.IPXE)).image.version \
            == "2", "a new boot gets N+1"
        app.planner.end(MAC_A)  # booted: the OS now runs version 1 (e.g. its NFS root)
        assert await store_svc.run_gc() == [], "a running OS's version is kept"
        reboot = app.planner.plan(ClientFacts(mac=MAC_A, kind=ClientKind.IPXE))
        assert reboot.image.version == "2", "the next boot gets N+1"
        app.planner.handed_over(MAC_A)
        assert await store_svc.run_gc() == [("demo", "1")]
    finally:
        await http.stop()
        await store_svc.stop()
        app.events.close()
