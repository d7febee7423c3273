"""Provisioning to disk, end to end: real QEMU guests (x86_64, TCG, SeaBIOS + iPXE ROM) with
a blank virtio disk and the boot order network-then-disk, a real dnsmasq as the site DHCP
server, netbootd (proxy-DHCP, TFTP, HTTP) in the lab's srv namespace, the real installer
image and the real golden Debian 12 image (images/build_installer.py, images/build_golden.py).

1. ``action: install``: the guest netboots the installer, which writes the golden image
   (the disk's bytes equal the image's); at the next boot netbootd stays silent (event log:
   DHCP decisions ``local``; pcap: no proxy answer for that MAC after ``installed``), the
   firmware falls through to the disk, Debian boots and its cloud-init fetches the node's
   identity by address only (hostname, k3s config with the join token on the disk); the
   node is ``local`` with the installed version.
2. Power cut at about half of the progress: the next boot installs again; the node is never
   ``installed`` before the second install has finished and verified.
3. A disk image whose declared uncompressed sha256 is wrong: ``install-failed`` with the
   reason, never ``installed``.
4. ``netbootd nodes reinstall NODE`` after a newer golden image is active: the guest
   installs and boots the new version.
5. ``install.upgrade: auto``: the node of scenario 2 (installed, the older version on its
   disk) installs the newer version at its next boot with no operator verb and boots it;
   ``netbootd images rollback`` brings the older version back the same way.

One lab, one netbootd and one installer for the module; each golden version is built once
(from the debootstrap tree cached in images/cache) with the lab's seed URL baked in.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netbootd.lab.capture import Capture
from netbootd.lab.disks import DISK_TOOLS, RootFs, blank_disk, decompress, same_prefix
from netbootd.lab.guests import Guest, random_mac
from netbootd.lab.netns import Topology
from netbootd.lab.server import Netbootd, netbootd_argv
from netbootd.lab.sitedhcp import SiteDhcp
from netbootd.lab.tools import GUEST_TOOLS, REPO, drop_build, require

pytestmark = pytest.mark.slow

#: Generous bounds for a loaded 2-core machine running QEMU under TCG.
INSTALL_BOUND = 1500      # netboot + write and verify 1 GiB
DEBIAN_BOUND = 1200       # firmware -> disk -> Debian -> cloud-init final stage
GUEST_HARD_LIMIT = 3600   # `timeout -s KILL` around every QEMU
MEMORY = "768M"
#: The golden image's raw size: the least build_golden allows is ~640 MiB (tree + 30 % +
#: boot); every MiB is written and hashed by the installer under TCG (~2.5 MB/s here).
GOLD_MIB = 704
#: Guest disk = image + this: room for growpart to grow the root at first boot.
DISK_SLACK = 256 << 20
K3S_TOKEN = "k3s-join-token-e2e-0123456789abcdef"
INSTALLED_LINE = r"NETBOOTD-INSTALL: installed; rebooting"
CLOUD_INIT_DONE = r"Cloud-init v\. \S+ finished"


# ------------------------------------------------------------------------------ the lab

@dataclass
class Gold:
    """One golden build as published: its manifest and its decompressed bytes."""

    build: Path
    manifest: dict[str, Any]
    raw: Path

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def usize(self) -> int:
        return self.manifest["disk"]["uncompressed_size"]


@dataclass
class ProvLab:
    lab: Topology
    out: Path
    dhcp: SiteDhcp
    nbd: Netbootd
    cap: Capture
    macs: dict[str, str]
    make_gold: Callable[[str], Gold]
    #: What earlier tests left for later ones (node a's disk after scenario 1).
    shared: dict[str, Any] = field(default_factory=dict)

    # -- images --------------------------------------------------------------------------
    def publish(self, build: Path, timeout: float = 120) -> str:
        """Drop a build into netbootd's incoming/ as CI does; wait until active on prod."""
        manifest = json.loads((build / "manifest.json").read_text())
        drop_build(build, self.nbd.incoming)
        assert self.nbd.wait_active(manifest["image"], manifest["version"], timeout=timeout), (
            f"{manifest['image']} {manifest['version']} not active after {timeout}s; "
            f"see {self.nbd.log}")
        return manifest["version"]

    def make_active(self, gold: Gold) -> None:
        """Make ``gold`` the active version on prod: published as CI does the first time,
        activated through the API after that (a version is ingested only once)."""
        image = gold.manifest["image"]
        published = self.shared.setdefault("published", set())
        if (image, gold.version) not in published:
            self.publish(gold.build)
            published.add((image, gold.version))
            return
        if self.nbd.active_version(image) != gold.version:
            status, body = self.nbd.request("POST", f"/api/v1/images/{image}/activate",
                                            {"version": gold.version, "channel": "prod"},
                                            auth=True)
            assert status == 200, (status, body)
        assert self.nbd.wait_active(image, gold.version, timeout=60)

    # -- the operator's CLI ----------------------------------------------------------------
    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``netbootd ARGV`` as an operator runs it beside the running daemon (same config
        file, same state directories); fails the test unless it exits 0."""
        proc = subprocess.run(
            [*netbootd_argv(), "--config", str(self.nbd.config_file), *argv],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(self.nbd.dir))
        assert proc.returncode == 0, f"netbootd {' '.join(argv)}: {proc.stdout}{proc.stderr}"
        return proc

    # -- guests --------------------------------------------------------------------------
    def guest(self, name: str, disk: Path, *, reboot: bool = False) -> Guest:
        return Guest.netboot(self.lab, self.out, name=name, mac=self.macs[name.split(".")[0]],
                             disk=disk, reboot=reboot, memory=MEMORY,
                             timeout=GUEST_HARD_LIMIT)

    # -- netbootd's view -----------------------------------------------------------------
    def record(self, mac: str) -> dict[str, Any] | None:
        """The lifecycle record on disk (``<paths.state>/lifecycle/``), as the CLI sees it."""
        path = self.nbd.dir / "state" / "lifecycle" / (mac.replace(":", "-") + ".json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def events(self, mac: str, since: float = 0.0) -> list[dict[str, Any]]:
        """The daemon's event log (``<paths.state>/events.jsonl``) for one MAC."""
        path = self.nbd.dir / "state" / "events.jsonl"
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if ev.get("mac") == mac and ev["ts"] >= since:
                out.append(ev)
        return out

    def wait_stage(self, mac: str, stages: set[str], bound: float, guest: Guest | None = None,
                   seen: list[tuple[str, int | None]] | None = None,
                   until: Callable[[dict[str, Any]], bool] | None = None,
                   ) -> dict[str, Any]:
        """Poll the lifecycle record until its stage is one of ``stages`` (and ``until``
        holds); every distinct (stage, progress) on the way goes to ``seen``. Fails with
        the console's tail when the bound passes or the guest ends first."""
        deadline = time.monotonic() + bound
        while True:
            # "ended" before reading: a guest that reports and then exits is not a failure
            ended = guest is not None and not guest.running()
            rec = self.record(mac)
            if rec is not None and seen is not None:
                step = (rec["stage"], rec.get("progress"))
                if not seen or seen[-1] != step:
                    seen.append(step)
            if rec is not None and rec["stage"] in stages and (until is None or until(rec)):
                return rec
            if ended or time.monotonic() > deadline:
                tail = guest.text()[-3000:] if guest is not None else ""
                why = "guest ended" if ended else f"no {stages} within {bound}s"
                pytest.fail(f"{mac}: {why}; record {rec}; seen {seen}; console tail:\n{tail}")
            time.sleep(0.2)

    def dhcp_after(self, mac: str, since: float) -> list[dict[str, Any]]:
        return [e for e in self.events(mac, since) if e["kind"] == "dhcp"]

    def proxy_answers(self, mac: str, since: float | None = None) -> list[str]:
        """Packets from netbootd's DHCP ports whose BOOTP chaddr is ``mac`` (broadcast or
        not), from the srv namespace's pcap."""
        b = bytes.fromhex(mac.replace(":", ""))
        bpf = (f"src host {self.lab.ip('srv')} and (udp src port 67 or udp src port 4011) "
               f"and udp[36:4] = 0x{b[:4].hex()} and udp[40:2] = 0x{b[4:].hex()}")
        return self.cap.read(bpf, since=since)

    def asked(self, mac: str, since: float) -> list[str]:
        return self.cap.read(f"ether src {mac} and udp dst port 67", since=since)


