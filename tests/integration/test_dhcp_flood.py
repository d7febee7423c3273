"""A flood of random MACs at the live service on loopback: every per-client table of
the DHCP path stays at its configured bound, evictions are counted, and the service
still answers a real client afterwards."""

import asyncio
import secrets
import socket

from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp.proxy import create
from netbootd.inventory import load_inventory
from netbootd.settings import load_settings
from tests.conftest import free_port

BOUND = 64
FLOOD = 3000
NODE = "52:54:00:00:0d:01"


async def test_random_macs_do_not_grow_memory(tmp_path):
    port, pxe = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    settings = load_settings(None, {
        "dhcp": {"port": port, "pxe_port": pxe, "bind": "127.0.0.1",
                 "client_port": free_port(socket.SOCK_DGRAM), "learn_from_acks": False,
                 "memo_entries": BOUND, "max_clients": BOUND},
        "network": {"max_addresses": BOUND},
        "policy": {"unknown": "ignore"}, "paths": {"state": str(tmp_path / "state")}},
        use_default_path=False)
    (tmp_path / "nodes.yaml").write_text(f"nodes:\n  {NODE}: {{action: netboot}}\n")
    app = build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))
    svc = create(app)
    await svc.start()
    loop = asyncio.get_running_loop()
    try:
        r = svc.responder
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            sent = 0
            for i in range(FLOOD):
                mac = "02:" + secrets.token_bytes(5).hex(":")
                # boot clients (memo, rate buckets, ignore events) and plain clients
                # (memo, not-boot-client events) alike
                raw = (c.pi_discover(mac, i) if i % 2 else
                       c.request(mac, i, [(53, b"\x01"), (60, b"udhcp 1.36")]))
                await loop.sock_sendto(s, raw, ("127.0.0.1", port))
                sent += 1
                if sent % 100 == 0:  # let the service keep up (loopback drops, not us)
                    while r.dropped + r.replies < sent - 50:
                        await asyncio.sleep(0.005)
            while r.dropped + r.replies < sent - 50:
                await asyncio.sleep(0.005)
        sizes = r.sizes()
        assert sizes == {"memo": BOUND, "rate": BOUND, "events": BOUND}, sizes
        for table in ("dhcp-memo", "dhcp-rate", "dhcp-events"):
            n = app.metrics.registry.get_sample_value(
                "netbootd_table_evictions_total", {"table": table})
            assert n and n >= FLOOD // 2 - 2 * BOUND, (table, n)
        assert svc.health()["tables"] == sizes
        # still answering a real client (the only one the inventory knows)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
            q.bind(("127.0.0.1", 0))
            q.setblocking(False)
            await loop.sock_sendto(q, c.pxe_bootserver_request(NODE, 9, "127.0.0.1"),
                                   ("127.0.0.1", pxe))
            assert await asyncio.wait_for(loop.sock_recv(q, 4096), 5)
    finally:
        await svc.stop()
        app.events.close()
