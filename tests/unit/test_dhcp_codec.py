"""The strict DHCP pre-parser: real firmware packets parse, malformed ones are refused.

Every packet here is built byte-for-byte as rpi-netboot.md / lab.md describe, and the
fast parser is cross-checked against scapy's decoder so the two codecs agree.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP

from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk

PI_MAC = "d8:3a:dd:12:34:56"


def test_pi5_discover_parses_with_exact_option_order():
    raw = c.pi_discover(PI_MAC, 0x11223344)
    # Option order on a Pi 4 capture: 53, 55, 93, 94, 97, 60, 255.
    codes, i = [], pk.OPTIONS_OFFSET
    while raw[i] != 255:
        codes.append(raw[i])
        i += 2 + raw[i + 1]
    assert codes == [53, 55, 93, 94, 97, 60]
    req = pk.parse(raw)
    assert req.xid == 0x11223344
    assert req.flags == 0  # a Pi does not set the broadcast flag
    assert req.mac == bytes.fromhex("d83add123456")
    assert req.message_type == pk.DISCOVER
    assert req.options[93] == b"\x00\x00"
    assert req.options[60] == b"PXEClient:Arch:00000:UNDI:002001"
    assert len(req.options[97]) == 17


@pytest.mark.parametrize("make", [c.bios_ipxe_discover, c.efi_ipxe_discover,
                                  c.ovmf_pxe_discover, c.ovmf_http_discover,
                                  c.bios_pxe_discover, c.plain_discover])
def test_fast_parser_agrees_with_scapy(make):
    raw = make("52:54:00:12:34:56", 0xDEADBEEF)
    req = pk.parse(raw)
    sc = BOOTP(raw)
    assert sc.xid == req.xid
    assert sc.chaddr[:6] == req.mac
    opts = {o[0]: o[1] for o in sc[DHCP].options if isinstance(o, tuple)}
    assert opts["message-type"] == req.message_type
    assert opts["vendor_class_id"] == req.options[60]


def test_option_overload_into_file_field_is_read():
    raw = bytearray(c.request("52:54:00:00:00:01", 1, [(53, b"\x01"), (52, b"\x01")]))
    vendor = b"PXEClient:Arch:00007"
    raw[108:108 + 2 + len(vendor) + 1] = bytes((60, len(vendor))) + vendor + b"\xff"
    req = pk.parse(bytes(raw))
    assert req.options[60] == vendor


def test_repeated_option_is_concatenated_rfc3396():
    raw = c.request("52:54:00:00:00:01", 1, [(53, b"\x01"), (60, b"PXE"), (60, b"Client")])
    assert pk.parse(raw).options[60] == b"PXEClient"


def _mutate(raw: bytes, at: int, value: int) -> bytes:
    b = bytearray(raw)
    b[at] = value
    return bytes(b)


GOOD = c.pi_discover(PI_MAC, 7)


@pytest.mark.parametrize("raw,why", [
    (b"", "empty"),
    (GOOD[:100], "truncated header"),
    (GOOD[:-1], "truncated: no end option"),
    (GOOD[:-5], "truncated inside an option"),
    (GOOD + b"\0" * 1500, "oversized"),
    (_mutate(GOOD, 0, 2), "op is BOOTREPLY"),
    (_mutate(GOOD, 1, 6), "htype not ethernet"),
    (_mutate(GOOD, 2, 16), "hlen not 6"),
    (_mutate(GOOD, 3, 200), "hop count"),
    (_mutate(GOOD, 236, 0), "no magic cookie"),
    (_mutate(GOOD, 241, 250), "option length past the end"),
    (c.request(PI_MAC, 1, [(53, b"\x01"), (52, b"\x07")]), "bad overload value"),
    (c.request(PI_MAC, 1, [(53, b"\x01"), (52, b"\x01")]), "overload, file has no end"),
])
def test_malformed_is_refused(raw, why):
    with pytest.raises(pk.Malformed):
        pk.parse(raw)


def test_encode_options_rejects_long_values():
    with pytest.raises(ValueError):
        pk.encode_options([(9, b"x" * 256)])


def test_explain_never_raises():
    assert isinstance(pk.explain(b"\x01\x02garbage"), str)
    assert "BOOTP" in pk.explain(GOOD) or "DHCP" in pk.explain(GOOD)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1600), st.integers(0, 3))
def test_parse_raises_only_malformed_on_any_bytes(noise, where):
    # Noise alone, and noise grafted onto a real header so the option walker is reached.
    for raw in (noise, GOOD[:pk.OPTIONS_OFFSET + where] + noise):
        try:
            req = pk.parse(raw)
        except pk.Malformed:
            continue
        assert len(req.mac) == 6 and isinstance(req.options, dict)