def _srv_pcap_ok(cap: Capture) -> None:
    assert cap.proc is not None and cap.proc.poll() is None, "tcpdump in srv stopped"


@pytest.fixture(scope="module")
def prov(module_lab: Topology, module_out: Path, make_golden, make_installer
         ) -> Iterator[ProvLab]:
    require(GUEST_TOOLS + DISK_TOOLS + ["tcpdump", "dnsmasq", "curl"])
    lab, out = module_lab, module_out
    srv = lab.ip("srv")
    macs = {"prov-a": random_mac(), "prov-b": random_mac(), "prov-c": random_mac()}
    disk_vars = {"install_disk": "largest"}
    token = out / "k3s-token"
    token.write_text(K3S_TOKEN + "\n")
    nodes = {
        macs["prov-a"]: {"hostname": "prov-a", "role": "worker", "action": "install",
                         "install": {"image": "gold", "channel": "prod"},
                         "vars": {**disk_vars, "join": "k3s",
                                  "k3s_server": f"https://{srv}:6443"}},
        # auto: scenario 5 upgrades and rolls back the disk scenario 2 leaves installed
        macs["prov-b"]: {"hostname": "prov-b", "action": "install",
                         "install": {"image": "gold", "channel": "prod", "upgrade": "auto"},
                         "vars": disk_vars},
        macs["prov-c"]: {"hostname": "prov-c", "action": "install",
                         "install": {"image": "badgold", "channel": "prod"},
                         "vars": disk_vars},
    }
    dhcp = SiteDhcp(lab, out).start()
    cap = nbd = None
    try:
        # DHCP, TFTP, ARP: the evidence. Not the image downloads over HTTP (hundreds of MB
        # per install, which would push test-output/ over its budget).
        cap = Capture(lab, "srv", out / "srv.pcap", bpf="not tcp port 8080").start()
        nbd = Netbootd(lab, out, nodes=nodes, settings={"secrets": {"k3s_token": str(token)}})
        nbd.start()
        seed = f"http://{srv}:{nbd.http_port}/cloud-init/by-address/"
        golds: dict[str, Gold] = {}

        def make_gold(version: str) -> Gold:
            if version not in golds:
                build = make_golden(version, seed, size_mib=GOLD_MIB)
                manifest = json.loads((build / "manifest.json").read_text())
                raw = decompress(build / manifest["disk"]["path"],
                                 out / f"gold-{version}.raw")
                golds[version] = Gold(build, manifest, raw)
            return golds[version]

        pl = ProvLab(lab, out, dhcp, nbd, cap, macs, make_gold)
        pl.publish(make_installer("e2e-1"))
        pl.make_active(make_gold("e2e-1"))
        yield pl
    finally:
        if nbd is not None:
            nbd.stop()
        if cap is not None:
            cap.stop()
        dhcp.stop()
        # The decompressed images and the guests' disks (~1 GB each, apparent size): kept,
        # they would push test-output/ over its budget and the logs would be pruned too.
        for big in (*out.glob("*.raw"), *out.glob("*.disk")):
            big.unlink()


