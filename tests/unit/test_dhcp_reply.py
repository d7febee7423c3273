"""Proxy replies, byte by byte: what each client kind gets, and who gets nothing.

Replies are decoded with scapy (an independent codec) and checked against
rpi-netboot.md: yiaddr 0, option 54 == siaddr == option 66, option 43 exactly the
32-byte dnsmasq encoding for a Pi, >= 300 bytes, broadcast when the client has no
address.
"""

from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.dhcp.netif import Interface, Interfaces
from netbootd.dhcp.testkit import responder_for
from netbootd.inventory import load_inventory
from netbootd.settings import load_settings

SERVER = "10.231.1.1"
IFINDEX = 3
PI_MAC = "d8:3a:dd:12:34:56"
PC_MAC = "52:54:00:12:34:56"
PI_OPTION43 = bytes.fromhex("060103 0a0400505845 091400001152617370626572727920506920426f6f74"
                            " ff".replace(" ", ""))

NODES = f"""
profiles:
  default: {{action: netboot}}
nodes:
  {PI_MAC}: {{serial: 1a2b3c4d}}
  52:54:00:00:00:0a: {{action: local}}
  52:54:00:00:00:0b: {{action: ignore}}
"""


def make(tmp_path: Path, **overrides) -> tuple:
    (tmp_path / "nodes.yaml").write_text(NODES)
    ov = {"paths": {"state": str(tmp_path / "state")}, "policy": {"unknown": "default"}}
    for k, v in overrides.items():
        ov.setdefault(k, {}).update(v)
    settings = load_settings(None, ov, use_default_path=False)
    app = build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))
    ifs = Interfaces()
    ifs.by_index = {IFINDEX: Interface(IFINDEX, "veth0", [(SERVER, 24)])}
    return app, responder_for(app, ifs, available=frozenset({"undionly.kpxe", "ipxe.efi",
                                                         "snp.efi"}))


def ask(responder, raw, *, pxe=False, peer=("0.0.0.0", 68)):
    return responder.handle(raw, ifindex=IFINDEX, local_ip=SERVER, peer=peer, pxe_port=pxe)


def decode(payload) -> tuple[BOOTP, dict]:
    msg = BOOTP(bytes(payload))
    opts = {o[0]: o[1] for o in msg[DHCP].options if isinstance(o, tuple)}
    return msg, opts


def raw_option(payload: bytes, code: int) -> bytes | None:
    return pk.parse(bytes([1]) + bytes(payload[1:])).options.get(code)


def count(app, kind, decision) -> float:
    return app.metrics.registry.get_sample_value(
        "netbootd_dhcp_replies_total", {"kind": kind, "decision": decision}) or 0.0


def test_pi_option43_constant_is_the_documented_32_bytes():
    assert len(PI_OPTION43) == 32
    assert PI_OPTION43.startswith(bytes.fromhex("0601030a04005058450914000011"))


@pytest.mark.parametrize("tag", [b"RPi5", b"5iPR"])
def test_pi5_discover_gets_broadcast_proxy_offer(tmp_path, tag):
    app, r = make(tmp_path)
    raw = c.pi_discover(PI_MAC, 0xA1B2C3D4, 0x1A2B3C4D, tag=tag)
    out = ask(r, raw)
    assert out is not None
    assert out.dest == ("255.255.255.255", 68)  # flags 0, no address: broadcast anyway
    assert len(out.payload) >= 300
    msg, opts = decode(out.payload)
    assert msg.op == 2 and msg.xid == 0xA1B2C3D4
    assert msg.chaddr[:6] == bytes.fromhex("d83add123456")
    assert msg.yiaddr == "0.0.0.0"
    assert opts["message-type"] == pk.OFFER
    assert opts["server_id"] == msg.siaddr == SERVER
    assert raw_option(out.payload, 66) == SERVER.encode()
    assert opts["vendor_class_id"] == b"PXEClient"
    assert raw_option(out.payload, 97) == pk.parse(raw).options[97]
    assert raw_option(out.payload, 43) == PI_OPTION43
    assert raw_option(out.payload, 67) is None  # a Pi ignores it; dnsmasq sends none
    assert count(app, "rpi", "offer") == 1
    ev = app.events.timeline(PI_MAC)[-1]
    assert ev.kind == "dhcp" and ev.fields["outcome"] == "ok"
    assert ev.fields["client"] == "rpi" and ev.fields["arch"] == 0


