"""QEMU BIOS and UEFI guests netboot from netbootd through a
real site DHCP server and real iPXE; an ignored MAC gets nothing; the API shows the timeline.
"""

from __future__ import annotations

import pytest

from netbootd.lab.guests import ovmf_path, random_mac

pytestmark = pytest.mark.slow

BOOTED = r"NETBOOTD-TEST: (reported booted|report booted .* failed)"


def _node(hostname: str, **extra: object) -> dict:
    # No NFS root for these guests: the initrd reports "booted" and idles.
    return {"hostname": hostname, "image": "demo", "channel": "prod",
            "vars": {"nfs_root": False}, **extra}


def _first(timeline: list[dict], kind: str, pred=lambda e: True) -> int:
    return next(i for i, e in enumerate(timeline) if e["kind"] == kind and pred(e))


def _boot_and_check(bl, firmware: str, mac: str, version: str, hostname: str,
                    **guest_kw: object) -> dict:
    g = bl.guest(firmware, mac=mac, timeout=90, **guest_kw)
    with g:
        m = g.wait_for(BOOTED, 80)
        assert m and m.group(1) == "reported booted", f"console: {g.console}"
        node = bl.nbd.wait_node(mac, "booted", 10)
    assert node is not None, f"API never showed {mac} booted; log {bl.nbd.log}"
    assert node["version"] == version and node["image"] == "demo"
    assert node["hostname"] == hostname
    assert f"booted version={version}" in g.text()
    return node


def test_bios_guest_netboots_and_timeline_is_in_the_api(boot_lab, boot_image) -> None:
    mac = random_mac()
    bl = boot_lab(nodes={mac: _node("bios-1")})
    version = bl.publish(boot_image)
    node = _boot_and_check(bl, "bios", mac, version, "bios-1")
    # Scenario 7: DHCP -> iPXE script -> kernel file -> kernel -> booted, in that order.
    # (QEMU's NIC ROM already is iPXE: it gets the HTTP URL straight from the proxy offer,
    # no TFTP stage; the UEFI test below covers TFTP.)
    tl = node["timeline"]
    kinds = [(e["kind"], e["fields"].get("file")) for e in tl]
    dhcp = _first(tl, "dhcp", lambda e: e["fields"].get("outcome", "ok") == "ok")
    script = _first(tl, "http", lambda e: e["fields"].get("file", "").startswith("/ipxe"))
    kernel_file = _first(tl, "http", lambda e: "vmlinuz" in e["fields"].get("file", ""))
    kernel = _first(tl, "kernel")
    booted = _first(tl, "booted")
    assert dhcp < script < kernel_file < kernel < booted, kinds
    assert tl[dhcp]["fields"]["file"].endswith("/boot.ipxe")
    assert all(e["fields"].get("version") in (None, version) for e in tl), kinds
    assert bl.dhcp.acked(mac), "the address came from the site DHCP server"


@pytest.mark.parametrize("ipxe_rom", [False, True], ids=["ovmf-pxe", "ipxe-rom"])
def test_uefi_guest_netboots(boot_lab, boot_image, ipxe_rom: bool) -> None:
    if ovmf_path() is None:
        pytest.fail("OVMF missing: apt-get install ovmf", pytrace=False)
    mac = random_mac()
    bl = boot_lab(nodes={mac: _node("uefi-1")})
    version = bl.publish(boot_image)
    node = _boot_and_check(bl, "uefi", mac, version, "uefi-1", ipxe_rom=ipxe_rom)
    tl = node["timeline"]
    kinds = [(e["kind"], e["fields"].get("file")) for e in tl]
    script = _first(tl, "http", lambda e: e["fields"].get("file", "").startswith("/ipxe"))
    assert script < _first(tl, "kernel") < _first(tl, "booted"), kinds
    efi = [i for i, e in enumerate(tl)
           if e["kind"] == "tftp" and "ipxe.efi" in str(e["fields"].get("file", ""))]
    if ipxe_rom:
        # The NIC ROM's EFI iPXE takes the HTTP URL straight from the proxy offer.
        assert not efi, kinds
    else:
        # OVMF's own PXE client: TFTP ipxe.efi first, then iPXE over HTTP.
        assert efi and efi[0] < script, kinds


def test_ignored_mac_gets_nothing_from_netbootd(boot_lab, boot_image) -> None:
    """Scenario 5: the inventory marks the MAC `ignore`; the pcap shows netbootd silent
    while the guest kept asking (and got its address from the site server)."""
    mac = random_mac()
    bl = boot_lab(nodes={mac: _node("ignored-1", action="ignore")})
    bl.publish(boot_image)
    g = bl.guest("bios", mac=mac, timeout=40)
    with g:
        assert bl.dhcp.wait_lease(mac, 30), "the guest never got a site lease"
        # iPXE keeps retrying with PXE requests for a while; give netbootd time to answer.
        g.wait_for(r"NETBOOTD-TEST", 12)
    bl.cap.stop()
    srv = bl.lab.ip("srv")
    asked = bl.cap.read(f"ether src {mac} and udp dst port 67")
    assert asked, "no DHCP from the guest in the pcap"
    answered = bl.cap.read(f"src host {srv} and (udp src port 67 or udp src port 4011 "
                           f"or udp src port 69 or tcp src port 8080)")
    assert answered == [], answered
    assert "NETBOOTD-TEST" not in g.text()
    node = bl.nbd.node(mac)
    assert node is None or node["phase"] not in ("booted", "kernel", "tftp", "http")
