"""U-Boot clients: what U-Boot 2023.01 sends (net/bootp.c ``dhcp_extended``, cmd/Kconfig
``BOOTP_VCI_STRING`` / ``BOOTP_PXE_CLIENTARCH``), what it gets, and the TFTP names its
``source`` / ``pxe get`` / ``pxe boot`` ask for, resolved through the plan."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.dhcp.classify import Classifier
from netbootd.dhcp.reply import Answer, answer_for
from netbootd.inventory import Inventory
from netbootd.model import Action, ClientFacts, ClientKind, ImageRef
from netbootd.neighbours import ClientAddresses
from netbootd.planner import incompatibility
from netbootd.render import Renderer
from netbootd.settings import load_settings
from netbootd.tftp import codec, uboot
from netbootd.tftp.testkit import listing, make_app, virtual_tree
from netbootd.tftp.vfs import Refused
from netbootd.views import InventoryNodes

REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:ab:cd:ef"
DASHED = MAC.replace(":", "-")
#: Parameter request list of U-Boot's defaults: subnet, router, DNS, hostname, root path.
UBOOT_PARAMS = bytes([1, 3, 6, 12, 17])


def uboot_discover(mac: str, *, vci: bytes = b"U-Boot.armv8", arch: int = 0x16) -> bytes:
    """DISCOVER in U-Boot's option order: 53, 57 (576), 93, 94 (UNDI 0.0), 60, 55."""
    return c.request(mac, 7, [(53, b"\x01"), (57, b"\x02\x40"), (93, arch.to_bytes(2, "big")),
                              (94, b"\x01\x00\x00"), (60, vci), (55, UBOOT_PARAMS)])


def classify(raw: bytes):
    s = load_settings(None, use_default_path=False)
    inv = Inventory.empty()
    nodes = InventoryNodes(lambda: inv, ClientAddresses(use_kernel=False), lambda: s)
    return Classifier(s.rpi.ouis, nodes.says_pi).classify(pk.parse(raw))


def test_uboot_armv8_discover_is_a_uboot_client():
    info = classify(uboot_discover(MAC))
    assert info.boot_client and info.kind is ClientKind.UBOOT
    assert info.arch == 22 and info.vendor_class == "U-Boot.armv8"


def test_uboot_with_a_pxeclient_vendor_class_is_known_by_its_arch():
    info = classify(uboot_discover(MAC, vci=b"PXEClient:Arch:00022:UNDI:000000"))
    assert info.kind is ClientKind.UBOOT


def test_uboot_efi_attempt_is_an_arm64_uefi_client():
    # bootcmd_dhcp's second DHCP: bootp_vci PXEClient:Arch:00011:UNDI:003000, bootp_arch 0xb
    info = classify(uboot_discover(MAC, vci=b"PXEClient:Arch:00011:UNDI:003000", arch=0xB))
    assert info.kind is ClientKind.PXE_UEFI_ARM64


def test_uboot_gets_the_boot_script_name_and_pxeclient():
    s = load_settings(None, use_default_path=False)
    a = answer_for(classify(uboot_discover(MAC)), "10.231.0.2", s, available=frozenset())
    assert a == Answer(b"PXEClient", "boot.scr.uimg", None)


def _ref(boards: tuple[str, ...], root: Path = Path("/nonexistent")) -> ImageRef:
    return ImageRef(name="demo", version="1", root=root, boards=boards,
                    boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                          "cmdline": "console=ttyAMA0"})


def test_planner_never_gives_a_uboot_client_an_x86_kernel():
    uboot_client = ClientFacts(mac=MAC, kind=ClientKind.UBOOT, arch=22)
    assert "does not boot arm64" in incompatibility(uboot_client, _ref(("x86_64",)))
    assert incompatibility(uboot_client, _ref(("arm64",))) is None
    # Seen only over TFTP (no arch): still arm64.
    tftp_only = ClientFacts(mac=MAC, kind=ClientKind.UBOOT)
    assert incompatibility(tftp_only, _ref(("x86_64",))) is not None
    arm32 = ClientFacts(mac=MAC, kind=ClientKind.UBOOT, arch=21)
    assert "32-bit arm" in incompatibility(arm32, _ref(("arm64",)))


def test_script_image_is_a_legacy_script_image():
    blob = uboot.script_image("echo hi\n")
    hdr = struct.unpack(">7I4B32s", blob[:64])
    assert hdr[0] == 0x27051956
    assert hdr[1] == zlib.crc32(blob[:4] + b"\0" * 4 + blob[8:64])
    assert hdr[3] == len(blob) - 64 and hdr[6] == zlib.crc32(blob[64:])
    assert hdr[9] == uboot.IH_TYPE_SCRIPT
    assert blob[64:72] == struct.pack(">II", 8, 0) and blob[72:] == b"echo hi\n"
    assert uboot.script_image("echo hi\n") == blob  # reproducible


@pytest.mark.parametrize("name,mac", [(f"01-{DASHED}", MAC), ("01-52-54-00-AB-CD-EF", MAC),
                                      ("0AE70005", None), ("default", None),
                                      ("default-arm-armv8", None)])
