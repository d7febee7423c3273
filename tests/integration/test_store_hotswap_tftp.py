"""Hot swap under real TFTP downloads: 20 concurrent Pi-style transfers of version N's
kernel are under way when N+1 is dropped and auto-activated; every one completes with N's
bytes, the Pi's boot session stays on N, and only the next boot gets N+1."""

from __future__ import annotations

import asyncio
import socket

from netbootd.model import ClientFacts, ClientKind
from netbootd.store.service import StoreService
from netbootd.tftp.piclient import fetch
from netbootd.tftp.server import create as create_tftp
from tests.conftest import free_port
from tests.storekit import ONE_VERSION, drop_build, store_app, until

PI_MAC, SERIAL = "d8:3a:dd:00:00:01", "00c0ffee"
KERNEL = 16 << 20  # big enough that the swap lands mid-transfer with a wide margin


async def test_twenty_tftp_downloads_of_n_survive_activation_of_n_plus_1(tmp_path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    app = store_app(
        tmp_path,
        f"nodes:\n  {PI_MAC}: {{hostname: pi, serial: {SERIAL}, image: pi, channel: dev}}\n",
        {"store": ONE_VERSION, "tftp": {"port": port, "bind": "127.0.0.1"}})
    store_svc, tftp = StoreService(app), create_tftp(app)
    await store_svc.start()
    await tftp.start()
    try:
        store = app.store
        drop_build(app, tmp_path, "pi", "1", kind="pi-boot+rootfs", payload=KERNEL)
        await until(lambda: store.active("pi", "dev") == "1", timeout=120)
        want = (store.layout.store / "pi" / "1" / "boot" / "kernel_2712.img").read_bytes()

        # blksize 512: ~16k round trips per transfer, so the swap lands mid-transfer
        downloads = [asyncio.create_task(fetch(("127.0.0.1", port),
                                               f"{SERIAL}/kernel_2712.img", blksize=512))
                     for _ in range(20)]
        # every transfer is under way (admitted by the server) before N+1 is dropped
        await until(lambda: tftp.active >= len(downloads) or any(d.done() for d in downloads),
                    timeout=120)
        assert not any(d.done() for d in downloads), [d for d in downloads if d.done()]
        drop_build(app, tmp_path, "pi", "2", kind="pi-boot+rootfs", payload=KERNEL)
        await until(lambda: store.active("pi", "dev") == "2", timeout=120)
        assert not all(d.done() for d in downloads), "the swap must land mid-transfer"
        results = await asyncio.gather(*downloads)
        assert all(r.data == want for r in results), "every transfer must get N's bytes"
        # the Pi's boot session keeps N; the next boot (session ended) gets N+1
        facts = ClientFacts(mac=PI_MAC, kind=ClientKind.RPI, serial=SERIAL)
        assert app.planner.plan(facts).image.version == "1"
        app.planner.end_session(PI_MAC)
        again = await fetch(("127.0.0.1", port), f"{SERIAL}/kernel_2712.img")
        assert again.data == (store.layout.store / "pi" / "2" / "boot" /
                              "kernel_2712.img").read_bytes()
    finally:
        await tftp.stop()
        await store_svc.stop()
        app.events.close()