def test_pi_request_gets_ack_but_its_claimed_address_is_not_learnt(tmp_path):
    """Option 50 / ciaddr are what the client *says*: anyone can send them with any
    chaddr, so they never bind an address to a node (docs/security.md)."""
    app, r = make(tmp_path)
    raw = c.request(PI_MAC, 5, [(53, b"\x03"), (50, bytes([10, 231, 1, 150])),
                                (93, b"\x00\x00"), (97, c.pi_machine_id(PI_MAC, 1)),
                                (60, c.PI_VENDOR)])
    out = ask(r, raw)
    _, opts = decode(out.payload)
    assert opts["message-type"] == pk.ACK
    assert app.clients.ip_for(PI_MAC) is None
    assert app.clients.owner_of("10.231.1.150") is None


def test_boot_string_is_configurable(tmp_path):
    _, r = make(tmp_path, rpi={"boot_string": "Custom Boot"})
    out = ask(r, c.pi_discover(PI_MAC, 1))
    opt43 = raw_option(out.payload, 43)
    assert b"Custom Boot" in opt43 and b"Raspberry" not in opt43


@pytest.mark.parametrize("make_pkt", [c.bios_ipxe_discover, c.efi_ipxe_discover])
def test_ipxe_gets_boot_script_url(tmp_path, make_pkt):
    app, r = make(tmp_path)
    out = ask(r, make_pkt(PC_MAC, 77))
    msg, opts = decode(out.payload)
    url = f"http://{SERVER}:8080/boot.ipxe".encode()
    assert opts["boot-file-name"] == url
    assert msg.file.rstrip(b"\0") == url
    assert raw_option(out.payload, 43) == bytes.fromhex("060108ff")  # skip discovery
    assert msg.yiaddr == "0.0.0.0" and msg.siaddr == SERVER
    assert count(app, "ipxe", "offer") == 1


def test_public_url_is_used_for_ipxe(tmp_path):
    _, r = make(tmp_path, http={"public_url": "http://boot.example:9000/"})
    out = ask(r, c.efi_ipxe_discover(PC_MAC, 1))
    assert decode(out.payload)[1]["boot-file-name"] == b"http://boot.example:9000/boot.ipxe"


def test_ovmf_pxe_gets_efi_binary_and_no_option43(tmp_path):
    _, r = make(tmp_path)
    out = ask(r, c.ovmf_pxe_discover(PC_MAC, 1))
    _, opts = decode(out.payload)
    assert opts["boot-file-name"] == b"ipxe.efi"
    assert raw_option(out.payload, 43) is None
    assert opts["vendor_class_id"] == b"PXEClient"


def test_http_boot_gets_httpclient_and_url(tmp_path):
    _, r = make(tmp_path)
    out = ask(r, c.ovmf_http_discover(PC_MAC, 1))
    _, opts = decode(out.payload)
    assert opts["vendor_class_id"] == b"HTTPClient"
    assert opts["boot-file-name"] == f"http://{SERVER}:8080/ipxe/ipxe.efi".encode()


def test_bios_pxe_offer_and_port_4011_ack_carry_boot_file(tmp_path):
    _, r = make(tmp_path)
    out = ask(r, c.bios_pxe_discover(PC_MAC, 1))
    assert decode(out.payload)[1]["boot-file-name"] == b"undionly.kpxe"
    req = c.pxe_bootserver_request(PC_MAC, 2, "10.231.1.150")
    ack = ask(r, req, pxe=True, peer=("10.231.1.150", 68))
    msg, opts = decode(ack.payload)
    assert opts["message-type"] == pk.ACK
    assert opts["boot-file-name"] == b"undionly.kpxe"
    assert msg.file.rstrip(b"\0") == b"undionly.kpxe"
    assert msg.ciaddr == "10.231.1.150" and msg.yiaddr == "0.0.0.0"
    assert raw_option(ack.payload, 43) == bytes.fromhex("47048000 0000ff".replace(" ", ""))
    assert ack.dest == ("10.231.1.150", 68)


def test_unicast_to_ciaddr_and_relay_to_giaddr(tmp_path):
    _, r = make(tmp_path)
    inform = c.request(PC_MAC, 1, [(53, bytes([pk.INFORM])), (93, b"\x00\x07"),
                                   (60, c.OVMF_PXE_VENDOR)], ciaddr="10.231.1.77")
    assert ask(r, inform).dest == ("10.231.1.77", 68)
    relayed = c.request("52:54:00:12:34:57", 2, [(53, b"\x01"), (93, b"\x00\x07"),
                                                 (60, c.OVMF_PXE_VENDOR)],
                        giaddr="10.231.2.1")
    out = ask(r, relayed)
    assert out.dest == ("10.231.2.1", 67)
    assert decode(out.payload)[0].giaddr == "10.231.2.1"


