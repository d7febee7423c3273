"""A Raspberry Pi 5 provisioned to its NVMe, end to end on loopback with the real daemon.

The daemon (:class:`netbootd.daemon.Daemon`: store, proxy-DHCP, TFTP, HTTP, the lifecycle
watch) runs on 127.0.0.1 high ports from a config file; CI drops a synthetic Pi installer
(``images/build_installer.py --pi``) and a disk image into ``incoming/``. The Pi is the
project's emulated Pi 5: its DHCP DISCOVER (the Pi's own options, flags 0) reaches
netbootd through a DHCP relay agent on 127.0.0.2 (giaddr), because loopback cannot carry
the broadcast a Pi on the same segment would get; its TFTP client is
:mod:`netbootd.tftp.piclient`. The installer's reports are the GETs its /init sends, to
the events URL of its own cmdline.txt, from the node's address (``ip: 127.0.0.1``).
The operator's reinstall is the real CLI in a subprocess against the same config.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from netbootd.daemon import Daemon, build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.model import Action
from netbootd.settings import load_settings
from netbootd.store.build import sample_build
from netbootd.tftp.piclient import PI5_FILES, pi5_boot
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PI_MAC = "d8:3a:dd:12:34:57"
PI_SERIAL = "a1b2c3d5"
RELAY = "127.0.0.2"
#: Files a Pi 5 loads that netbootd renders (the rest are the installer's own bytes).
RENDERED = ("config.txt", "cmdline.txt")
#: Bound for conditions on a loaded, shared CI machine (met in well under a second).
PATIENCE = 60.0


async def until(cond, what: str, timeout: float = PATIENCE) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


def write_config(tmp: Path) -> Path:
    cfg = tmp / "config"
    cfg.mkdir()
    (cfg / "api-token").write_text("api-token-for-pi-tests\n")
    (cfg / "nodes.yaml").write_text(textwrap.dedent(f"""
        nodes:
          {PI_MAC}:
            serial: 10000000{PI_SERIAL}
            hostname: pi5-nvme-1
            ip: 127.0.0.1
            action: install
            install: {{image: gold}}
        """))
    (cfg / "netbootd.yaml").write_text(textwrap.dedent(f"""
        dhcp: {{bind: 127.0.0.1, port: {free_port(socket.SOCK_DGRAM)},
                pxe_port: {free_port(socket.SOCK_DGRAM)},
                client_port: {free_port(socket.SOCK_DGRAM)}}}
        tftp: {{bind: 127.0.0.1, port: {free_port(socket.SOCK_DGRAM)}, workers: 0}}
        http: {{bind: 127.0.0.1, port: {free_port()}, api_token_file: {cfg / 'api-token'}}}
        dns: {{enabled: false}}
        nfs: {{backend: none}}
        paths: {{images: {tmp / 'images'}, state: {tmp / 'state'},
                 inventory: {cfg / 'nodes.yaml'}, templates: {REPO / 'config' / 'templates'}}}
        policy: {{unknown: ignore}}
        boot: {{default_channel: prod}}
        store: {{auto_activate: {{"*": prod}}, settle_seconds: 0.2}}
        """))
    return cfg / "netbootd.yaml"


def drop(build: Path, incoming: Path) -> None:
    """Publish a finished build the way CI does: one rename into incoming/."""
    incoming.mkdir(parents=True, exist_ok=True)
    os.rename(build, incoming / build.name)


async def run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=REPO)
    out, _ = await asyncio.wait_for(proc.communicate(), PATIENCE)
    return proc.returncode or 0, out.decode()


class Relay:
    """A DHCP relay agent (RFC 1542) on 127.0.0.2: it forwards the Pi's DISCOVER unchanged
    but for giaddr and hops, and receives netbootd's answer at giaddr:67 (here the
    daemon's DHCP port)."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((RELAY, server[1]))
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def send_discover(self, xid: int) -> None:
        raw = bytearray(c.pi_discover(PI_MAC, xid, serial=int(PI_SERIAL, 16)))
        raw[3] = 1  # hops
        raw[pk.GIADDR_SLICE] = socket.inet_aton(RELAY)
        self.sock.sendto(bytes(raw), self.server)

    def pending(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out

    async def offer(self, xid: int) -> BOOTP:
        """DISCOVERs as the Pi sends them (again and again) until an OFFER for ``xid``."""
        loop = asyncio.get_running_loop()
        end = time.monotonic() + PATIENCE
        while time.monotonic() < end:
            self.send_discover(xid)
            try:
                raw = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), 0.5)
            except TimeoutError:
                continue  # the Pi's own retry (every 4 s) is shortened here
            msg = BOOTP(raw)
            if msg.xid == xid:
                return msg
        raise AssertionError("no proxy offer")


def options(msg: BOOTP) -> dict:
    return {o[0]: o[1] for o in msg[DHCP].options if isinstance(o, tuple)}


def cmdline_args(text: str) -> dict[str, str]:
    return dict(a.split("=", 1) for a in text.split() if "=" in a)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple]:
    config = write_config(tmp_path)
    settings = load_settings(config)
    images = settings.paths.images
    # CI: the Pi installer and the golden disk image, built elsewhere, then dropped.
    builds = tmp_path / "builds"
    rc, out = await run(str(REPO / "images" / "build_installer.py"), "--pi", "--pi-scale",
                        "0.05", "--version", "2026.12.01-1", "--out",
                        str(builds / "installer-2026.12.01-1"))
    assert rc == 0, out
    installer = builds / "installer-2026.12.01-1"
    boot_files = {p.relative_to(installer / "boot").as_posix(): p.read_bytes()
                  for p in (installer / "boot").rglob("*") if p.is_file()}
    sample_build(builds / "gold-1.0", "gold", "1.0", "disk", payload=256 * 1024)
    app = build_app(settings)
    d = Daemon(app)
    await d.start()
    relay = Relay(("127.0.0.1", settings.dhcp.port))
    try:
        assert not d.failed, d.failed
        drop(installer, images / "incoming")
        drop(builds / "gold-1.0", images / "incoming")
        await until(lambda: app.planner.images.resolve("installer", "prod", None) is not None
                    and app.planner.images.resolve("gold", "prod", None) is not None,
                    "both builds ingested and active on prod")
        yield app, d, relay, config, boot_files
    finally:
        relay.close()
        await d.stop()


