"""arm64 boards: QEMU's aarch64 ``virt`` machine under TCG with Debian's U-Boot
(u-boot-qemu, qemu_arm64) netboots the arm64 test image through netbootd.

The path, as the events and the serial console show it: U-Boot's DHCP (vendor class
``U-Boot.armv8``, arch 22) -> the site server's lease with next-server = netbootd (stock
U-Boot ignores proxy offers) -> TFTP ``boot.scr.uimg`` (rendered per node) -> ``pxe get``:
TFTP ``pxelinux.cfg/01-<mac>`` -> ``pxe boot``: TFTP kernel + initrd of the planned version
-> the arm64 initrd reports ``booted`` with the boot's token. With NFS root (netbootd's
ganesha exports, the arm64 image's busybox rootfs) the initrd mounts the planned version's
rootfs, switch_roots, and the rootfs reports ``provisioned``; the AAVMF/GRUB path reaches
the same markers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from netbootd.lab.guests import random_mac
from netbootd.lab.nfs import NfsServer
from netbootd.lab.tools import ARM64_GUEST_TOOLS, ARM64_UEFI_TOOLS, NFS_TOOLS, require

pytestmark = pytest.mark.slow

BOOTED = r"NETBOOTD-TEST: (reported booted|report booted .* failed)"
#: TCG aarch64 on a shared 2-core VM: U-Boot's distro boot, ~28 MB over U-Boot's TFTP
#: (one block per round trip) and the kernel's boot. Measured ~60-90 s; bounded generously.
BOOT_TIMEOUT = 300
#: From the initrd's NFS mount to the rootfs's report: switch_root, busybox from NFS under
#: TCG. Seconds when quiet; bounded generously.
ROOT_TIMEOUT = 180
PROVISIONED = r"NETBOOTD-TEST: (reported provisioned|.* failed)"


def _node(hostname: str) -> dict:
    return {"hostname": hostname, "image": "demo-arm64", "channel": "prod",
            "vars": {"nfs_root": False}}


def _nfs_node(hostname: str, nfs: NfsServer) -> dict:
    """A node booting with NFS root (the templates' default); the test image learns the
    lab NFS server's ports from the command line."""
    return {"hostname": hostname, "image": "demo-arm64", "channel": "prod",
            "vars": {"cmdline": nfs.kernel_args}}


def _nfs_settings(exports: Path, nfs: NfsServer) -> dict:
    """netbootd manages the lab ganesha's exports (the x86 NFS-root test's set-up)."""
    return {"nfs": {"backend": "ganesha", "ganesha_config": str(exports),
                    "ganesha_pidfile": str(nfs.dir / "ganesha.pid")}}


def _reaches_provisioned(bl, g, mac: str, version: str) -> dict:
    """Wait for the guest's NFS-root boot: ``booted`` from the initrd once the planned
    version's rootfs is mounted, then ``provisioned`` from that rootfs; the API agrees."""
    m = g.wait_for(BOOTED + r"|(bootarg overflow.*)", BOOT_TIMEOUT)
    assert m, f"no boot within {BOOT_TIMEOUT}s; console: {g.console}"
    assert not m.group(2), f"U-Boot: {m.group(2)}: the append is too long; {g.console}"
    assert m.group(1) == "reported booted", f"console: {g.console}"
    m = g.wait_for(PROVISIONED, ROOT_TIMEOUT)
    assert m and m.group(1) == "reported provisioned", f"console: {g.console}"
    node = bl.nbd.wait_node(mac, "provisioned", 60, version=version)
    assert node is not None, f"API never showed {mac} provisioned {version}; log {bl.nbd.log}"
    rootfs = bl.nbd.images / "store" / "demo-arm64" / version / "rootfs"
    console = g.text()
    assert f"nfs root mounted {bl.lab.ip('srv')}:{rootfs}" in console
    assert f"rootfs init version={version}" in console
    booted = [e for e in node["timeline"] if e["kind"] == "booted"]
    assert booted and str(rootfs) in booted[-1]["message"]
    return node


@pytest.fixture
def arm64_image(make_image):
    require(ARM64_GUEST_TOOLS)
    return lambda version: make_image(version, name="demo-arm64", arch="arm64")


def _files(timeline: list[dict]) -> list[str]:
    return [str(e["fields"].get("file")) for e in timeline if e["kind"] == "tftp"]


def test_uboot_guest_netboots_the_planned_arm64_version(boot_lab, arm64_image) -> None:
    mac = random_mac()
    dashed = mac.replace(":", "-")
    bl = boot_lab(nodes={mac: _node("arm-1")})
    v1 = bl.publish(arm64_image("arm64-e2e-1"))
    g = bl.arm64_guest("uboot", mac=mac, timeout=BOOT_TIMEOUT + 30)
    with g:
        # Hot swap while U-Boot fetches the kernel: this boot stays on v1.
        assert g.wait_for(r"Retrieving file: netbootd/\S+/vmlinuz", BOOT_TIMEOUT), g.console
        v2 = bl.publish(arm64_image("arm64-e2e-2"))
        m = g.wait_for(BOOTED, BOOT_TIMEOUT)
        assert m and m.group(1) == "reported booted", f"console: {g.console}"
        node = bl.nbd.wait_node(mac, "booted", 20)
    assert node is not None, f"API never showed {mac} booted; log {bl.nbd.log}"
    assert node["version"] == v1 and node["image"] == "demo-arm64"
    assert f"booted version={v1}" in g.text()
    console = g.text()
    assert f"pxelinux.cfg/01-{dashed}" in console
    assert f"netbootd/{dashed}/demo-arm64/{v1}/boot/initrd.img" in console

    tl = node["timeline"]
    dhcp = [e for e in tl if e["kind"] == "dhcp" and e["fields"].get("client") == "uboot"]
    assert dhcp and dhcp[0]["fields"]["arch"] == 22, "U-Boot's DISCOVER: arch 22"
    files = _files(tl)
    script = files.index("boot.scr.uimg")
    config = files.index(f"pxelinux.cfg/01-{dashed}")
    kernel = files.index(f"netbootd/{dashed}/demo-arm64/{v1}/boot/vmlinuz")
    assert script < config < kernel, files
    assert all(e["fields"].get("version") in (None, v1)
               for e in tl[:next(i for i, e in enumerate(tl) if e["kind"] == "booted")]), tl
    assert bl.dhcp.acked(mac), "the address came from the site DHCP server"

    # The booted report ended the session: the next boot of the board gets v2.
    g2 = bl.arm64_guest("uboot", mac=mac, timeout=BOOT_TIMEOUT + 30, name="arm64-second")
    with g2:
        m = g2.wait_for(BOOTED, BOOT_TIMEOUT)
        assert m and m.group(1) == "reported booted", f"console: {g2.console}"
    assert f"booted version={v2}" in g2.text()
    assert f"netbootd/{dashed}/demo-arm64/{v2}/boot/vmlinuz" in g2.text()


def test_uboot_nfs_root(boot_lab, lab_nfs, lab_out, arm64_image) -> None:
    """U-Boot's extlinux append carries ``root=/dev/nfs nfsroot=`` of the planned version's
    rootfs, which netbootd exported through ganesha; the arm64 rootfs reports
    ``provisioned``.

    The test's name is short on purpose: the rootfs path (under test-output/<test name>/)
    is in the append, and Debian's U-Boot refuses an append of 512 bytes or more ("bootarg
    overflow"; tftp/uboot.py). Here it is ~440 bytes plus the checkout's path."""
    require(NFS_TOOLS)
    exports = lab_out / "nfs" / "netbootd-exports.conf"
    nfs = lab_nfs(include=exports)
    mac = random_mac()
    bl = boot_lab(nodes={mac: _nfs_node("arm-nfs", nfs)}, settings=_nfs_settings(exports, nfs))
    version = bl.publish(arm64_image("arm64-e2e-1"))
    rootfs = bl.nbd.images / "store" / "demo-arm64" / version / "rootfs"
    assert (rootfs / "bin" / "busybox").is_file()
    g = bl.arm64_guest("uboot", mac=mac, timeout=BOOT_TIMEOUT + ROOT_TIMEOUT + 30)
    with g:
        node = _reaches_provisioned(bl, g, mac, version)
    assert node["image"] == "demo-arm64"
    assert str(rootfs) in exports.read_text()
    assert f"nfsroot={bl.lab.ip('srv')}:{rootfs}" in g.text()  # U-Boot prints the append
    assert any(e["kind"] == "dhcp" and e["fields"].get("client") == "uboot"
               for e in node["timeline"])


def test_uboot_guest_on_an_x86_only_image_gets_nothing(boot_lab, boot_image) -> None:
    """The planner never hands an arm64 U-Boot client an x86 kernel: its boot script is
    "File not found", so U-Boot falls through to its next boot method."""
    require(ARM64_GUEST_TOOLS)
    mac = random_mac()
    bl = boot_lab(nodes={mac: {**_node("arm-x86"), "image": "demo"}})
    bl.publish(boot_image)
    g = bl.arm64_guest("uboot", mac=mac, timeout=150)
    with g:
        assert g.wait_for(r"TFTP error: 'File not found'", 120), g.console
    assert "NETBOOTD-TEST" not in g.text() and "vmlinuz" not in g.text()
    node = bl.nbd.node(mac)
    assert node is not None and node["phase"] not in ("booted", "kernel")
    reasons = [e["fields"].get("reason") or "" for e in node["timeline"] if e["kind"] == "dhcp"]
    assert any("does not boot arm64" in r for r in reasons), reasons


@pytest.fixture(scope="session")
def grub_image(tmp_path_factory: pytest.TempPathFactory):
    """netbootd's GRUB network image for arm64 UEFI, built once per session."""
    import subprocess
    import sys

    from netbootd.lab.tools import GRUB_BUILDER, REPO

    out = tmp_path_factory.mktemp("grub") / "grubnetaa64.efi"
    subprocess.run([sys.executable, str(GRUB_BUILDER), "--out", str(out),
                    "--cache", str(REPO / "images" / "cache")], check=True)
    return out


def test_aavmf_guest_netboots_through_grub(boot_lab, lab_nfs, lab_out, arm64_image,
                                          grub_image) -> None:
    """arm64 UEFI (AAVMF's own PXE), no arm64 iPXE: proxy-DHCP names netbootd's GRUB, GRUB
    loads grub/grub.cfg-<mac> and the planned version's kernel + initrd over TFTP; the
    guest mounts that version's rootfs over NFS and reports ``provisioned``, as U-Boot's."""
    require(ARM64_UEFI_TOOLS + NFS_TOOLS)
    exports = lab_out / "nfs" / "netbootd-exports.conf"
    nfs = lab_nfs(include=exports)
    mac = random_mac()
    bl = boot_lab(nodes={mac: _nfs_node("arm-uefi", nfs)},
                  settings={"tftp": {"extra_ipxe_dirs": [str(grub_image.parent)]},
                            **_nfs_settings(exports, nfs)})
    v1 = bl.publish(arm64_image("arm64-e2e-1"))
    g = bl.arm64_guest("uefi", mac=mac, timeout=BOOT_TIMEOUT + ROOT_TIMEOUT + 30)
    with g:
        node = _reaches_provisioned(bl, g, mac, v1)
    tl = node["timeline"]
    dhcp = [e for e in tl if e["kind"] == "dhcp" and e["fields"].get("outcome") == "ok"]
    assert any(e["fields"].get("file") == "grubnetaa64.efi" and e["fields"].get("arch") == 11
               for e in dhcp), [e["fields"] for e in dhcp]
    files = _files(tl)
    grub = files.index("grubnetaa64.efi")
    cfg = next(i for i, f in enumerate(files) if f.startswith("grub/grub.cfg-"))
    kernel = files.index(f"netbootd/{mac.replace(':', '-')}/demo-arm64/{v1}/boot/vmlinuz")
    assert grub < cfg < kernel, files