# ------------------------------------------------------------------------------ helpers

def _install(pl: ProvLab, name: str, disk: Path, gold: Gold) -> tuple[Guest, float]:
    """Netboot the guest (QEMU exits at the installer's reboot); return the guest and when
    netbootd recorded ``installed``. Asserts the disk's bytes are the image's."""
    mac = pl.macs[name.split(".")[0]]
    g = pl.guest(name, disk)
    with g:
        rec = pl.wait_stage(mac, {"installed", "install-failed"}, INSTALL_BOUND, guest=g,
                            until=lambda r: r["version"] == gold.version
                            or r["stage"] == "install-failed")
        assert rec["stage"] == "installed", rec
        assert g.wait_for(INSTALLED_LINE, 60), g.text()[-3000:]
        assert g.wait_exit(120) is not None, "QEMU did not end at the installer's reboot"
    installed_at = rec["updated"]
    assert rec["image"] == "gold" and rec["version"] == gold.version
    bad = same_prefix(disk, gold.raw)
    assert bad is None, f"disk differs from {gold.version} at byte {bad}"
    return g, installed_at


def _boot_from_disk(pl: ProvLab, name: str, disk: Path, gold: Gold, since: float) -> Guest:
    """Power the guest on again: netbootd must stay silent, the disk boots, cloud-init asks
    for its identity by address and the node becomes ``local``. Returns the stopped guest."""
    mac = pl.macs[name.split(".")[0]]
    g = pl.guest(name, disk)
    with g:
        rec = pl.wait_stage(mac, {"local"}, DEBIAN_BOUND, guest=g)
        assert rec["version"] == gold.version
        assert g.wait_for(CLOUD_INIT_DONE, DEBIAN_BOUND), g.text()[-3000:]
    text = g.text()
    assert "Linux version" in text and "NETBOOTD-INSTALL" not in text, text[-3000:]
    # The event log: every DHCP request of this MAC after `installed` was decided `local`
    # and got no reply.
    dhcp = pl.dhcp_after(mac, since)
    assert dhcp, "no DHCP decision recorded for the node after installed"
    assert all(e["fields"].get("outcome") == "ignored" for e in dhcp), dhcp
    decisions = {e["fields"].get("decision") for e in dhcp}
    assert "local" in decisions and decisions <= {"local", "rate-limited"}, dhcp
    assert not any("proxy" in e["message"] and "sent" in e["message"] for e in dhcp), dhcp
    # The wire: the guest asked, netbootd said nothing to it.
    assert pl.asked(mac, since), "no DHCP from the guest after installed in the pcap"
    answered = pl.proxy_answers(mac, since)
    assert answered == [], answered
    # cloud-init asked by address only (the seed URL baked into the image).
    seeds = [e["fields"].get("file") for e in pl.events(mac, since)
             if e["kind"] == "http" and e["message"].startswith("cloud-init")]
    assert "/cloud-init/by-address/meta-data" in seeds, seeds
    assert "/cloud-init/by-address/user-data" in seeds, seeds
    assert all(s.startswith("/cloud-init/by-address/") for s in seeds), seeds
    return g


