"""TFTP codec (RFC 1350/2347) and option negotiation (RFC 2348/2349/7440)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netbootd.tftp import codec
from netbootd.tftp.transfer import negotiate


def test_rrq_round_trip():
    pkt = codec.build_request("a/b.txt", "octet", {"tsize": "0", "blksize": "1468"})
    req = codec.parse_request(pkt)
    assert req == codec.Request(codec.RRQ, "a/b.txt", "octet", {"tsize": "0", "blksize": "1468"})


def test_rrq_mode_and_option_names_are_case_insensitive():
    req = codec.parse_request(b"\x00\x01f\x00OCTET\x00BlkSize\x001024\x00")
    assert req.mode == "octet" and req.options == {"blksize": "1024"}


def test_rrq_trailing_nul_padding_is_tolerated():
    req = codec.parse_request(b"\x00\x01f\x00octet\x00tsize\x000\x00\x00\x00")
    assert req.options == {"tsize": "0"}


def test_repeated_option_keeps_first_value():
    req = codec.parse_request(b"\x00\x01f\x00octet\x00blksize\x00512\x00blksize\x009000\x00")
    assert req.options == {"blksize": "512"}


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\x00\x01", b"\x00\x01file", b"\x00\x01file\x00",
    b"\x00\x01\x00octet\x00",                      # empty name
    b"\x00\x01f\x00\x00",                          # empty mode
    b"\x00\x01f\x00octet\x00blksize",              # option without NUL
    b"\x00\x01f\x00octet\x00blksize\x00",          # option without value
    b"\x00\x01f\x00octet\x00\x00x\x00",            # empty option name then junk
    b"\x00\x01\xff\xfe\x00octet\x00",              # not UTF-8
    b"\x00\x03\x00\x01data",                       # DATA is not a request
    b"\x00\x01" + b"a" * 3000 + b"\x00octet\x00",  # too long
])
def test_malformed_requests(data: bytes):
    with pytest.raises(codec.Malformed):
        codec.parse_request(data)


def test_ack_and_error():
    assert codec.parse_ack(codec.build_ack(70000)) == 70000 & 0xFFFF
    with pytest.raises(codec.Malformed):
        codec.parse_ack(b"\x00\x04\x00")  # the 3-byte ACK that killed tftpy
    err = codec.parse_error(codec.build_error(1, "File not found"))
    assert (err.code, err.message) == (1, "File not found")
    assert codec.parse_error(b"\x00\x05\x00\x00Early terminate").message == "Early terminate"


def test_data_header_wraps():
    assert codec.build_data(65536, b"x")[:4] == b"\x00\x03\x00\x00"


def test_oack_round_trip():
    assert codec.parse_oack(codec.build_oack({"tsize": "5", "blksize": "1468"})) == {
        "tsize": "5", "blksize": "1468"}


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_parsers_raise_only_malformed(data: bytes):
    for fn in (codec.parse_request, codec.parse_ack, codec.parse_error, codec.parse_oack):
        try:
            fn(data)
        except codec.Malformed:
            pass


# -- negotiation ------------------------------------------------------------------------

def nego(opts: dict[str, str], size: int = 1000, **kw):
    args = {"size": size, "blksize_max": 1468, "windowsize_max": 64, "default_timeout": 1.0}
    args.update(kw)
    return negotiate(opts, **args)


def test_no_options_no_oack():
    n = nego({})
    assert n.oack is None and n.blksize == 512 and n.windowsize == 1


def test_oack_has_only_requested_options():
    n = nego({"tsize": "0", "blksize": "1468"}, size=12345)
    assert n.oack == {"tsize": "12345", "blksize": "1468"}


def test_blksize_capped_and_bounded():
    assert nego({"blksize": "65464"}).blksize == 1468
    assert nego({"blksize": "9000"}, blksize_max=65464).blksize == 9000
    assert nego({"blksize": "7"}).oack is None  # below RFC 2348 minimum: ignored
    assert nego({"blksize": "abc"}).oack is None  # the input that crashed tftpy


def test_windowsize_and_timeout():
    n = nego({"windowsize": "200", "timeout": "3"})
    assert n.windowsize == 64 and n.timeout == 3.0
    assert n.oack == {"windowsize": "64", "timeout": "3"}
    assert nego({"timeout": "0"}).oack is None
    assert nego({"timeout": "256"}).oack is None
    assert nego({"windowsize": "0"}).oack is None


def test_unknown_options_ignored():
    assert nego({"multicast": "", "utimeout": "1000"}).oack is None


def test_interface_blksize_from_mtu():
    """blksize is also capped by the MTU of the interface a request came in on."""
    import socket

    from netbootd.tftp.server import interface_blksize

    lo = socket.if_nametoindex("lo")
    assert interface_blksize(lo) == 65536 - 32  # loopback MTU 65536
    assert interface_blksize(999_999) is None
