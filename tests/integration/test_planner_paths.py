"""The planner's promises where a Raspberry Pi meets them: real store service, real
proxy-DHCP responder, real TFTP service, the emulated Pi 5 client."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from netbootd.cli import main
from netbootd.dhcp import clients as c
from netbootd.dhcp.netif import Interface, Interfaces
from netbootd.dhcp.testkit import responder_for
from netbootd.store.service import StoreService
from netbootd.tftp.piclient import TftpError, fetch
from netbootd.tftp.server import create as create_tftp
from tests.conftest import free_port
from tests.storekit import ONE_VERSION, drop_build, store_app, until

TEMPLATES = Path(__file__).resolve().parents[2] / "config" / "templates"
PI_MAC, SERIAL, SERVER = "d8:3a:dd:00:00:07", "0badcafe", "10.231.0.1"
NODES = f"nodes:\n  {PI_MAC}: {{hostname: pi7, serial: {SERIAL}, image: pi, channel: dev}}\n"


def responder(app):
    ifs = Interfaces()
    ifs.by_index = {2: Interface(2, "veth0", [(SERVER, 24)])}
    return responder_for(app, ifs, available=frozenset({"undionly.kpxe", "ipxe.efi"}))


def discover(r, xid: int):
    return r.handle(c.pi_discover(PI_MAC, xid), ifindex=2, local_ip=SERVER,
                    peer=("0.0.0.0", 68), pxe_port=False)


async def test_a_pi_that_asks_before_its_image_is_active_boots_as_soon_as_it_is(tmp_path):
    port = free_port(socket.SOCK_DGRAM)
    app = store_app(tmp_path, NODES, {"store": ONE_VERSION, "paths": {"templates": str(TEMPLATES)},
                                      "tftp": {"port": port, "bind": "127.0.0.1"}})
    store_svc, tftp = StoreService(app), create_tftp(app)
    await store_svc.start()
    await tftp.start()
    try:
        r = responder(app)
        assert discover(r, 1) is not None  # a power-on: the Pi asks at once
        with pytest.raises(TftpError):
            await fetch(("127.0.0.1", port), f"{SERIAL}/config.txt", tries=1)
        drop_build(app, tmp_path, "pi", "1", kind="pi-boot+rootfs")
        await until(lambda: app.store.active("pi", "dev") == "1", timeout=120)
        # its very next request boots: nothing of the empty plan was kept
        got = await fetch(("127.0.0.1", port), f"{SERIAL}/config.txt")
        assert got.data
        assert app.planner.current(PI_MAC).image.version == "1"
    finally:
        await tftp.stop()
        await store_svc.stop()
        app.events.close()


async def test_a_pi_on_an_x86_only_image_gets_no_offer_and_check_says_why(tmp_path, capsys):
    app = store_app(tmp_path, NODES, {"store": ONE_VERSION, "paths": {"templates": str(TEMPLATES)}})
    store_svc = StoreService(app)
    await store_svc.start()
    try:
        drop_build(app, tmp_path, "pi", "1")  # kind kernel+initrd, boards x86_64
        await until(lambda: app.store.active("pi", "dev") == "1", timeout=120)
        assert discover(responder(app), 7) is None, "no offer"
        events = [e for e in app.events.recent(50) if e.kind == "dhcp"]
        assert any("no Raspberry Pi boot tree" in (e.fields.get("reason") or e.message)
                   for e in events), events
    finally:
        await store_svc.stop()
        app.events.close()
    cfg = tmp_path / "netbootd.yaml"
    cfg.write_text(f"paths:\n  images: {tmp_path / 'images'}\n  state: {tmp_path / 'state'}\n"
                   f"  inventory: {tmp_path / 'nodes.yaml'}\n  templates: {TEMPLATES}\n")
    assert main(["check", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "pi7" in err and "no Raspberry Pi boot tree" in err