def _check_node_api(pl: ProvLab, mac: str, gold: Gold) -> dict[str, Any]:
    node = pl.nbd.node(mac)
    assert node is not None
    assert (node["lifecycle"], node["action"], node["installed"]) == (
        "local", "local", f"gold {gold.version}"), node
    return node


def _check_disk_os(root: RootFs, hostname: str, gold: Gold) -> None:
    """The disk's root file system is ``gold``'s, and cloud-init named it ``hostname``."""
    assert (root.read("/etc/netbootd-image") or "").split() == ["gold", gold.version]
    assert (root.read("/etc/hostname") or "").strip() == hostname


def _check_identity(pl: ProvLab, disk: Path, hostname: str, gold: Gold) -> None:
    srv = pl.lab.ip("srv")
    with RootFs(disk, pl.out) as root:
        _check_disk_os(root, hostname, gold)
        k3s = root.read("/etc/rancher/k3s/config.yaml")
        assert k3s is not None, "cloud-init did not write the k3s config"
        assert f"token: {K3S_TOKEN}" in k3s, k3s
        assert f"server: https://{srv}:6443" in k3s, k3s
        assert f"node-name: {hostname}" in k3s, k3s
        assert f"netbootd.io/image=gold-{gold.version}" in k3s, k3s
        # the seed URL the image carries is netbootd's by-address URL, nothing per node
        cfg = root.read("/etc/cloud/cloud.cfg.d/90_netbootd.cfg") or ""
        assert f"seedfrom: http://{srv}:8080/cloud-init/by-address/" in cfg, cfg


