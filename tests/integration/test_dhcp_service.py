"""The proxy-DHCP service on real sockets (127.0.0.1, high ports): start, answer, stop.

Loopback cannot carry the broadcast path (the namespace tests do), so these use the
two unicast paths: a port-4011 boot-server request (reply to the asker) and an
INFORM with ciaddr (reply to ciaddr:client_port).
"""

import asyncio
import socket

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.dhcp.proxy import create
from netbootd.inventory import Inventory
from netbootd.settings import load_settings
from tests.conftest import free_port

MAC = "52:54:00:aa:bb:01"


async def exchange(sock: socket.socket, payload: bytes, dest, timeout=2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_sendto(sock, payload, dest)
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return None


def opts(raw: bytes) -> dict:
    return {o[0]: o[1] for o in BOOTP(raw)[DHCP].options if isinstance(o, tuple)}


async def test_service_name_health_and_4011_ack(dhcp_service):
    _app, svc, ports = dhcp_service
    assert svc.name == "dhcp"
    h = svc.health()
    assert h["ok"] and len(h["bound"]) == 2
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        req = c.pxe_bootserver_request(MAC, 0x4011, "127.0.0.1")
        raw = await exchange(s, req, ("127.0.0.1", ports["pxe_port"]))
    assert raw is not None, "no ACK on the PXE port"
    msg = BOOTP(raw)
    o = opts(raw)
    assert msg.xid == 0x4011 and o["message-type"] == pk.ACK
    assert o["boot-file-name"] == b"undionly.kpxe"
    assert o["server_id"] == msg.siaddr == "127.0.0.1"
    assert len(raw) >= 300
    assert svc.health()["replies"] == 1


async def test_inform_with_ciaddr_is_unicast_to_client_port(dhcp_service):
    app, _svc, ports = dhcp_service
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", ports["client_port"]))
        rx.setblocking(False)
        inform = c.request(MAC, 99, [(53, bytes([pk.INFORM])), (93, b"\x00\x07"),
                                     (60, c.OVMF_PXE_VENDOR)], ciaddr="127.0.0.1")
        tx.sendto(inform, ("127.0.0.1", ports["port"]))
        raw = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(rx, 4096), 2)
    assert opts(raw)["boot-file-name"] == b"ipxe.efi"
    assert app.clients.ip_for(MAC) is None, "an INFORM's ciaddr is a claim, not evidence"


async def test_garbage_is_counted_and_service_keeps_answering(dhcp_service):
    app, _svc, ports = dhcp_service
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        for junk in (b"", b"x", b"\x01" * 400, b"\x01" * 3000):
            s.sendto(junk, ("127.0.0.1", ports["pxe_port"]))
        raw = await exchange(s, c.pxe_bootserver_request(MAC, 5, "127.0.0.1"),
                             ("127.0.0.1", ports["pxe_port"]))
    assert raw is not None
    assert app.metrics.registry.get_sample_value(
        "netbootd_malformed_inputs_total", {"service": "dhcp"}) == 4


async def test_port_in_use_fails_start_cleanly(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        settings = load_settings(None, {"dhcp": {"port": port, "bind": "127.0.0.1",
                                                 "pxe_port": free_port(socket.SOCK_DGRAM)},
                                        "paths": {"state": str(tmp_path / "state")}},
                                 use_default_path=False)
        svc = create(build_app(settings, inventory=Inventory.empty()))
        with pytest.raises(OSError):
            await svc.start()
        assert not svc.health()["ok"]
