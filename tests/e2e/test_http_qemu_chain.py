"""A real iPXE (QEMU's virtio-net ROM, BIOS) boots through the HTTP chain alone:
/boot.ipxe -> /ipxe?mac=... -> kernel + initrd from /files -> beacon -> the initrd's
``booted`` callback, which ends the boot session.

QEMU user-mode networking (slirp) hands the guest the boot file URL in its own DHCP
answer, so no proxy-DHCP, TFTP, namespace or root is needed: the guest's traffic to
10.0.2.2 arrives at the test's server on 127.0.0.1. (The full lab with proxy-DHCP and
TFTP is the lab suite's job.) The kernel is Debian's cloud kernel, built into a test
image by images/build_image.py (downloaded once into images/cache/).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netbootd.http.testkit import NODE_A, ServerThread, free_port, give_address, make_app

REPO = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")
ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")

pytestmark = pytest.mark.slow


def build_image(out: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "images/build_image.py"), "--name", "demo", "--version",
         "e2e", "--out", str(out), "--no-rootfs", "--cache", str(REPO / "images/cache")],
        capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        pytest.fail(f"cannot build the test image: {res.stderr[-500:]}", pytrace=False)


def test_ipxe_guest_boots_through_the_http_chain(tmp_path: Path):
    if QEMU is None or not ROM.exists():
        pytest.fail("qemu-system-x86 / ipxe-qemu not installed: ./setup.sh test installs them",
                    pytrace=False)
    port = free_port()
    app = make_app(tmp_path / "d", real_store=True,
                   http={"port": port, "public_url": f"http://10.0.2.2:{port}"})
    incoming = app.settings.paths.images / "incoming"
    build_image(incoming / "demo-e2e")
    result = app.store.ingest_entry("demo-e2e")
    assert result is not None and result.accepted, result
    app.store.activate("demo", "e2e", "prod", by="test")
    # QEMU's user-mode network reaches the server from 127.0.0.1: that is the node's address
    give_address(app, NODE_A, "127.0.0.1")

    console = tmp_path / "console.log"
    with ServerThread(app):
        qemu = subprocess.Popen(
            # -nodefaults + bootindex: with a default VGA and "-boot n" SeaBIOS never got
            # to the NIC here (docs/lab.md uses the same flags).
            ["timeout", "-s", "KILL", "150", QEMU, "-accel", "tcg", "-m", "512", "-smp", "1",
             "-display", "none", "-monitor", "none", "-nodefaults", "-no-reboot",
             "-serial", f"file:{console}",
             "-netdev", f"user,id=n0,bootfile=http://10.0.2.2:{port}/boot.ipxe",
             "-device", f"virtio-net-pci,netdev=n0,mac={NODE_A},bootindex=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # own process group: killing it ends `timeout` AND its QEMU child (killing only
            # `timeout` left QEMU running after the test)
            start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and qemu.poll() is None:
                state = app.events.nodes.get(NODE_A)
                if state is not None and state.phase == "booted":
                    break
                time.sleep(0.5)
        finally:
            try:
                os.killpg(qemu.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            qemu.wait()
        log = console.read_text(errors="replace") if console.exists() else ""
        timeline = app.events.timeline(NODE_A)

    state = app.events.nodes.get(NODE_A)
    assert state is not None and state.phase == "booted", (
        [(e.kind, e.message) for e in timeline], log[-3000:])
    files = [e.fields.get("file") for e in timeline if e.kind == "http"]
    assert "/ipxe" in files
    kinds = [e.kind for e in timeline]
    assert kinds.index("kernel") < kinds.index("booted")
    assert state.version == "e2e"
    # the booted callback ended the firmware session; the OS keeps the plan it booted
    assert app.planner.current(NODE_A).image.version == "e2e"
    # the kernel and initrd were fetched from /files
    served = {e.fields.get("file") for e in app.events.recent(500) if e.kind == "http"}
    assert "/files/demo/e2e/boot/vmlinuz" in served
    assert "/files/demo/e2e/boot/initrd.img" in served
    assert "NETBOOTD-TEST: reported booted" in log