def _reinstall_and_boot(pl: ProvLab, name: str, disk: Path, gold: Gold) -> None:
    """An installed node whose next boot plans ``install``: power it on, it installs
    ``gold`` over its disk; power it on again, it boots that version from the disk and is
    ``local`` with it."""
    mac = pl.macs[name.split(".")[0]]
    t0 = time.time()
    _, installed_at = _install(pl, f"{name}-install", disk, gold)
    assert pl.proxy_answers(mac, t0), f"{name}: the reinstall boot got no proxy answer"
    _boot_from_disk(pl, f"{name}-disk-boot", disk, gold, installed_at)
    _check_node_api(pl, mac, gold)


def _newer_gold(pl: ProvLab) -> Gold:
    """The second golden version, active on prod (built from the same cached tree)."""
    v2 = pl.make_gold("e2e-2")
    pl.make_active(v2)
    return v2


def _install_and_boot_a(pl: ProvLab) -> dict[str, Any]:
    """Scenario 1 for node prov-a; later scenarios reuse its disk."""
    if "a" in pl.shared:
        return pl.shared["a"]
    gold = pl.make_gold("e2e-1")
    mac = pl.macs["prov-a"]
    disk = blank_disk(pl.out / "prov-a.disk", gold.usize + DISK_SLACK)
    assert pl.record(mac) is None
    t0 = time.time()
    _, installed_at = _install(pl, "prov-a.install", disk, gold)
    # The installer's boot got netbootd's proxy answers (the pcap filter sees them) ...
    assert pl.proxy_answers(mac, t0), "no proxy answer to the installer's boot in the pcap"
    # ... and after `installed`, the same filter sees nothing.
    _boot_from_disk(pl, "prov-a.disk-boot", disk, gold, installed_at)
    pl.shared["a"] = {"disk": disk, "installed_at": installed_at}
    return pl.shared["a"]


# ------------------------------------------------------------------------------ tests

def test_install_then_silence_then_disk_boot_with_identity_by_address(prov: ProvLab) -> None:
    a = _install_and_boot_a(prov)
    mac = prov.macs["prov-a"]
    gold = prov.make_gold("e2e-1")
    _check_node_api(prov, mac, gold)
    _check_identity(prov, a["disk"], "prov-a", gold)
    phases = [e["kind"] for e in prov.events(mac) if e["kind"] in
              ("installing", "installed", "local", "failed")]
    assert phases[0] == "installing" and phases.count("installed") == 1, phases
    assert phases.index("installed") < phases.index("local"), phases


def test_power_cut_mid_install_reinstalls_and_half_a_disk_is_never_installed(
        prov: ProvLab) -> None:
    gold = prov.make_gold("e2e-1")
    mac = prov.macs["prov-b"]
    disk = blank_disk(prov.out / "prov-b.disk", gold.usize + DISK_SLACK)
    seen: list[tuple[str, int | None]] = []
    g = prov.guest("prov-b.cut", disk)
    with g:
        rec = prov.wait_stage(mac, {"installing", "installed"}, INSTALL_BOUND, guest=g,
                              seen=seen, until=lambda r: r["stage"] == "installed"
                              or (r.get("progress") or 0) >= 50)
        assert rec["stage"] == "installing", f"installed before the cut: {seen}"
        at = rec["progress"]
        g.power_cut()
        assert not g.running()
    cut = time.time()
    assert 50 <= at < 100, seen
    assert "NETBOOTD-INSTALL: installed" not in g.text()
    rec = prov.record(mac)
    assert rec is not None and rec["stage"] == "installing", rec
    assert same_prefix(disk, gold.raw) is not None, "a half-written disk equals the image?"
    node = prov.nbd.node(mac)
    assert node is not None and node["lifecycle"] == "installing" and node["action"] == "install"

    # The next boot installs again; until that install has verified, nothing says installed.
    seen2: list[tuple[str, int | None]] = []
    g2 = prov.guest("prov-b.again", disk)
    with g2:
        rec = prov.wait_stage(mac, {"installed", "install-failed"}, INSTALL_BOUND, guest=g2,
                              seen=seen2)
        assert rec["stage"] == "installed", seen2
        assert g2.wait_for(INSTALLED_LINE, 60)
        assert g2.wait_exit(120) is not None
    assert same_prefix(disk, gold.raw) is None, "the second install did not write the image"
    assert all(stage == "installing" for stage, _ in seen2[:-1]), seen2
    evs = [e for e in prov.events(mac) if e["kind"] in ("installing", "installed")]
    installed = [e for e in evs if e["kind"] == "installed"]
    assert len(installed) == 1 and installed[0]["ts"] > cut, evs
    restart = [e for e in evs if e["kind"] == "installing" and e["ts"] > cut
               and e["fields"].get("progress") == 0]
    assert restart and restart[0]["ts"] < installed[0]["ts"], evs
    # Both boots took a proxy answer from netbootd (the second is a fresh install boot).
    assert prov.proxy_answers(mac, cut)
    prov.shared["b"] = disk


