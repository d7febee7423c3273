"""The C block loop's own checks (its protocol behaviour is tested through the workers in
tests/integration/test_tftp_*.py, where ``workers`` mode runs every transfer in it)."""

from __future__ import annotations

import os
import socket

import pytest

from netbootd.tftp.worker import load_pump


@pytest.fixture
def pump():
    mod = load_pump()
    assert mod is not None, "netbootd/tftp/_pump.c is not built (needs gcc and python3-dev)"
    return mod


@pytest.mark.parametrize("blksize, window, timeout, retries", [
    (7, 1, 1.0, 1), (65465, 1, 1.0, 1), (512, 0, 1.0, 1), (512, 65536, 1.0, 1),
    (512, 1, 0.0, 1), (512, 1, 1.0, -1)])
def test_out_of_range_parameters_are_refused(pump, blksize, window, timeout, retries):
    with pytest.raises(ValueError):
        pump.run(-1, -1, b"", blksize, window, timeout, retries, None, -1)


def test_readable_stop_descriptor_aborts_and_tells_the_client(pump):
    """The worker's stop pipe: the client gets ERROR 0 "server stopping"."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r, w = os.pipe()
    try:
        client.bind(("127.0.0.1", 0))
        client.settimeout(2)
        server.bind(("127.0.0.1", 0))
        server.connect(client.getsockname())
        os.write(w, b"x")
        outcome, reason, blocks, payload, packets, malformed = pump.run(
            server.fileno(), -1, b"y" * 1000, 512, 1, 5.0, 3, None, r)
        assert (outcome, reason, blocks) == ("aborted", "server stopping", 0)
        assert client.recv(600)[:4] == b"\x00\x03\x00\x01"  # DATA 1 went out first
        assert client.recv(600) == b"\x00\x05\x00\x00server stopping\x00"
        assert (payload, packets, malformed) == (512, 2, 0)
    finally:
        client.close()
        server.close()
        os.close(r)
        os.close(w)
