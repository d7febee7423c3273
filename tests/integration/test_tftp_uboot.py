"""U-Boot's per-node config over a real TFTP exchange (curl's TFTP client against the
engine on 127.0.0.1): a config whose ``append`` U-Boot would refuse ("bootarg overflow",
512 bytes in Debian's qemu_arm64 build) is still served, and the transfer's event in the
node's timeline says why the board may not boot."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from netbootd.model import ImageRef
from netbootd.render import Renderer
from netbootd.tftp.testkit import eventually, listing, make_app, running

REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:ab:cd:01"
DASHED = MAC.replace(":", "-")


class _Arm64:
    """One arm64 kernel+initrd version whose manifest cmdline the test sets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cmdline = "console=ttyAMA0"

    def resolve(self, image, channel, pin, *, mac=None):
        return ImageRef(name="demo-arm64", version="1", root=self.root, boards=("arm64",),
                        channel="prod", artefacts=listing(self.root),
                        boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                              "cmdline": self.cmdline})


@pytest.fixture
async def uboot_server(tmp_path: Path):
    root = tmp_path / "store"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz").write_bytes(b"Image" * 100)
    (root / "boot" / "initrd.img").write_bytes(b"initrd")
    images = _Arm64(root)
    app = make_app(tmp_path / "work", root, images=images)
    shutil.copytree(REPO / "config" / "templates" / "uboot",
                    app.settings.paths.templates / "uboot")
    app.render = Renderer(app.settings)
    async with running(app) as svc:
        yield app, svc, images


async def _curl(port: int, name: str) -> bytes:
    """``curl tftp://``: a TFTP client that is not ours."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "60", f"tftp://127.0.0.1:{port}/{name}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out


async def test_a_too_long_append_is_served_and_its_event_says_so(uboot_server):
    app, svc, images = uboot_server
    port = app.settings.tftp.port
    images.cmdline = "console=ttyAMA0 " + "x" * 600
    text = await _curl(port, f"pxelinux.cfg/01-{DASHED}")
    assert b"x" * 600 in text and b"kernel netbootd/" in text
    await eventually(lambda: svc.active == 0 and any(
        e.kind == "tftp" for e in app.events.timeline(MAC)), timeout=30)
    [ev] = [e for e in app.events.timeline(MAC) if e.kind == "tftp"]
    assert ev.fields["outcome"] == "ok"
    assert "bootarg overflow" in ev.message and "512" in ev.message, ev.message

    # A config that fits: the transfer's event carries no message.
    images.cmdline = "console=ttyAMA0"
    app.planner.end(MAC)
    await _curl(port, f"pxelinux.cfg/01-{DASHED}")
    await eventually(lambda: len([e for e in app.events.timeline(MAC)
                                  if e.kind == "tftp"]) == 2, timeout=30)
    last = [e for e in app.events.timeline(MAC) if e.kind == "tftp"][-1]
    assert last.fields["outcome"] == "ok" and last.message == ""