def _bad_disk_image(out: Path) -> Path:
    """A valid small disk build whose manifest declares a wrong uncompressed sha256 (the
    store checks the .zst's sha256, which is right; the raw figure is the builder's word)."""
    build = out / "badgold-e2e-1"
    build.mkdir(exist_ok=True)
    raw = build.parent / "badgold.raw.tmp"
    raw.write_bytes(hashlib.shake_256(b"netbootd bad").digest(4 << 20) + bytes(12 << 20))
    packed = build / "badgold-e2e-1.img.zst"
    subprocess.run(["zstd", "-q", "-f", "-o", str(packed), str(raw)], check=True)
    usize = raw.stat().st_size
    raw.unlink()
    zsha = hashlib.sha256(packed.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"not the image").hexdigest()
    disk = {"path": packed.name, "compression": "zst", "size": packed.stat().st_size,
            "sha256": zsha, "uncompressed_size": usize, "uncompressed_sha256": wrong}
    manifest = {"image": "badgold", "version": "e2e-1", "kind": "disk", "boards": ["x86_64"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "boot": {"disk": packed.name}, "disk": disk,
                "artefacts": [{"path": packed.name, "size": disk["size"], "sha256": zsha}]}
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return build


def test_wrong_sha256_ends_in_install_failed_with_the_reason(prov: ProvLab) -> None:
    mac = prov.macs["prov-c"]
    build = _bad_disk_image(prov.out)
    prov.publish(build)
    wrong = json.loads((build / "manifest.json").read_text())["disk"]["uncompressed_sha256"]
    disk = blank_disk(prov.out / "prov-c.disk", 64 << 20)
    seen: list[tuple[str, int | None]] = []
    g = prov.guest("prov-c.install", disk)
    with g:
        rec = prov.wait_stage(mac, {"install-failed", "installed"}, INSTALL_BOUND, guest=g,
                              seen=seen)
        assert g.wait_for(r"NETBOOTD-INSTALL: stopped: sha256 mismatch", 60), g.text()[-3000:]
        # the installer stays on its console (no reboot into another attempt)
        assert g.running()
    assert rec["stage"] == "install-failed", seen
    assert rec["reason"].startswith("sha256 mismatch: image is "), rec
    assert rec["reason"].endswith(f"expected {wrong}"), rec
    assert all(stage != "installed" for stage, _ in seen), seen
    # the record is written before the event, and the event log's writer thread writes
    # its file every 50 ms: wait for the event to reach the file
    deadline = time.monotonic() + 60
    kinds = [e["kind"] for e in prov.events(mac)]
    while "failed" not in kinds and time.monotonic() < deadline:
        time.sleep(0.1)
        kinds = [e["kind"] for e in prov.events(mac)]
    assert "installed" not in kinds and "failed" in kinds, kinds
    failed = next(e for e in prov.events(mac) if e["kind"] == "failed")
    assert failed["message"].startswith("sha256 mismatch"), failed
    node = prov.nbd.node(mac)
    assert node is not None and node["lifecycle"] == "install-failed", node
    # retried at the next network boot (provision.retry_failed defaults to true)
    assert node["action"] == "install", node


def test_operator_reinstall_after_a_newer_image_boots_the_new_version(prov: ProvLab) -> None:
    a = _install_and_boot_a(prov)
    mac = prov.macs["prov-a"]
    v2 = _newer_gold(prov)
    # A newer version on the channel changes nothing for an installed node by itself.
    node = prov.nbd.node(mac)
    assert node is not None and (node["lifecycle"], node["action"]) == ("local", "local"), node
    cli = prov.cli("nodes", "reinstall", "prov-a")
    assert "lifecycle install" in cli.stdout, cli.stdout
    node = prov.nbd.node(mac)
    assert node is not None and (node["lifecycle"], node["action"]) == ("install", "install")
    _reinstall_and_boot(prov, "prov-a.reinstall", a["disk"], v2)
    _check_identity(prov, a["disk"], "prov-a", v2)


def _installed_b(pl: ProvLab) -> Path:
    """prov-b's disk with e2e-1 installed and verified: what scenario 2 leaves, or (when
    this test runs alone) one install now."""
    if "b" in pl.shared:
        return pl.shared["b"]
    v1 = pl.make_gold("e2e-1")
    pl.make_active(v1)
    disk = blank_disk(pl.out / "prov-b.disk", v1.usize + DISK_SLACK)
    _install(pl, "prov-b.install", disk, v1)
    pl.shared["b"] = disk
    return disk


def _plan(pl: ProvLab, mac: str) -> dict[str, Any]:
    """``netbootd plan --json MAC``: what the node gets at its next boot, and why."""
    return json.loads(pl.cli("plan", "--json", mac).stdout)


def test_auto_upgrade_and_images_rollback_reinstall_at_the_next_boot(prov: ProvLab) -> None:
    """``install.upgrade: auto``: the channel decides what is on the disk. No operator verb:
    activating a newer version, then ``netbootd images rollback``, each make the node
    install at its next boot and boot that version."""
    mac = prov.macs["prov-b"]
    disk = _installed_b(prov)
    v1 = prov.make_gold("e2e-1")
    rec = prov.record(mac)
    assert rec is not None and (rec["stage"], rec["version"]) == ("installed", v1.version), rec

    # A newer version becomes active (as CI publishes it): the next boot installs it.
    v2 = _newer_gold(prov)
    node = prov.nbd.node(mac)
    assert node is not None and (node["lifecycle"], node["action"]) == ("installed", "install")
    plan = _plan(prov, mac)
    assert (plan["action"], plan["disk"]) == ("install", f"gold {v2.version}"), plan
    assert f"upgrade: gold {v1.version} on disk, gold {v2.version} wanted" in plan["reason"]
    _reinstall_and_boot(prov, "prov-b.upgrade", disk, v2)
    assert _plan(prov, mac)["action"] == "local"

    # The operator rolls the channel back with the CLI, beside the running daemon.
    out = prov.cli("images", "rollback", "gold", "--channel", "prod").stdout
    assert f"gold rolled back to {v1.version} on prod" in out, out
    assert prov.nbd.active_version("gold") == v1.version
    node = prov.nbd.node(mac)
    assert node is not None and (node["lifecycle"], node["action"]) == ("local", "install")
    plan = _plan(prov, mac)
    assert (plan["action"], plan["disk"]) == ("install", f"gold {v1.version}"), plan
    assert f"upgrade: gold {v2.version} on disk, gold {v1.version} wanted" in plan["reason"]
    _reinstall_and_boot(prov, "prov-b.rollback", disk, v1)
    with RootFs(disk, prov.out) as root:
        _check_disk_os(root, "prov-b", v1)


def test_no_guest_outlives_the_tests(prov: ProvLab) -> None:
    """Every QEMU this module started has ended (the lab's teardown checks the rest)."""
    pids = subprocess.run(["ip", "netns", "pids", prov.lab.ns("sw")], capture_output=True,
                          text=True, check=False).stdout.split()
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            continue
    assert not [n for n in names if n.startswith("qemu")], names
