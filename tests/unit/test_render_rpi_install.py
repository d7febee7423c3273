"""The shipped Pi cmdline.txt for an install plan: the installer's arguments, the NVMe by
default, no NFS root; an installer without a Pi boot tree is never offered to a Pi."""

from pathlib import Path

import pytest

from netbootd.inventory import load_inventory
from netbootd.model import Action, ClientFacts, ClientKind, DiskImage, ImageRef
from netbootd.planner import decide
from netbootd.render import Renderer, ServerInfo
from netbootd.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
PI = ClientFacts(mac="d8:3a:dd:00:00:01", kind=ClientKind.RPI, serial="0000abcd")
PI_OTHER_DISK = ClientFacts(mac="d8:3a:dd:00:00:02", kind=ClientKind.RPI, serial="0000abce")
SERVER = ServerInfo("10.231.0.2", 8080)


class Store:
    """An installer (with or without a Pi boot tree) and a zstd disk image ``gold``."""

    def __init__(self, *, pi_tree: bool) -> None:
        self.pi_tree = pi_tree

    def resolve(self, image, channel, pin, *, mac=None):
        if image == "installer":
            boot = {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                    "cmdline": "console=ttyS0"}
            boards = ("x86_64",)
            if self.pi_tree:
                boot = {"boot_tree": "boot", "kernel": "boot/kernel_2712.img",
                        "initrd": "boot/initramfs_2712", "cmdline": "loglevel=4"}
                boards = ("rpi5",)
            return ImageRef(name=image, version="i7", root=Path("/s/installer/i7"),
                            kind="installer", channel=channel, boot=boot, boards=boards)
        return ImageRef(name=image, version="3", root=Path("/s/gold/3"), kind="disk",
                        channel=channel, boards=("rpi5",),
                        disk=DiskImage(path="gold.img.zst", compression="zst", size=1000,
                                       sha256="a" * 64, uncompressed_size=4096,
                                       uncompressed_sha256="b" * 64))


@pytest.fixture
def fleet(tmp_path: Path):
    (tmp_path / "nodes.yaml").write_text(f"""
nodes:
  {PI.mac}: {{hostname: pi-a, serial: "{PI.serial}", action: install, install: {{image: gold}}}}
  {PI_OTHER_DISK.mac}:
    hostname: pi-b
    serial: "{PI_OTHER_DISK.serial}"
    action: install
    install: {{image: gold}}
    vars: {{install_disk: /dev/sda, cmdline: quiet}}
""")
    settings = load_settings(None, {"paths": {"inventory": str(tmp_path / "nodes.yaml"),
                                              "templates": str(REPO / "config" / "templates")}},
                             use_default_path=False)
    return settings, load_inventory(settings.paths.inventory), Renderer(settings)


def args(text: str) -> dict[str, str]:
    return dict(a.split("=", 1) for a in text.split() if "=" in a)


def test_install_cmdline_names_the_disk_image_and_the_nvme(fleet):
    settings, inv, r = fleet
    plan = decide(PI, inv, settings, Store(pi_tree=True))
    assert plan.action is Action.INSTALL and plan.image.name == "installer"
    text = r.render("cmdline.txt", plan, SERVER)
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "nfsroot" not in text and "root=" not in text and "ds=nocloud" not in text
    assert text.startswith("console=serial0,115200 console=tty1 loglevel=4 ")
    a = args(text)
    assert a["netbootd.install"] == "http://10.231.0.2:8080/files/gold/3/gold.img.zst"
    assert (a["netbootd.compression"], a["netbootd.size"], a["netbootd.usize"]) == \
        ("zst", "1000", "4096")
    assert a["netbootd.sha256"] == "b" * 64  # of the uncompressed image
    assert a["netbootd.disk"] == "/dev/nvme0n1"
    assert a["netbootd.mac"] == PI.mac and a["netbootd.token"] == plan.token
    assert a["netbootd.events"] == "http://10.231.0.2:8080/api/v1/events"
    assert a["netbootd.version"] == "3"


def test_install_disk_and_extra_arguments_come_from_vars(fleet):
    settings, inv, r = fleet
    plan = decide(PI_OTHER_DISK, inv, settings, Store(pi_tree=True))
    text = r.render("cmdline.txt", plan, SERVER)
    assert args(text)["netbootd.disk"] == "/dev/sda"
    assert text.rstrip().endswith(" quiet")


def test_an_installer_without_a_pi_boot_tree_is_not_offered_to_a_pi(fleet):
    settings, inv, _ = fleet
    plan = decide(PI, inv, settings, Store(pi_tree=False))
    assert plan.action is Action.IGNORE and not plan.answers
    assert "no Raspberry Pi boot tree" in plan.reason


def test_shipped_templates_check_clean_with_pi_installs(fleet):
    _settings, inv, r = fleet
    assert r.check(inv, Store(pi_tree=True)) == []
