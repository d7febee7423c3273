"""Hot swap under a boot in flight, then rollback.

Guest A starts on v1; v2 is dropped into incoming/ as soon as A's boot is planned (A is
still in its firmware/iPXE, before its kernel is loaded). A must finish on v1 (a boot that
started on version N finishes on N); guest B, started after v2 became active, gets v2.
After a rollback through the API, guest C gets v1 again.
"""

from __future__ import annotations

import shutil
import time

import pytest

from netbootd.lab.guests import random_mac

pytestmark = pytest.mark.slow

BOOTED = r"NETBOOTD-TEST: (reported booted|report booted .* failed)"


def _node(hostname: str) -> dict:
    return {"hostname": hostname, "image": "demo", "channel": "prod",
            "vars": {"nfs_root": False}}


def _wait_planned(nbd, mac: str, timeout: float) -> dict | None:
    """The first proxy-DHCP answer to ``mac``: its boot is planned from then on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node = nbd.node(mac) or {}
        for e in node.get("timeline", []):
            if e["kind"] == "dhcp" and e["fields"].get("outcome", "ok") == "ok":
                return e
        time.sleep(0.1)
    return None


def _finish(bl, guest, version: str) -> None:
    m = guest.wait_for(BOOTED, 80)
    assert m and m.group(1) == "reported booted", f"console: {guest.console}"
    assert f"booted version={version} " in guest.text(), guest.markers()
    node = bl.nbd.wait_node(guest.mac, "booted", 10, version=version)
    assert node is not None, f"{guest.mac}: API does not show booted on {version}"
    files = [e["fields"].get("file", "") for e in node["timeline"] if e["kind"] == "http"]
    assert any(f"/files/demo/{version}/boot/vmlinuz" in f for f in files), files


def test_hot_swap_keeps_boot_in_flight_then_rollback(boot_lab, make_image) -> None:
    v1_build, v2_build = make_image("e2e-1"), make_image("e2e-2", marker="second build")
    a, b, c = random_mac(), random_mac(), random_mac()
    # settle 0: a renamed-in build is ingested at once, so v2 goes live while A is still
    # in iPXE (measured: ~2 s from A's proxy offer to its kernel request).
    bl = boot_lab(nodes={a: _node("swap-a"), b: _node("swap-b"), c: _node("swap-c")},
                  settings={"store": {"settle_seconds": 0.0}})
    v1 = bl.publish(v1_build)
    # Copy v2 next to incoming/ under a dot-name now; dropping it later is one rename.
    staged = bl.nbd.incoming / f".{v2_build.name}.staged"
    shutil.copytree(v2_build, staged)

    guest_a = bl.guest("bios", mac=a, name="guest-a", timeout=100).start()
    guest_b = guest_c = None
    try:
        planned = _wait_planned(bl.nbd, a, 40)
        assert planned is not None, f"A never got a proxy offer; see {bl.nbd.log}"
        assert planned["fields"].get("version") in (None, v1)
        assert "NETBOOTD-TEST" not in guest_a.text(), "A's kernel already ran: too late"
        staged.rename(bl.nbd.incoming / v2_build.name)  # A is in iPXE; its plan names v1
        v2 = "e2e-2"
        assert bl.nbd.wait_active("demo", v2, timeout=20, poll=0.05)
        activated = time.time()
        guest_b = bl.guest("bios", mac=b, name="guest-b", timeout=100).start()
        _finish(bl, guest_a, v1)
        _finish(bl, guest_b, v2)
        # The swap happened mid-boot: A's boot ended (and usually its kernel was fetched)
        # after v2 went live, yet everything A got was v1.
        tl_a = bl.nbd.node(a)["timeline"]
        booted_a = [e["ts"] for e in tl_a if e["kind"] == "booted"]
        assert booted_a and booted_a[0] > activated, (booted_a, activated)
        kernel_a = [e["ts"] for e in tl_a
                    if e["kind"] == "http" and "vmlinuz" in e["fields"].get("file", "")]
        print(f"A's kernel fetched {kernel_a[0] - activated:+.2f}s after v2 went live")
        assert "second build" in guest_b.text() and "second build" not in guest_a.text()

        status, body = bl.nbd.request("POST", "/api/v1/images/demo/rollback",
                                      {"channel": "prod"}, auth=True)
        assert status == 200, body
        assert bl.nbd.wait_active("demo", v1, timeout=10)
        guest_c = bl.guest("bios", mac=c, name="guest-c", timeout=100).start()
        _finish(bl, guest_c, v1)
    finally:
        for g in (guest_a, guest_b, guest_c):
            if g is not None:
                g.stop()
