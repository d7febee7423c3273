"""The lab itself: it comes up, tears down without leftovers (also on errors and SIGTERM),
gives QEMU guests addresses through the site DHCP server, and the test image boots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netbootd.lab.capture import Capture
from netbootd.lab.guests import Guest
from netbootd.lab.netns import Topology, namespaces, netns_pids
from netbootd.lab.tools import GUEST_TOOLS, LAB_TOOLS, NFS_TOOLS, REPO, load_builder, require

pytestmark = pytest.mark.slow

RUN_FILES = ("rpcbind.sock", "rpcbind.lock", "ganesha", "ganesha.pid")


def _run_files() -> set[str]:
    return {n for n in RUN_FILES if os.path.lexists(f"/run/{n}")}


def test_lab_comes_up_and_leaves_nothing(lab_out: Path) -> None:
    require(LAB_TOOLS + NFS_TOOLS)
    from netbootd.lab.nfs import NfsServer
    from netbootd.lab.sitedhcp import SiteDhcp

    before = _run_files()
    lab = Topology().up()
    try:
        assert {lab.ns(r) for r in ("sw", "dhcp", "srv", "pi")} <= set(namespaces())
        dhcp = SiteDhcp(lab, lab_out).start()
        nfs = NfsServer(lab, lab_out, static_exports=[lab_out]).start()
        cap = Capture(lab, "srv", lab_out / "srv.pcap").start()
        pids = [p for r in ("dhcp", "srv") for p in netns_pids(lab.ns(r))]
        assert len(pids) >= 4, pids  # dnsmasq, rpcbind, ganesha, tcpdump
        # srv reaches dhcp over the bridge: the topology really is wired.
        lab.run_in("srv", ["busybox", "ping", "-c1", "-W2", lab.ip("dhcp")])
        # rpcbind/ganesha files live in their private /run, never in the host's.
        assert _run_files() == before
        cap.stop()
        nfs.stop()
        dhcp.stop()
    finally:
        lab.close()
    assert lab.leftovers() == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"pid {pid} survived"
    assert _run_files() == before


def test_lab_tears_down_on_exception() -> None:
    require(LAB_TOOLS)
    lab = Topology()
    with pytest.raises(RuntimeError), lab:
        lab.popen("srv", ["sleep", "300"])
        raise RuntimeError("boom")
    assert lab.leftovers() == []


def test_lab_tears_down_on_sigterm(tmp_path: Path) -> None:
    """A test run killed with SIGTERM (CI timeout) still removes its lab."""
    require(LAB_TOOLS)
    script = tmp_path / "lab.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from netbootd.lab.netns import Topology
        with Topology() as lab:
            lab.popen("srv", ["sleep", "300"])
            print(lab.name, flush=True)
            time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith("nbd-")
        assert any(ns.startswith(name) for ns in namespaces())
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [ns for ns in namespaces() if ns.startswith(name + "-")]


def test_image_manifest_verifies(make_image) -> None:
    builder = load_builder()
    for build in (make_image("e2e-1"), make_image("pi-1", pi=True)):
        manifest = json.loads((build / "manifest.json").read_text())
        assert builder.verify_build(build) == []
        listed = {a["path"] for a in manifest["artefacts"]}
        files = {p.relative_to(build).as_posix() for p in build.rglob("*")
                 if p.is_file() and p.name != "manifest.json"}
        assert listed == files
        for key in ("kernel", "initrd", "rootfs", "boot_tree"):
            if key in manifest["boot"]:
                assert (build / manifest["boot"][key]).exists()
    pi = json.loads((make_image("pi-1", pi=True) / "manifest.json").read_text())
    assert pi["kind"] == "pi-boot+rootfs"
    assert {"boot/config.txt", "boot/kernel_2712.img", "boot/bcm2712-rpi-5-b.dtb",
            "boot/initramfs_2712", "boot/overlays/overlay_map.dtb"} <= {
                a["path"] for a in pi["artefacts"]}
    # A corrupted file is caught.
    victim = make_image("e2e-1") / "boot" / "initrd.img"
    data = victim.read_bytes()
    try:
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        assert builder.verify_build(make_image("e2e-1"))
    finally:
        victim.write_bytes(data)


def test_initrd_boots_directly_and_prints_its_marker(boot_image: Path, lab_out: Path) -> None:
    """The image alone: QEMU -kernel/-initrd, no NIC, no netboot."""
    require(GUEST_TOOLS)
    g = Guest.direct(lab_out, boot_image / "boot/vmlinuz", boot_image / "boot/initrd.img",
                     "console=ttyS0 netbootd.version=e2e-1", timeout=60)
    with g:
        m = g.wait_for(r"NETBOOTD-TEST: booted version=(\S+)", 55)
    assert m, f"no booted marker; console in {g.console}"
    assert m.group(1) == "e2e-1"
    assert any(x.startswith("init version=e2e-1") for x in g.markers())


def test_bios_guest_gets_address_from_site_dhcp(netlab, site_dhcp, lab_out: Path) -> None:
    """SeaBIOS + iPXE on the bridge gets a lease from dnsmasq (nothing to boot: no netbootd)."""
    require(GUEST_TOOLS)
    g = Guest.netboot(netlab, lab_out, firmware="bios", timeout=60)
    with g:
        ip = site_dhcp.wait_lease(g.mac, 45)
    assert ip is not None, f"no DHCPACK for {g.mac}; see {site_dhcp.logfile}"
    lo, hi = (int(a.rsplit(".", 1)[1]) for a in netlab.pool)
    assert ip.startswith(f"10.231.{netlab.subnet}.") and lo <= int(ip.rsplit(".", 1)[1]) <= hi


def test_image_nfs_root_reports_to_an_events_sink(netlab, site_dhcp, lab_nfs, boot_image: Path,
                                                   lab_out: Path) -> None:
    """The image end to end without netbootd: DHCP, NFS root via ganesha, both reports."""
    require(GUEST_TOOLS)
    nfs = lab_nfs(static_exports=[boot_image])
    events = lab_out / "events.jsonl"
    netlab.popen("srv", [sys.executable, "-m", "netbootd.lab.sink", "--port", "8080", "--out",
                         str(events)], log_file=lab_out / "sink.log", cwd=str(REPO))
    srv = netlab.ip("srv")
    append = (f"console=ttyS0 nfsroot={srv}:{boot_image}/rootfs,vers=3,tcp,nolock "
              f"netbootd.events=http://{srv}:8080/api/v1/events {nfs.kernel_args}")
    g = Guest.direct(lab_out, boot_image / "boot/vmlinuz", boot_image / "boot/initrd.img",
                     append, lab=netlab, timeout=90)
    with g:
        m = g.wait_for(r"NETBOOTD-TEST: (reported provisioned|.*failed)", 80)
    assert m and m.group(1) == "reported provisioned", f"console: {g.console}"
    got = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["phase"] for e in got] == ["booted", "provisioned"]
    assert all(e["mac"] == g.mac and e["version"] == "e2e-1" for e in got)
    assert "nfs root mounted" in got[0]["message"]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_parallel_labs_get_distinct_names_and_subnets() -> None:
    require(LAB_TOOLS)
    with Topology() as one, Topology() as two:
        assert one.name != two.name and one.subnet != two.subnet
        for lab in (one, two):
            lab.run_in("srv", ["busybox", "ping", "-c1", "-W2", lab.ip("dhcp")])
        # The labs are isolated: one's server cannot reach the other's.
        assert lab.run_in("srv", ["busybox", "ping", "-c1", "-W1", one.ip("dhcp")],
                          check=False).returncode != 0
    assert one.leftovers() == [] and two.leftovers() == []


def test_guest_hard_timeout_kills_qemu(boot_image: Path, lab_out: Path) -> None:
    """A guest that never finishes (here: idles forever) is killed by its own timeout,
    without any help from the test (pitfall 7: OVMF waits in its shell forever)."""
    require(GUEST_TOOLS)
    g = Guest.direct(lab_out, boot_image / "boot/vmlinuz", boot_image / "boot/initrd.img",
                     "console=ttyS0", timeout=4).start()
    t0 = time.monotonic()
    rc = g.proc.wait(20)
    # timeout(1) signals its whole process group, itself included: -9 (or 137).
    assert rc in (-9, 137) and time.monotonic() - t0 < 10, rc
