"""Client kind detection on the packets firmware really sends (rpi-netboot.md, lab.md).

The trap this guards: a Pi says "x86 BIOS" (option 93 = 0) with the very vendor class
BIOS iPXE uses, so it must be recognised as a Pi before arch is looked at.
"""

from pathlib import Path

import pytest

from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.dhcp.classify import Classifier, pi_machine_id, user_class_text
from netbootd.inventory import Inventory, load_inventory
from netbootd.model import ClientKind
from netbootd.neighbours import ClientAddresses
from netbootd.settings import load_settings
from netbootd.views import InventoryNodes

PI_MAC = "d8:3a:dd:12:34:56"
ODD_MAC = "02:11:22:33:44:55"  # locally administered: no Pi OUI


def classifier(inventory: Inventory | None = None) -> Classifier:
    s = load_settings(None, use_default_path=False)
    inv = inventory or Inventory.empty()
    nodes = InventoryNodes(lambda: inv, ClientAddresses(use_kernel=False), lambda: s)
    return Classifier(s.rpi.ouis, nodes.says_pi)


def classify(raw: bytes, inventory: Inventory | None = None):
    return classifier(inventory).classify(pk.parse(raw))


@pytest.mark.parametrize("tag", [b"RPi5", b"5iPR", b"RPi4", b"4iPR"])
def test_pi_tag_in_either_byte_order(tag):
    info = classify(c.pi_discover(ODD_MAC, 1, 0x1A2B3C4D, tag=tag))
    assert info.kind is ClientKind.RPI
    assert info.serial == "1a2b3c4d"
    assert info.arch == 0  # says BIOS, is a Pi
    assert info.boot_client


def test_cm5_tag_bytes_from_the_field():
    mid = c.pi_machine_id(ODD_MAC, 0xCAFEF00D, tag=bytes.fromhex("35695052"))  # "5iPR"
    assert mid[:5] == bytes.fromhex("0035695052")
    info = classify(c.pi_discover(ODD_MAC, 1, machine_id=mid))
    assert info.kind is ClientKind.RPI and info.serial == "cafef00d"


@pytest.mark.parametrize("with_type", [True, False])
def test_option97_serial_repeated_form_with_pi_oui(with_type):
    mid = c.pi_serial_only_id(0x0BADCAFE, with_type=with_type)
    info = classify(c.pi_discover(PI_MAC, 1, machine_id=mid))
    assert info.kind is ClientKind.RPI
    assert info.serial == "0badcafe"
    assert pi_machine_id(mid) == (False, "0badcafe")


def test_pi_oui_alone_is_enough():
    mid = c.pi_machine_id(PI_MAC, 5, tag=b"XXXX")  # unknown tag: OUI decides
    assert classify(c.pi_discover(PI_MAC, 1, machine_id=mid)).kind is ClientKind.RPI


def test_pi_known_only_through_inventory(tmp_path: Path):
    (tmp_path / "nodes.yaml").write_text(f"nodes:\n  {ODD_MAC}: {{serial: 0badcafe}}\n"
                                         "  02:11:22:33:44:66: {labels: {kind: rpi5}}\n")
    inv = load_inventory(tmp_path / "nodes.yaml")
    mid = c.pi_serial_only_id(0x0BADCAFE)
    assert classify(c.pi_discover(ODD_MAC, 1, machine_id=mid), inv).kind is ClientKind.RPI
    other = c.pi_discover("02:11:22:33:44:66", 1, machine_id=c.pi_serial_only_id(1))
    assert classify(other, inv).kind is ClientKind.RPI
    # Same packet, MAC unknown to the inventory and not a Pi OUI: not a Pi.
    stranger = c.pi_discover("02:11:22:33:44:77", 1, machine_id=c.pi_serial_only_id(2))
    assert classify(stranger, inv).kind is ClientKind.PXE_BIOS


def test_bios_ipxe_is_not_a_pi_despite_the_same_vendor_class():
    info = classify(c.bios_ipxe_discover("52:54:00:12:34:56", 9))
    assert info.vendor_class == "PXEClient:Arch:00000:UNDI:002001"
    assert info.kind is ClientKind.IPXE
    assert info.user_class == "iPXE"
    assert info.ipxe_options is not None
    assert info.uuid == "2e1c0a5f-4b3d-695a-7887-96a5b4c3d2e1"
    assert info.serial is None


def test_efi_ipxe():
    info = classify(c.efi_ipxe_discover("52:54:00:12:34:56", 9))
    assert info.kind is ClientKind.IPXE and info.arch == 7


def test_ovmf_pxe_and_http_boot():
    assert classify(c.ovmf_pxe_discover("52:54:00:12:34:56", 9)).kind is \
        ClientKind.PXE_UEFI_X64
    http = classify(c.ovmf_http_discover("52:54:00:12:34:56", 9))
    assert http.kind is ClientKind.HTTP_BOOT and http.arch == 16


def test_bios_pxe_rom():
    assert classify(c.bios_pxe_discover("52:54:00:12:34:56", 9)).kind is ClientKind.PXE_BIOS


@pytest.mark.parametrize("arch,kind", [(0, ClientKind.PXE_BIOS), (7, ClientKind.PXE_UEFI_X64),
                                       (9, ClientKind.PXE_UEFI_X64),
                                       (11, ClientKind.PXE_UEFI_ARM64),
                                       (6, ClientKind.OTHER), (0xFFFF, ClientKind.OTHER),
                                       (12345, ClientKind.OTHER)])
def test_arch_table_never_raises(arch, kind):
    raw = c.request("52:54:00:00:00:01", 1, [(53, b"\x01"), (93, arch.to_bytes(2, "big")),
                                             (60, b"PXEClient:Arch:99999:UNDI:002001")])
    assert classify(raw).kind is kind


def test_odd_arch_lengths_fall_back_to_vendor_class():
    raw = c.request("52:54:00:00:00:01", 1, [(53, b"\x01"), (93, b"\x07"),
                                             (60, b"PXEClient:Arch:00011:UNDI:003000")])
    info = classify(raw)
    assert info.arch == 11 and info.kind is ClientKind.PXE_UEFI_ARM64


def test_plain_client_is_not_a_boot_client():
    info = classify(c.plain_discover("02:00:00:00:00:01", 3))
    assert not info.boot_client and info.kind is ClientKind.OTHER


def test_request_fields_and_facts():
    raw = c.request("52:54:00:00:00:01", 1, [(53, b"\x03"), (50, bytes([10, 231, 1, 100])),
                                             (60, b"PXEClient:Arch:00007:UNDI:003010"),
                                             (93, b"\x00\x07")])
    info = classify(raw)
    assert info.requested_ip == "10.231.1.100" and info.ip == "10.231.1.100"
    f = info.facts()
    assert f.mac == "52:54:00:00:00:01" and f.kind is ClientKind.PXE_UEFI_X64 and f.arch == 7


def test_user_class_forms():
    assert user_class_text(b"iPXE") == "iPXE"
    assert user_class_text(b"\x04iPXE") == "iPXE"
    assert user_class_text(b"\x03abc\x04iPXE") == "abc,iPXE"
    assert user_class_text(b"") is None