def test_prepared_reply_is_reused_and_patched(tmp_path):
    _, r = make(tmp_path)
    first = ask(r, c.pi_discover(PI_MAC, 1))
    second = ask(r, c.pi_discover(PI_MAC, 2))
    assert r.built == 1
    assert decode(second.payload)[0].xid == 2
    assert bytes(first.payload)[8:] == bytes(second.payload)[8:]


def test_plain_dhcp_client_gets_nothing(tmp_path):
    app, r = make(tmp_path)
    assert ask(r, c.plain_discover("02:00:00:00:00:01", 1)) is None
    assert count(app, "other", "not-boot-client") == 1
    assert app.events.timeline("02:00:00:00:00:01") == [], "LAN devices are not fleet nodes"
    assert "02:00:00:00:00:01" not in app.events.nodes
    ev = app.events.recent()[-1]
    assert ev.mac is None and ev.fields["outcome"] == "ignored"
    assert ev.fields["client_mac"] == "02:00:00:00:00:01"


@pytest.mark.parametrize("mac,decision", [("52:54:00:00:00:0a", "local"),
                                          ("52:54:00:00:00:0b", "ignore")])
def test_local_and_ignore_get_nothing(tmp_path, mac, decision):
    app, r = make(tmp_path)
    assert ask(r, c.efi_ipxe_discover(mac, 1)) is None
    assert count(app, "ipxe", decision) == 1
    assert app.events.timeline(mac)[-1].fields["outcome"] == "ignored"


def test_unknown_machine_with_policy_ignore_gets_nothing(tmp_path):
    app, r = make(tmp_path, policy={"unknown": "ignore"})
    assert ask(r, c.ovmf_pxe_discover("52:54:00:99:99:99", 1)) is None
    assert count(app, "pxe-uefi-x64", "ignore") == 1
    assert ask(r, c.pi_discover(PI_MAC, 1)) is not None  # known: still answered


def test_rate_limit_per_mac(tmp_path):
    app, r = make(tmp_path, dhcp={"rate_limit_per_mac": 5})
    answered = sum(ask(r, c.pi_discover(PI_MAC, i)) is not None for i in range(20))
    assert answered == 5
    assert count(app, "rpi", "rate-limited") == 15
    # another MAC is not affected
    assert ask(r, c.efi_ipxe_discover(PC_MAC, 1)) is not None


def test_missing_binary_means_no_reply(tmp_path):
    app, r = make(tmp_path)
    r.available = frozenset({"ipxe.efi"})
    assert ask(r, c.bios_pxe_discover(PC_MAC, 1)) is None
    assert count(app, "pxe-bios", "no-boot-file") == 1
    assert "undionly.kpxe" in app.events.timeline(PC_MAC)[-1].fields["reason"]


def test_served_interfaces_only(tmp_path):
    _, r = make(tmp_path, network={"interfaces": ["eth9"]})
    assert ask(r, c.pi_discover(PI_MAC, 1)) is None


def test_advertise_overrides_interface_address(tmp_path):
    _, r = make(tmp_path, network={"advertise": "10.231.1.5"})
    msg, opts = decode(ask(r, c.pi_discover(PI_MAC, 1)).payload)
    assert opts["server_id"] == msg.siaddr == "10.231.1.5"


def test_malformed_is_counted_not_raised(tmp_path):
    app, r = make(tmp_path)
    for raw in (b"", b"\x01" * 300, c.pi_discover(PI_MAC, 1)[:-3]):
        assert ask(r, raw) is None
    assert app.metrics.registry.get_sample_value(
        "netbootd_malformed_inputs_total", {"service": "dhcp"}) == 3


def test_inventory_reload_is_seen_by_the_classification_memo(tmp_path):
    app, r = make(tmp_path)
    mac = "02:00:00:00:77:01"  # no Pi OUI, option 97 without a tag: not a Pi yet
    raw = c.pi_discover(mac, 1, machine_id=c.pi_serial_only_id(0x77))
    out = ask(r, raw)
    assert out is not None and raw_option(out.payload, 43) == bytes.fromhex("060108ff")
    (tmp_path / "nodes2.yaml").write_text(f"nodes:\n  {mac}: {{serial: '00000077'}}\n")
    app.inventory = load_inventory(tmp_path / "nodes2.yaml")
    app.planner.end_session(mac)
    out = ask(r, c.pi_discover(mac, 2, machine_id=c.pi_serial_only_id(0x77)))
    assert raw_option(out.payload, 43) == PI_OPTION43
