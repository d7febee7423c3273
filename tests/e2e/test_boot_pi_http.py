"""Raspberry Pi 5 HTTP boot in the netns lab: netbootd in ``srv``, real dnsmasq as the
site's DHCP server (naming netbootd as the resolver), and a few emulated Pi 5s, each in a
namespace of its own (netbootd/lab/pihttp.py). Each board is configured with what
`netbootd keys generate` printed (public key, HTTP_HOST name, port, path), takes its
address from dnsmasq beside netbootd's proxy offer, resolves HTTP_HOST through netbootd's
DNS, and boots its signed boot.img, found by its address alone (HTTP_PATH without serial).

Checked: every signature verifies with the printed key; cmdline.txt and config.txt inside
boot.img are the node's own; a byte flipped in the server's cache is never served with a
valid signature; a version activated while a storm is between boot.sig and boot.img
changes none of those boots, and the next boots all get the new version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netbootd.lab.netns import Topology
from netbootd.lab.pihttp import Eeprom, eeprom_from
from netbootd.lab.server import Netbootd, netbootd_argv
from netbootd.lab.sitedhcp import SiteDhcp
from netbootd.lab.tools import REPO
from netbootd.rpi.httpclient import check_signature, load_public_key
from tests.storekit import flip

pytestmark = pytest.mark.slow

PIS = 4
HOST_NAME = "netboot.lan"


@dataclass
class PiLab:
    lab: Topology
    out: Path
    nbd: Netbootd
    dhcp: SiteDhcp
    eeprom: Eeprom
    eeprom_file: Path
    pis: list[tuple[str, str, str]]  #: (namespace role, MAC, serial)

    def boot_all(self, tag: str, *, pis: list[tuple[str, str, str]] | None = None,
                 hold: Path | None = None, hand_over: bool = True,
                 before_finish: Callable[[], None] | None = None,
                 timeout: float = 300) -> list[dict]:
        """Boot every Pi (or ``pis``) at once, one process in each Pi's namespace; their
        results. ``before_finish`` runs once all started (with ``hold``: all held)."""
        procs, outs = [], []
        for role, _mac, serial in pis or self.pis:
            out = self.out / f"{tag}-{role}.json"
            out.unlink(missing_ok=True)
            argv = [sys.executable, "-m", "netbootd.lab.pihttp", "--serial", serial,
                    "--eeprom", str(self.eeprom_file), "--out", str(out),
                    "--collect", "20"]  # an upper bound: DHCP returns once both answered
            argv += ["--hold", str(hold)] if hold is not None else []
            argv += ["--hand-over"] if hand_over else []
            procs.append(self.lab.popen(role, argv, log_file=self.out / f"{tag}-{role}.log"))
            outs.append(out)
        try:
            if hold is not None:
                held = [o.with_suffix(".held") for o in outs]
                wait_for(lambda: all(h.exists() for h in held), timeout,
                         f"not every Pi fetched boot.sig; see {self.out}/{tag}-*.log")
            if before_finish is not None:
                before_finish()
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:  # only on failure are any left; the lab's close() backs this up
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        for p, o in zip(procs, outs, strict=True):
            assert p.returncode == 0 and o.exists(), f"{o.name}: exit {p.returncode}; see logs"
        return [json.loads(o.read_text()) for o in outs]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def keys_generate(nbd: Netbootd) -> str:
    """`netbootd --config FILE keys generate`, as an operator runs it; what it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NETBOOTD_CONFIG", None)
    proc = subprocess.run([*netbootd_argv(), "--config", str(nbd.config_file), "keys",
                           "generate"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def pi_lab(netlab: Topology, lab_out: Path) -> Iterator[PiLab]:
    roles = ["pi"] + [netlab.add_pi() for _ in range(PIS - 1)]
    pis = [(r, netlab.pi_mac_of(r), f"10000000e2e0{i:04x}") for i, r in enumerate(roles)]
    nodes = {mac: {"hostname": f"pi-http-{i}", "serial": serial, "image": "pi-e2e",
                   "channel": "prod", "vars": {"http_boot": True}}
             for i, (_r, mac, serial) in enumerate(pis)}
    srv = netlab.ip("srv")
    nbd = Netbootd(netlab, lab_out, nodes=nodes, settings={
        "dns": {"enabled": True},
        "store": {"settle_seconds": 0.0},
        "rpi": {"http_boot": {"enabled": True, "host_name": HOST_NAME,
                              "key_file": str(lab_out / "netbootd" / "keys" /
                                              "http-boot.key")}},
    })
    dhcp = SiteDhcp(netlab, lab_out, dns=srv)
    try:
        nbd.write_config()
        printed = keys_generate(nbd)
        eeprom_file = lab_out / "eeprom.txt"
        eeprom_file.write_text(printed)
        dhcp.start()
        nbd.start()
        yield PiLab(netlab, lab_out, nbd, dhcp, eeprom_from(printed), eeprom_file, pis)
    finally:
        nbd.stop()
        dhcp.stop()


def cached_image(nbd: Netbootd, sha256: str) -> Path:
    """The server's cached boot.img whose boot.sig names ``sha256``."""
    cache = nbd.dir / "state" / "http-boot"
    hits = [p.with_suffix(".img") for p in cache.rglob("*.sig")
            if p.read_text().startswith(sha256)]
    assert len(hits) == 1, (sha256, list(cache.rglob("*")))
    return hits[0]


def assert_own_boot(r: dict, mac: str, version: str, lab: PiLab, hostname: str) -> None:
    """One Pi's HTTP boot: verified by the printed key, one version, its own files."""
    h = r.get("http") or {}
    assert "refused" not in h and h.get("sig"), (mac, h.get("refused"), r.get("offers"))
    assert h["host"] == lab.lab.ip("srv")  # HTTP_HOST resolved by netbootd's DNS
    # the board checked boot.sig against the image with the printed key (else "refused")
    assert h["sig"].split("\n", 1)[0] == h["image_sha256"]
    assert h["version"] == version, (mac, h["version"], h["text"]["cmdline.txt"])
    cmdline, config = h["text"]["cmdline.txt"], h["text"]["config.txt"]
    assert f"netbootd.mac={mac}" in cmdline and f"netbootd.version={version}" in cmdline
    assert f"/cloud-init/{mac.replace(':', '-')}/" in cmdline
    assert cmdline.count("\n") <= 1
    assert f"# netbootd: {hostname} {version}" in config, config
    assert f" pi-e2e {version} " in h["kernel_head"], h["kernel_head"]


def test_pi5s_boot_over_http_signed_with_the_printed_key_tamper_never_served(
        pi_lab: PiLab, make_image) -> None:
    lab = pi_lab
    assert lab.eeprom.http_host == HOST_NAME and lab.eeprom.http_path == "netboot"
    version = lab.nbd.publish(make_image("pi-1", pi=True))
    results = lab.boot_all("boot")
    for i, ((_role, mac, _serial), r) in enumerate(zip(lab.pis, results, strict=True)):
        # DHCP: the address from the site server; netbootd's proxy offer beside it
        assert r["ack"] and r["ip"].startswith("10.231."), r["offers"]
        assert r["proxy"] and b"Raspberry Pi Boot" in bytes.fromhex(
            r["proxy"][0]["options"]["43"])
        assert_own_boot(r, mac, version, lab, f"pi-http-{i}")
        assert r["http"]["hand_over"] == 200
    assert len({r["http"]["text"]["cmdline.txt"] for r in results}) == PIS
    # the timeline shows the HTTP-boot fetches like TFTP ones
    node = lab.nbd.node(lab.pis[0][1])
    files = [e["fields"].get("file", "") for e in node["timeline"] if e["kind"] == "http"]
    assert any(f.endswith("/boot.img") for f in files) and any(
        f.endswith("/boot.sig") for f in files), files

    # A byte of Pi 0's cached boot.img flipped on the server: the next boot gets an image
    # that verifies (rebuilt), never the flipped bytes with a valid signature.
    mac = lab.pis[0][1]
    first = results[0]["http"]
    img = cached_image(lab.nbd, first["sig"].split("\n", 1)[0])
    flip(img, first["image_bytes"] // 2)
    tampered = img.read_bytes()
    again = lab.boot_all("after-tamper", pis=lab.pis[:1])[0]
    assert_own_boot(again, mac, version, lab, "pi-http-0")
    with pytest.raises(Exception, match="sha256"):
        check_signature(again["http"]["sig"], tampered, load_public_key(lab.eeprom.public_pem))
    assert "does not match its boot.sig" in lab.nbd.log.read_text()


def test_hot_swap_mid_storm_leaves_every_pi_on_one_version(pi_lab: PiLab, make_image) -> None:
    lab = pi_lab
    v1_build = make_image("pi-1", pi=True)
    v2_build = make_image("pi-2", pi=True, marker="second pi build")
    v1 = lab.nbd.publish(v1_build)
    # v2 is staged beside incoming/ now, so activating it mid-storm is one rename
    staged = lab.nbd.incoming / f".{v2_build.name}.staged"
    shutil.copytree(v2_build, staged)
    gate = lab.out / "release"

    def swap_then_release() -> None:
        staged.rename(lab.nbd.incoming / v2_build.name)
        assert lab.nbd.wait_active("pi-e2e", "pi-2", timeout=60, poll=0.05)
        gate.touch()

    # every Pi holds between boot.sig (v1) and boot.img while v2 becomes active
    first = lab.boot_all("storm", hold=gate, before_finish=swap_then_release)
    for i, ((_role, mac, _serial), r) in enumerate(zip(lab.pis, first, strict=True)):
        assert_own_boot(r, mac, v1, lab, f"pi-http-{i}")
        assert r["http"]["hand_over"] == 200  # the OS runs: the next boot plans afresh
    # the next power cycle of every Pi boots the new version, again whole
    second = lab.boot_all("next")
    for i, ((_role, mac, _serial), r) in enumerate(zip(lab.pis, second, strict=True)):
        assert_own_boot(r, mac, "pi-2", lab, f"pi-http-{i}")
        assert "second pi build" in r["http"]["kernel_head"]
