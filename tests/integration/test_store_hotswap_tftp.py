"""Hot swap under real TFTP downloads: 20 concurrent Pi-style transfers of version N's
kernel are under way when N+1 is dropped and auto-activated; every one completes with N's
bytes, the Pi's boot session stays on N, and only the next boot gets N+1."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from netbootd.daemon import build_app
from netbootd.inventory import load_inventory
from netbootd.model import ClientFacts, ClientKind
from netbootd.settings import load_settings
from netbootd.store.build import sample_build
from netbootd.store.service import StoreService
from netbootd.tftp.piclient import fetch
from netbootd.tftp.server import create as create_tftp

PI_MAC, SERIAL = "d8:3a:dd:00:00:01", "00c0ffee"
KERNEL = 16 << 20  # big enough that the swap lands mid-transfer with a wide margin


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_twenty_tftp_downloads_of_n_survive_activation_of_n_plus_1(tmp_path) -> None:
    (tmp_path / "nodes.yaml").write_text(
        f"nodes:\n  {PI_MAC}: {{hostname: pi, serial: {SERIAL}, image: pi, channel: dev}}\n")
    port = free_udp_port()
    settings = load_settings(None, {
        "paths": {"images": str(tmp_path / "images"), "state": str(tmp_path / "state"),
                  "inventory": str(tmp_path / "nodes.yaml")},
        "tftp": {"port": port, "bind": "127.0.0.1"},
        "dhcp": {"enabled": False}, "http": {"enabled": False},
        "store": {"settle_seconds": 0.1, "keep": 1, "keep_booted_hours": 0},
    }, use_default_path=False)
    app = build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))
    store_svc, tftp = StoreService(app), create_tftp(app)
    await store_svc.start()
    await tftp.start()
    try:
        store = app.store
        sample_build(tmp_path / "ci" / "v1", "pi", "1", kind="pi-boot+rootfs", payload=KERNEL)
        os.rename(tmp_path / "ci" / "v1", store.layout.incoming / "pi-1")
        await until(lambda: store.active("pi", "dev") == "1")
        want = (store.layout.store / "pi" / "1" / "boot" / "kernel_2712.img").read_bytes()

        # blksize 512: ~16k round trips per transfer, so the swap lands mid-transfer
        downloads = [asyncio.create_task(fetch(("127.0.0.1", port),
                                               f"{SERIAL}/kernel_2712.img", blksize=512))
                     for _ in range(20)]
        await asyncio.sleep(0.3)
        sample_build(tmp_path / "ci" / "v2", "pi", "2", kind="pi-boot+rootfs", payload=KERNEL)
        os.rename(tmp_path / "ci" / "v2", store.layout.incoming / "pi-2")
        await until(lambda: store.active("pi", "dev") == "2")
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
