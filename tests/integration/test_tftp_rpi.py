"""An emulated Raspberry Pi 5 (docs/rpi-netboot.md) against the engine on 127.0.0.1.

The Pi sends RRQ octet + tsize 0 + blksize 1468 from a new port per request,
probes files (OACK, then ERROR 0 "Early terminate") and asks again, uses ``//``
in paths, a serial or MAC prefix, falls back to the root, and needs the block
number to wrap.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from netbootd.tftp.piclient import PI5_FILES, TftpError, fetch, pi5_boot
from netbootd.tftp.testkit import eventually, make_app, running

PI_MAC = "d8:3a:dd:12:34:56"
PI_SERIAL = "a1b2c3d4"
NODES = f"""
nodes:
  {PI_MAC}:
    serial: 10000000{PI_SERIAL}
    hostname: pi5-worker-1
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pi-image")
    boot = root / "boot"
    (boot / "overlays").mkdir(parents=True)
    (boot / "config.txt").write_text("arm_64bit=1\ndtoverlay=vc4-kms-v3d-pi5\n")
    (boot / "bcm2712-rpi-5-b.dtb").write_bytes(os.urandom(80_000))
    (boot / "initramfs_2712").write_bytes(os.urandom(3_000_000))
    (boot / "kernel_2712.img").write_bytes(os.urandom(2_000_000))
    (boot / "overlays" / "overlay_map.dtb").write_bytes(os.urandom(6000))
    (boot / "overlays" / "bcm2712d0.dtbo").write_bytes(os.urandom(1468 * 2))  # exact blocks
    (boot / "wrap.img").write_bytes(os.urandom(65536 * 512 + 1))
    return root


@pytest.fixture
async def pi_server(image: Path, tmp_path: Path):
    app = make_app(tmp_path / "work", image, nodes_yaml=NODES, policy="ignore")
    async with running(app) as svc:
        yield app, svc, ("127.0.0.1", app.settings.tftp.port)


def expected(image: Path, name: str) -> bytes | None:
    p = image / "boot" / name
    return p.read_bytes() if p.is_file() else None


async def test_pi5_boot_with_serial_prefix(pi_server, image: Path):
    app, svc, server = pi_server
    log = await pi5_boot(server, PI_SERIAL)
    assert log.prefix_used
    for name in PI5_FILES:
        if name in ("config.txt", "cmdline.txt"):
            continue
        assert log.files[name] == expected(image, name), name
    assert log.files["pieeprom.sig"] is None and log.files["armstub8-2712.bin"] is None
    config = log.files["config.txt"].decode()
    assert config.startswith("arm_64bit=1\n") and "# netbootd: pi5-worker-1 1" in config
    cmdline = log.files["cmdline.txt"].decode()
    assert f"netbootd.mac={PI_MAC}" in cmdline and "server=127.0.0.1" in cmdline
    await eventually(lambda: svc.active == 0)
    events = app.events.timeline(PI_MAC)
    outcomes = {e.fields["outcome"] for e in events}
    assert outcomes == {"ok", "aborted"}  # probes are aborted, never "error"
    ok = [e for e in events if e.fields["outcome"] == "ok"]
    assert all(e.fields["image"] == "demo" and e.fields["version"] == "1" for e in ok)
    kernel = [e for e in ok if e.fields["file"].endswith("kernel_2712.img")]
    assert kernel and kernel[0].fields["bytes"] == 2_000_000
    aborted = app.metrics.registry.get_sample_value(
        "netbootd_requests_total", {"service": "tftp", "outcome": "aborted"})
    assert aborted is not None and aborted >= 8


async def test_double_slash_paths(pi_server):
    _, _, server = pi_server
    for name in ("cmdline.txt", "config.txt", "overlays/overlay_map.dtb"):
        one = await fetch(server, f"{PI_SERIAL}/{name}")
        two = await fetch(server, f"{PI_SERIAL}//{name}")
        lead = await fetch(server, f"/{PI_SERIAL}//{name}")
        assert one.data == two.data == lead.data and one.data


async def test_mac_prefix(pi_server, image: Path):
    _, _, server = pi_server
    res = await fetch(server, "d8-3a-dd-12-34-56/kernel_2712.img")
    assert res.data == expected(image, "kernel_2712.img")
    assert res.tsize == len(res.data)


async def test_unknown_serial_falls_back_to_root_by_ip(pi_server, image: Path):
    """An unknown serial with an unknown IP gets ERROR 1; once the IP is known (DHCP
    learnt it), the Pi is served - under the prefix or, after dropping it, at the root."""
    app, _, server = pi_server
    with pytest.raises(TftpError) as exc:
        await fetch(server, "0badc0de/config.txt")
    assert exc.value.code == 1
    with pytest.raises(TftpError):
        await fetch(server, "config.txt")
    app.clients.learn("127.0.0.1", PI_MAC)
    log = await pi5_boot(server, "0badc0de", files=("kernel_2712.img", "cmdline.txt"))
    assert log.files["kernel_2712.img"] == expected(image, "kernel_2712.img")
    root = await pi5_boot(server, None, files=("config.txt", "initramfs_2712"))
    assert root.files["initramfs_2712"] == expected(image, "initramfs_2712")


async def test_probe_then_rerequest_and_concurrent_same_file(pi_server, image: Path):
    app, svc, server = pi_server
    probe = await fetch(server, f"{PI_SERIAL}/initramfs_2712", probe=True)
    assert probe.tsize == 3_000_000 and probe.data == b""
    results = await asyncio.gather(*[fetch(server, f"{PI_SERIAL}/initramfs_2712")
                                     for _ in range(5)])
    assert all(r.data == expected(image, "initramfs_2712") for r in results)
    assert len({r.server_port for r in results}) == 5  # one TID per transfer
    await eventually(lambda: svc.active == 0)
    aborted = [e for e in app.events.timeline(PI_MAC) if e.fields["outcome"] == "aborted"]
    assert aborted and "Early terminate" in aborted[0].message


async def test_block_number_wraps_for_pi_client(pi_server, image: Path):
    _, _, server = pi_server
    res = await fetch(server, f"{PI_SERIAL}/wrap.img", blksize=512, file_timeout=120)
    assert res.data == expected(image, "wrap.img")


async def test_exact_multiple_of_blksize_ends_with_empty_block(pi_server, image: Path):
    _, _, server = pi_server
    res = await fetch(server, f"{PI_SERIAL}/overlays/bcm2712d0.dtbo")
    assert res.data == expected(image, "overlays/bcm2712d0.dtbo")


async def test_resent_rrq_from_same_port_is_not_a_second_transfer(pi_server):
    """The Pi resends an unanswered RRQ from the same port: one transfer, not two."""
    import socket

    _, svc, server = pi_server
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(30)  # a bound for a loaded machine; the answer comes in ms
    try:
        rrq = b"\x00\x01" + f"{PI_SERIAL}/kernel_2712.img".encode() + b"\x00octet\x00" \
              b"tsize\x000\x00blksize\x001468\x00"
        s.sendto(rrq, server)
        s.sendto(rrq, server)
        first, addr = s.recvfrom(2048)
        assert first[:2] == b"\x00\x06"
        await asyncio.sleep(0.1)
        assert svc.active == 1
        s.sendto(b"\x00\x05\x00\x00Early terminate\x00", addr)
        await eventually(lambda: svc.active == 0)
    finally:
        s.close()