def test_pxelinux_names(name: str, mac: str | None):
    assert uboot.is_pxelinux(["pxelinux.cfg", name])
    assert uboot.pxelinux_mac(name) == mac


class Arm64Images:
    """One arm64 kernel+initrd version at a time; ``version`` can be swapped (hot swap)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = "1"
        self.cmdline = "console=ttyAMA0"

    def resolve(self, image, channel, pin, *, mac=None):
        ref = _ref(("arm64",), self.root / self.version)
        return dataclasses.replace(ref, version=self.version,
                                   boot={**ref.boot, "cmdline": self.cmdline},
                                   artefacts=listing(self.root / self.version))


@pytest.fixture
def arm64(tmp_path: Path):
    root = tmp_path / "store"
    for v in ("1", "2"):
        (root / v / "boot").mkdir(parents=True)
        (root / v / "boot" / "vmlinuz").write_bytes(b"Image" + v.encode() * 1000)
        (root / v / "boot" / "initrd.img").write_bytes(b"initrd" + v.encode())
        (root / v / "DEMO").write_text("demo")
    images = Arm64Images(root)
    app = make_app(tmp_path / "work", root / "1", images=images)
    shutil.copytree(REPO / "config" / "templates" / "uboot",
                    app.settings.paths.templates / "uboot")
    app.render = Renderer(app.settings)
    app.clients.learn("10.231.0.5", MAC)
    return app, images


def test_pxelinux_config_names_the_planned_version_over_tftp(arm64):
    app, images = arm64
    tree = virtual_tree(app)
    src = tree.open(f"pxelinux.cfg/01-{DASHED}", "10.231.0.5", "10.231.0.2")
    text = bytes(src.data).decode()
    assert (src.mac, src.image, src.version) == (MAC, "demo", "1")
    assert f"kernel netbootd/{DASHED}/demo/1/boot/vmlinuz" in text
    assert f"initrd netbootd/{DASHED}/demo/1/boot/initrd.img" in text
    plan = app.planner.plan(ClientFacts(mac=MAC, kind=ClientKind.UBOOT))
    assert f"netbootd.token={plan.token}" in text and "netbootd.version=1" in text
    assert "console=ttyAMA0" in text and "http://10.231.0.2:" in text
    # Hot swap: the boot in flight keeps version 1 for the config and the files.
    images.version = "2"
    again = tree.open("pxelinux.cfg/0AE70005", "10.231.0.5", "10.231.0.2")
    assert bytes(again.data) == bytes(src.data)
    kernel = tree.open(f"netbootd/{DASHED}/demo/1/boot/vmlinuz", "10.231.0.5", "10.231.0.2")
    assert bytes(kernel.data) == b"Image" + b"1" * 1000 and kernel.mac == MAC
    with pytest.raises(Refused) as exc:  # not this boot's version
        tree.open(f"netbootd/{DASHED}/demo/2/boot/vmlinuz", "10.231.0.5", "10.231.0.2")
    assert exc.value.code == codec.ERR_NOT_FOUND
    with pytest.raises(Refused):  # a file of the version, but not a boot file
        tree.open(f"netbootd/{DASHED}/demo/1/DEMO", "10.231.0.5", "10.231.0.2")
    # The session ends (the OS reported booted): the next boot gets version 2.
    app.planner.end(MAC)
    text2 = bytes(tree.open(f"pxelinux.cfg/01-{DASHED}", "10.231.0.5", "10.231.0.2").data)
    assert b"/demo/2/boot/vmlinuz" in text2


def test_long_appends_are_the_ones_u_boot_refuses():
    """U-Boot's pxe refuses ``len(append) + 1 > CONFIG_SYS_CBSIZE`` (512 measured on
    Debian's qemu_arm64 build); the line is counted as U-Boot reads it, to its end."""
    fits = "x" * (uboot.UBOOT_BOOTARGS_SIZE - 1)
    config = f"label a\n  kernel k\n  append {fits}\nlabel b\n  APPEND {fits}y\n"
    assert uboot.long_appends(config) == [uboot.UBOOT_BOOTARGS_SIZE]
    assert uboot.long_appends(f"  append {fits} \n") == [uboot.UBOOT_BOOTARGS_SIZE]
    assert uboot.long_appends(config, size=2048) == []
    assert uboot.long_appends("label a\n  kernel k\n") == []


def test_a_too_long_append_is_served_with_a_warning(arm64, caplog):
    app, images = arm64
    images.cmdline = "console=ttyAMA0 " + "x" * 600
    tree = virtual_tree(app)
    with caplog.at_level("WARNING", logger="netbootd.tftp.vfs"):
        src = tree.open(f"pxelinux.cfg/01-{DASHED}", "10.231.0.5", "10.231.0.2")
    assert b"x" * 600 in bytes(src.data)
    assert "bootarg overflow" in src.note  # the transfer's event message
    assert any(MAC in r.getMessage() and "bootarg overflow" in r.getMessage()
               for r in caplog.records), caplog.text
    caplog.clear()
    images.cmdline = "console=ttyAMA0"
    app.planner.end(MAC)
    with caplog.at_level("WARNING", logger="netbootd.tftp.vfs"):
        src = tree.open(f"pxelinux.cfg/01-{DASHED}", "10.231.0.5", "10.231.0.2")
    assert "bootarg overflow" not in caplog.text and src.note == ""


