"""arm64 boards: QEMU's aarch64 ``virt`` machine under TCG with Debian's U-Boot
(u-boot-qemu, qemu_arm64) netboots the arm64 test image through netbootd.

The path, as the events and the serial console show it: U-Boot's DHCP (vendor class
``U-Boot.armv8``, arch 22) -> the site server's lease with next-server = netbootd (stock
U-Boot ignores proxy offers) -> TFTP ``boot.scr.uimg`` (rendered per node) -> ``pxe get``:
TFTP ``pxelinux.cfg/01-<mac>`` -> ``pxe boot``: TFTP kernel + initrd of the planned version
-> the arm64 initrd reports ``booted`` with the boot's token.
"""

from __future__ import annotations

import pytest

from netbootd.lab.guests import random_mac
from netbootd.lab.tools import ARM64_GUEST_TOOLS, ARM64_UEFI_TOOLS, require

pytestmark = pytest.mark.slow

BOOTED = r"NETBOOTD-TEST: (reported booted|report booted .* failed)"
#: TCG aarch64 on a shared 2-core VM: U-Boot's distro boot, ~28 MB over U-Boot's TFTP
#: (one block per round trip) and the kernel's boot. Measured ~60-90 s; bounded generously.
BOOT_TIMEOUT = 300


def _node(hostname: str) -> dict:
    return {"hostname": hostname, "image": "demo-arm64", "channel": "prod",
            "vars": {"nfs_root": False}}


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


def test_aavmf_guest_netboots_through_grub(boot_lab, arm64_image, grub_image) -> None:
    """arm64 UEFI (AAVMF's own PXE), no arm64 iPXE: proxy-DHCP names netbootd's GRUB, GRUB
    loads grub/grub.cfg-<mac> and the planned version's kernel + initrd over TFTP."""
    require(ARM64_UEFI_TOOLS)
    mac = random_mac()
    bl = boot_lab(nodes={mac: _node("arm-uefi")},
                  settings={"tftp": {"extra_ipxe_dirs": [str(grub_image.parent)]}})
    v1 = bl.publish(arm64_image("arm64-e2e-1"))
    g = bl.arm64_guest("uefi", mac=mac, timeout=BOOT_TIMEOUT + 30)
    with g:
        m = g.wait_for(BOOTED, BOOT_TIMEOUT)
        assert m and m.group(1) == "reported booted", f"console: {g.console}"
        node = bl.nbd.wait_node(mac, "booted", 20)
    assert node is not None and node["version"] == v1, f"log {bl.nbd.log}"
    tl = node["timeline"]
    dhcp = [e for e in tl if e["kind"] == "dhcp" and e["fields"].get("outcome") == "ok"]
    assert any(e["fields"].get("file") == "grubnetaa64.efi" and e["fields"].get("arch") == 11
               for e in dhcp), [e["fields"] for e in dhcp]
    files = _files(tl)
    grub = files.index("grubnetaa64.efi")
    cfg = next(i for i, f in enumerate(files) if f.startswith("grub/grub.cfg-"))
    kernel = files.index(f"netbootd/{mac.replace(':', '-')}/demo-arm64/{v1}/boot/vmlinuz")
    assert grub < cfg < kernel, files
