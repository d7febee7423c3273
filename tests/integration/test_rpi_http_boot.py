"""Raspberry Pi 5 HTTP boot against the real store, planner and HTTP service on loopback,
booted by the emulated Pi (netbootd/rpi/httpclient.py): boot.img signed with the key
`netbootd keys generate` printed, each node's own cmdline.txt inside it, a tampered cache
never served, one version per Pi across a hot swap, bootloader updates fetched once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from pathlib import Path

import aiohttp
import pytest
from dnslib import QTYPE, DNSRecord

from netbootd.cli import main as cli_main
from netbootd.dns.server import create as create_dns
from netbootd.http.app import create as create_http
from netbootd.lab.pihttp import eeprom_from
from netbootd.rpi.httpclient import (
    Board,
    BootRefused,
    check_signature,
    load_public_key,
    pi5_http_boot,
)
from netbootd.store.service import StoreService
from netbootd.tftp.piclient import fetch
from netbootd.tftp.server import create as create_tftp
from tests.conftest import free_port
from tests.storekit import drop_build, flip, store_app, until

REPO = Path(__file__).resolve().parents[2]
PIS = 20


def mac(i: int) -> str:
    return f"d8:3a:dd:00:01:{i:02x}"


def serial(i: int) -> str:
    return f"5e{i:06x}"


def generate_keys(out: Path) -> bytes:
    """`netbootd keys generate --out DIR`; returns the public key PEM it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["keys", "generate", "--out", str(out)]) == 0
    text = buf.getvalue()
    assert "BOOT_ORDER=0xf17" in text and "HTTP_PATH=netboot" in text
    return eeprom_from(text).public_pem


@pytest.fixture
async def daemon(tmp_path: Path):
    pem = generate_keys(tmp_path / "keys")
    upd_dir = tmp_path / "pieeprom"
    upd_dir.mkdir()
    (upd_dir / "fleet.bin").write_bytes(b"PIEEPROM" * 4096)
    nodes = "nodes:\n" + "".join(
        f"  {mac(i)}: {{hostname: pi{i}, serial: {serial(i)}, image: pi, channel: dev, "
        f"vars: {{http_boot: true{', pieeprom: fleet.bin' if i == 0 else ''}}}}}\n"
        for i in range(PIS))
    nodes += "  d8:3a:dd:00:02:00: {hostname: tftp-only, serial: 5f000000, image: pi, " \
             "channel: dev}\n"
    http_port, tftp_port, dns_port = free_port(), free_port(socket.SOCK_DGRAM), \
        free_port(socket.SOCK_DGRAM)
    app = store_app(tmp_path, nodes, {
        "store": {"settle_seconds": 0.1, "keep": 3, "keep_booted_hours": 0},
        "http": {"port": http_port, "bind": "127.0.0.1"},
        "tftp": {"port": tftp_port, "bind": "127.0.0.1", "workers": 0},
        "dns": {"enabled": True, "port": dns_port, "bind": "127.0.0.1"},
        "paths": {"templates": str(REPO / "config" / "templates")},
        "rpi": {"pieeprom_dir": str(upd_dir),
                "http_boot": {"enabled": True, "key_file": str(tmp_path / "keys" /
                                                               "http-boot.key"),
                              "host_name": "netboot.lan"}},
    })
    store_svc = StoreService(app)
    await store_svc.start()
    http, tftp = create_http(app), create_tftp(app)
    await http.start()
    await tftp.start()
    try:
        yield app, http, tftp, pem, http_port, tftp_port
    finally:
        await tftp.stop()
        await http.stop()
        await store_svc.stop()
        app.events.close()


def url(port: int, i: int) -> str:
    return f"http://127.0.0.1:{port}/netboot/{serial(i)}"


async def activate(app, tmp_path: Path, version: str) -> None:
    drop_build(app, tmp_path, "pi", version, kind="pi-boot+rootfs", payload=2 << 20)
    await until(lambda: app.store.active("pi", "dev") == version, timeout=60)


async def test_boot_img_is_signed_with_the_generated_key_and_carries_the_nodes_own_cmdline(
        daemon, tmp_path) -> None:
    app, http, _tftp, pem, port, _ = daemon
    images = http.ctx.boot_images
    await activate(app, tmp_path, "1")
    # built ahead of time for every Pi on HTTP boot (not for the TFTP-only node)
    await until(lambda: images.built >= PIS, timeout=120)
    built = images.built
    key = load_public_key(pem)
    logs = [await pi5_http_boot(url(port, i), Board(key)) for i in (1, 2)]
    assert images.built == built, "the boot.img was ready before the Pi asked"
    for i, log in zip((1, 2), logs, strict=True):
        cmdline = log.files["cmdline.txt"].decode()
        assert f"netbootd.mac={mac(i)}" in cmdline and "netbootd.version=1" in cmdline
        assert f"# netbootd: pi{i} 1" in log.files["config.txt"].decode()
        assert log.files["kernel_2712.img"].startswith(b"PIKERNEL pi-1-")
        assert log.files["config.txt"].startswith(b"arm_64bit=1\n")
    assert logs[0].files["cmdline.txt"] != logs[1].files["cmdline.txt"]
    # a node that is not on HTTP boot gets nothing; a stranger neither
    async with aiohttp.ClientSession() as s:
        for path in ("5f000000/boot.img", "deadbeef/boot.sig", "boot.img"):
            async with s.get(f"http://127.0.0.1:{port}/netboot/{path}") as r:
                assert r.status == 404, path
        # Range works (resume)
        async with s.get(f"{url(port, 1)}/boot.img", headers={"Range": "bytes=0-511"}) as r:
            assert r.status == 206 and len(await r.read()) == 512
    # the boot token in the image is the boot's proof (lifecycle reports accept it)
    token = next(w for w in logs[0].files["cmdline.txt"].decode().split()
                 if w.startswith("netbootd.token=")).split("=", 1)[1]
    assert app.planner.current(mac(1)).token == token
    # fetches are events like TFTP ones
    served = [e for e in app.events.timeline(mac(1))
              if e.kind == "http" and str(e.fields.get("file", "")).endswith("boot.img")]
    assert served and served[-1].fields["version"] == "1"


