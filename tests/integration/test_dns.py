"""DNS for inventory names: a real dnslib client over a real UDP socket on loopback."""

import asyncio
import socket

from dnslib import QTYPE, RCODE, DNSRecord

from netbootd.daemon import build_app
from netbootd.dns.server import create
from netbootd.settings import load_settings
from tests.conftest import free_port


async def ask(port: int, name: str, data: bytes | None = None) -> DNSRecord | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        await loop.sock_sendall(s, data or DNSRecord.question(name).pack())
        try:
            raw = await asyncio.wait_for(loop.sock_recv(s, 4096), 1.0)
        except TimeoutError:
            return None
    return DNSRecord.parse(raw)


async def test_inventory_names_resolve(config_dir):
    port = free_port(socket.SOCK_DGRAM)
    settings = load_settings(config_dir / "netbootd.yaml",
                             {"dns": {"enabled": True, "port": port, "bind": "127.0.0.1"}})
    app = build_app(settings)
    app.clients.learn("10.231.0.51", "d8:3a:dd:12:34:56")
    svc = create(app)
    await svc.start()
    try:
        r = await ask(port, "pi5-worker-1.lan")
        assert r is not None and str(r.rr[0].rdata) == "10.231.0.51"
        assert r.rr[0].rtype == QTYPE.A
        r = await ask(port, "nobody.lan")
        assert r.header.rcode == RCODE.NXDOMAIN
        r = await ask(port, "example.com")
        assert r.header.rcode == RCODE.REFUSED, "never act as a resolver"
        assert await ask(port, "", data=b"\x00\x01garbage") is None
        r = await ask(port, "pi5-worker-1.lan")
        assert r is not None, "still answering after a malformed packet"
    finally:
        await svc.stop()
        app.events.close()