async def pi_boots_installer(app, relay: Relay, boot_files: dict[str, bytes], xid: int
                             ) -> dict[str, str]:
    """One network boot of the Pi: the proxy offer, then the Pi 5 file set over TFTP.
    Returns the rendered cmdline.txt as arguments."""
    offer = await relay.offer(xid)
    o = options(offer)
    assert o["message-type"] == pk.OFFER and offer.yiaddr == "0.0.0.0"
    assert b"Raspberry Pi Boot" in o["vendor_specific"]
    assert offer.siaddr == o["server_id"] == "127.0.0.1"
    log = await pi5_boot((offer.siaddr, app.settings.tftp.port), PI_SERIAL)
    assert log.prefix_used
    for name in PI5_FILES:
        if name not in RENDERED:
            assert log.files[name] == boot_files.get(name), name  # the installer's bytes
    config = log.files["config.txt"].decode()
    assert config.startswith(boot_files["config.txt"].decode())  # its own, then ours
    assert "# netbootd: pi5-nvme-1 2026.12.01-1" in config
    cmdline = log.files["cmdline.txt"].decode()
    assert cmdline.count("\n") == 1 and cmdline.endswith("\n")
    assert "nfsroot" not in cmdline and "root=/dev/nfs" not in cmdline
    return cmdline_args(cmdline)


async def report(events_url: str, phase: str, token: str, **extra: object) -> int:
    """What the installer's /init sends: one GET per event, from the node's address."""
    q = urlencode({"mac": PI_MAC, "phase": phase, "token": token, **extra})
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0))
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.get(f"{events_url}?{q}", timeout=aiohttp.ClientTimeout(total=PATIENCE)) as r:
        return r.status


async def test_pi_installs_to_nvme_then_is_left_alone_until_reinstalled(daemon):
    app, d, relay, config, boot_files = daemon
    gold = app.planner.images.resolve("gold", "prod", None)
    assert gold is not None and gold.disk is not None

    args = await pi_boots_installer(app, relay, boot_files, xid=0x5101)
    plan = app.planner.current(PI_MAC)
    assert plan is not None and plan.action is Action.INSTALL
    assert (plan.image.name, plan.image.kind) == ("installer", "installer")
    base = f"http://127.0.0.1:{app.settings.http.port}"
    assert args["netbootd.install"] == f"{base}/files/gold/1.0/{gold.disk.path}"
    assert args["netbootd.compression"] == gold.disk.compression == "none"
    assert args["netbootd.size"] == str(gold.disk.size)
    assert args["netbootd.usize"] == str(gold.disk.uncompressed_size)
    assert args["netbootd.sha256"] == gold.disk.uncompressed_sha256
    assert args["netbootd.disk"] == "/dev/nvme0n1"
    assert args["netbootd.mac"] == PI_MAC
    assert args["netbootd.events"] == f"{base}/api/v1/events"
    assert args["netbootd.token"] == plan.token
    assert args["netbootd.version"] == "1.0"

    # the installer streams the image (the URL its cmdline names is served) and reports
    timeout = aiohttp.ClientTimeout(total=PATIENCE)
    async with aiohttp.ClientSession() as s, \
            s.get(args["netbootd.install"], headers={"Range": "bytes=0-9"},
                  timeout=timeout) as r:
        assert r.status == 206 and await r.read() == b"DISK " + b"gold-"
    token = args["netbootd.token"]
    for pct in (0, 50, 99):
        assert await report(args["netbootd.events"], "installing", token, progress=pct) == 200
    assert await report(args["netbootd.events"], "installed", token, progress=100) == 200
    record = app.node_state.get(PI_MAC)
    assert (record.stage.value, record.image, record.version) == ("installed", "gold", "1.0")

    # it reboots; its EEPROM tries the network first: netbootd does not answer, so the
    # bootloader moves on to the NVMe
    before = d.app.services["dhcp"].responder.dropped
    relay.send_discover(0x5102)
    await until(lambda: d.app.services["dhcp"].responder.dropped > before,
                "the DISCOVER after 'installed' decided")
    assert relay.pending() == [], "netbootd answered an installed Pi"
    decided = [e for e in app.events.timeline(PI_MAC)
               if e.kind == "dhcp" and e.fields.get("decision") == "local"]
    assert decided and decided[-1].fields["outcome"] == "ignored"

    # the operator asks for a reinstall with the CLI; the next network boot installs again
    rc, out = await run("-m", "netbootd", "--config", str(config), "nodes", "reinstall",
                        "pi5-nvme-1")
    assert rc == 0 and "lifecycle install" in out, out
    again = await pi_boots_installer(app, relay, boot_files, xid=0x5103)
    plan = app.planner.current(PI_MAC)
    assert plan is not None and plan.action is Action.INSTALL
    assert again["netbootd.token"] == plan.token != token, "a new boot, a new token"
    assert again["netbootd.install"] == args["netbootd.install"]
    assert await report(again["netbootd.events"], "installed", token) == 403, \
        "the first boot's token is void"
    assert app.node_state.get(PI_MAC).stage.value == "install"
