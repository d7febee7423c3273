"""A Raspberry Pi 5 protocol client (DHCP + TFTP as the bootloader does
it, docs/rpi-netboot.md) boots from netbootd beside a real site DHCP server: proxy offer with
option 43 "Raspberry Pi Boot", the whole Pi 5 file set for its serial, and a rendered
cmdline.txt naming the planned NFS root and cloud-init URL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SERIAL = "10000000c0ffee42"


def test_pi5_client_loads_its_file_set_with_rendered_cmdline(netlab, boot_lab, make_image,
                                                              lab_out: Path) -> None:
    build = make_image("pi-1", pi=True)
    manifest = json.loads((build / "manifest.json").read_text())
    mac = netlab.pi_mac  # the pi namespace's eth0 carries a Raspberry Pi OUI
    bl = boot_lab(nodes={mac: {"hostname": "pi5-e2e", "serial": SERIAL, "image": "pi-e2e",
                               "channel": "prod"}})
    version = bl.publish(build)

    out = lab_out / "piboot.json"
    proc = bl.lab.run_in("pi", [sys.executable, "-m", "netbootd.lab.piboot", "--serial", SERIAL,
                                "--out", str(out)], check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    srv = bl.lab.ip("srv")

    # DHCP: an address from the site server, a proxy offer from netbootd the Pi accepts.
    assert r["site"] and r["ack"], r["offers"]
    assert r["proxy"], f"no proxy offer; see {bl.nbd.log}"
    p = r["proxy"][0]
    assert p["ip_src"] == srv and p["siaddr"] == srv and p["eth_dst"] == "ff:ff:ff:ff:ff:ff"
    opts = {k: bytes.fromhex(v) for k, v in p["options"].items()}
    assert b"Raspberry Pi Boot" in opts["43"]
    assert opts["54"] == bytes(int(x) for x in srv.split("."))
    assert opts["60"] == b"PXEClient"
    assert opts["66"].rstrip(b"\0").decode() == srv

    # TFTP: every file of the boot tree, byte for byte, under the serial prefix.
    assert r["prefix_used"] is True
    want = {a["path"].removeprefix("boot/"): a for a in manifest["artefacts"]
            if a["path"].startswith("boot/")}
    for name, got in r["files"].items():
        if name in ("cmdline.txt", "config.txt"):
            assert got is not None, name
        elif name in want:
            assert got == {"size": want[name]["size"], "sha256": want[name]["sha256"]}, name
        else:  # pieeprom.sig, armstub8-2712.bin: absent on purpose
            assert got is None, name
    assert r["files"]["kernel_2712.img"] is not None

    # cmdline.txt names the planned version's NFS root and this node's cloud-init seed.
    cmdline = r["text"]["cmdline.txt"]
    rootfs = bl.nbd.images / "store" / "pi-e2e" / version / "rootfs"
    assert f"nfsroot={srv}:{rootfs}" in cmdline, cmdline
    assert f"ds=nocloud;s=http://{srv}:8080/cloud-init/{mac.replace(':', '-')}/" in cmdline
    assert f"netbootd.version={version}" in cmdline
    assert cmdline.count("\n") <= 1, "cmdline.txt must be one line"

    node = bl.nbd.node(mac)
    assert node and node["hostname"] == "pi5-e2e"
    files = {e["fields"].get("file") for e in node["timeline"] if e["kind"] == "tftp"}
    assert any(str(f).endswith("kernel_2712.img") for f in files), files