def test_boot_script_is_rendered_and_wrapped(arm64):
    app, _ = arm64
    src = virtual_tree(app).open("boot.scr.uimg", "10.231.0.5", "10.231.0.2")
    blob = bytes(src.data)
    assert blob[:4] == struct.pack(">I", 0x27051956) and src.mac == MAC
    assert b"pxe get && pxe boot" in blob[72:]


def test_unknown_address_or_ignored_machine_gets_nothing(arm64, tmp_path: Path):
    app, _ = arm64
    tree = virtual_tree(app)
    for name in ("boot.scr.uimg", "pxelinux.cfg/0AE70009", "pxelinux.cfg/default"):
        with pytest.raises(Refused) as exc:
            tree.open(name, "10.231.0.9", "10.231.0.2")
        assert exc.value.code == codec.ERR_NOT_FOUND
    app.planner = type(app.planner)(lambda: app.settings, lambda: app.inventory,
                                    _X86Only())
    with pytest.raises(Refused):
        virtual_tree(app).open(f"pxelinux.cfg/01-{DASHED}", "10.231.0.5", "10.231.0.2")
    plan = app.planner.plan(ClientFacts(mac=MAC, kind=ClientKind.UBOOT))
    assert plan.action is Action.IGNORE


class _X86Only:
    def resolve(self, image, channel, pin, *, mac=None):
        return _ref(("x86_64",))


# -- arm64 UEFI through GRUB ------------------------------------------------------------------

def test_grub_server_slot_is_the_one_the_builder_embeds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_grub", REPO / "images/build_grub.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.SERVER_SLOT.encode() == uboot.GRUB_SERVER_SLOT
    assert mod.SERVER_SLOT in mod.EMBEDDED


def test_fill_server_slot_keeps_length_and_offsets():
    blob = b"head" + uboot.GRUB_SERVER_SLOT + b"tail"
    out = uboot.fill_server_slot(blob, "10.231.0.2")
    assert len(out) == len(blob) and out.startswith(b"head10.231.0.2 ") and out.endswith(b"tail")
    assert uboot.fill_server_slot(b"no slot", "10.0.0.1") == b"no slot"


@pytest.mark.parametrize("name,mac", [(f"grub.cfg-{MAC}", MAC), (f"grub.cfg-01-{DASHED}", MAC),
                                      ("grub.cfg", None), ("grub.cfg-0AE70005", None)])
def test_grub_cfg_names(name: str, mac: str | None):
    assert uboot.is_grub_cfg(["grub", name])
    assert uboot.grub_cfg_mac(name) == mac


def test_arm64_uefi_gets_grub_when_no_arm64_ipxe_is_there():
    s = load_settings(None, use_default_path=False)
    info = classify(uboot_discover(MAC, vci=b"PXEClient:Arch:00011:UNDI:003000", arch=0xB))
    assert answer_for(info, "10.231.0.2", s, available=frozenset({"grubnetaa64.efi"})
                      ).bootfile == "grubnetaa64.efi"
    assert answer_for(info, "10.231.0.2", s, available=frozenset({"snp.efi", "grubnetaa64.efi"})
                      ).bootfile == "snp.efi"


def test_grub_image_and_grub_cfg_over_tftp(arm64, tmp_path: Path):
    app, _ = arm64
    grubdir = tmp_path / "grub"
    grubdir.mkdir()
    (grubdir / "grubnetaa64.efi").write_bytes(b"PE" + uboot.GRUB_SERVER_SLOT + b"x" * 300_000)
    app.settings = app.settings.model_copy(update={"tftp": app.settings.tftp.model_copy(
        update={"extra_ipxe_dirs": [grubdir]})})
    shutil.copytree(REPO / "config" / "templates" / "grub",
                    app.settings.paths.templates / "grub")
    app.render = Renderer(app.settings)
    tree = virtual_tree(app)
    image = tree.open("grubnetaa64.efi", "10.231.0.5", "10.231.0.2")
    assert bytes(image.data)[2:13] == b"10.231.0.2 " and image.size == 2 + 48 + 300_000
    cfg = bytes(tree.open(f"/grub/grub.cfg-{MAC}", "10.231.0.5", "10.231.0.2").data).decode()
    assert f"linux (tftp,10.231.0.2)/netbootd/{DASHED}/demo/1/boot/vmlinuz" in cfg
    assert "'ds=nocloud;s=" in cfg  # ";" would end the GRUB command
    assert f"initrd (tftp,10.231.0.2)/netbootd/{DASHED}/demo/1/boot/initrd.img" in cfg