async def test_a_tampered_cache_is_rebuilt_never_served_with_a_valid_signature(
        daemon, tmp_path) -> None:
    app, http, _tftp, pem, port, _ = daemon
    images = http.ctx.boot_images
    await activate(app, tmp_path, "1")
    await until(lambda: images.built >= PIS, timeout=120)
    key = load_public_key(pem)
    first = await pi5_http_boot(url(port, 3), Board(key), reads=("cmdline.txt",))
    cached = [p for p in images.root.rglob("*.img") if not p.name.startswith(".")
              and first.sig.split("\n")[0] in p.with_suffix(".sig").read_text()]
    assert len(cached) == 1
    flip(cached[0], first.image_bytes // 2)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url(port, 3)}/boot.sig") as r:
            sig = await r.text()
        async with s.get(f"{url(port, 3)}/boot.img") as r:
            body = await r.read()
    check_signature(sig, body, key)  # what was served verifies: the rebuilt image
    assert images.refused == 1
    assert body == cached[0].read_bytes()
    # and an image that does not match its signature is what the Pi refuses
    with pytest.raises(BootRefused):
        check_signature(sig, body[:-1] + bytes([body[-1] ^ 1]), key)


async def test_hot_swap_between_boot_sig_and_boot_img_leaves_every_pi_on_one_version(
        daemon, tmp_path) -> None:
    app, _http, _tftp, pem, port, _ = daemon
    key = load_public_key(pem)
    await activate(app, tmp_path, "1")
    async with aiohttp.ClientSession() as s:
        async def get(i: int, name: str) -> bytes:
            async with s.get(f"{url(port, i)}/{name}") as r:
                assert r.status == 200, (i, name, r.status)
                return await r.read()

        # the storm: every Pi has its boot.sig (version 1) when version 2 goes live
        sigs = await asyncio.gather(*(get(i, "boot.sig") for i in range(PIS)))
        await activate(app, tmp_path, "2")
        imgs = await asyncio.gather(*(get(i, "boot.img") for i in range(PIS)))
    for i, (sig, img) in enumerate(zip(sigs, imgs, strict=True)):
        check_signature(sig.decode(), img, key)
        assert b"PIKERNEL pi-1-" in img and b"PIKERNEL pi-2-" not in img, i
    # whole boots racing the next swap: each one verifies and names one version
    boots = [asyncio.create_task(pi5_http_boot(url(port, i), Board(key),
                                               reads=("cmdline.txt", "kernel_2712.img")))
             for i in range(PIS)]
    for i in range(PIS):  # the next boot of each Pi plans afresh
        app.planner.end(mac(i))
    await activate(app, tmp_path, "3")
    logs = await asyncio.gather(*boots)
    for log in logs:
        v = log.version
        assert v in ("1", "2", "3")
        assert log.files["kernel_2712.img"].startswith(f"PIKERNEL pi-{v}-".encode())
    for i in range(PIS):
        app.planner.end(mac(i))
    after = await pi5_http_boot(url(port, 5), Board(key), reads=("cmdline.txt",))
    assert after.version == "3"


async def test_bootloader_update_is_fetched_once_then_not_again(daemon, tmp_path) -> None:
    app, _http, _tftp, pem, port, tftp_port = daemon
    key = load_public_key(pem)
    await activate(app, tmp_path, "1")
    board = Board(key)
    first = await pi5_http_boot(url(port, 0), board, reads=("cmdline.txt",))
    app.planner.end(mac(0))
    second = await pi5_http_boot(url(port, 0), board, reads=("cmdline.txt",))
    assert first.eeprom_fetched and not second.eeprom_fetched and board.flashed == 1
    upd = (tmp_path / "pieeprom" / "fleet.bin").read_bytes()
    import hashlib
    assert board.eeprom_sha256 == hashlib.sha256(upd).hexdigest()
    fetched = [e for e in app.events.timeline(mac(0))
               if str(e.fields.get("file", "")).endswith("pieeprom.upd")]
    assert len(fetched) == 1 and fetched[0].fields["bytes"] == len(upd)
    # a node without vars.pieeprom is not offered one
    other = await pi5_http_boot(url(port, 1), Board(key), reads=())
    assert not other.eeprom_fetched
    # the same update under the node's TFTP prefix
    sig = await fetch(("127.0.0.1", tftp_port), f"{serial(0)}/pieeprom.sig")
    lines = sig.data.decode().splitlines()
    assert lines[0] == board.eeprom_sha256 and lines[1].startswith("ts: ")
    got = await fetch(("127.0.0.1", tftp_port), f"{serial(0)}/pieeprom.upd")
    assert got.data == upd
    from netbootd.tftp.piclient import TftpError
    with pytest.raises(TftpError):
        await fetch(("127.0.0.1", tftp_port), f"{serial(1)}/pieeprom.sig")


async def test_dns_answers_the_http_host_name(daemon) -> None:
    app, *_ = daemon
    dns = create_dns(app)
    reply = DNSRecord.parse(dns.answer(DNSRecord.question("netboot.lan").pack(), "127.0.0.1"))
    assert [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A] == ["127.0.0.1"]
    other = DNSRecord.parse(dns.answer(DNSRecord.question("example.com").pack(), "127.0.0.1"))
    assert not other.rr
