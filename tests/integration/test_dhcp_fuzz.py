"""Fuzz the live listener: 100,000 random and mutated DHCP packets, then a valid request.

A seeded generator (reproducible: the seed is in the failure message) rather than
hypothesis, because 100k examples through hypothesis' engine would not fit the time
budget; the codec itself gets a hypothesis property test in the unit suite. Packets
are mutations of the real firmware requests (bit flips, truncation, extension, corrupt
option lengths, wrong op/htype/hlen, overload values, random options) plus pure noise.
Sent over real UDP on 127.0.0.1 to both the :67-role and the :4011-role socket.
"""

import asyncio
import os
import random
import socket
import time

from scapy.layers.dhcp import BOOTP, DHCP

from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk

TOTAL = 100_000
SEED = int(os.environ.get("NETBOOTD_FUZZ_SEED", "20261123"))
SEEDS = [
    c.pi_discover("d8:3a:dd:00:00:01", 1),
    c.pi_discover("d8:3a:dd:00:00:02", 2, tag=b"5iPR", msg_type=pk.REQUEST),
    c.bios_ipxe_discover("52:54:00:00:00:01", 3),
    c.efi_ipxe_discover("52:54:00:00:00:02", 4),
    c.ovmf_pxe_discover("52:54:00:00:00:03", 5),
    c.ovmf_http_discover("52:54:00:00:00:04", 6),
    c.pxe_bootserver_request("52:54:00:00:00:05", 7, "127.0.0.1"),
    c.plain_discover("02:00:00:00:00:01", 8),
]


def mutate(rng: random.Random) -> bytes:
    choice = rng.randrange(10)
    if choice == 0:  # pure noise of any size
        return rng.randbytes(rng.choice((0, 1, 239, 240, 241, 300, rng.randrange(2000))))
    b = bytearray(rng.choice(SEEDS))
    if choice == 1:  # flip bits anywhere
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif choice == 2:  # truncate
        del b[rng.randrange(len(b)):]
    elif choice == 3:  # extend with junk / past the size limit
        b += rng.randbytes(rng.choice((1, 50, 1300, 1600)))
    elif choice == 4:  # corrupt an option length byte
        b[rng.randrange(pk.OPTIONS_OFFSET + 1, len(b))] = rng.randrange(256)
    elif choice == 5:  # header fields: op, htype, hlen, hops
        b[rng.randrange(4)] = rng.randrange(256)
    elif choice == 6:  # overload into file/sname with garbage there
        b[-1:] = bytes((52, 1, rng.randrange(256), 255))
        b[44:236] = rng.randbytes(192)
    elif choice == 7:  # random options appended before END
        extra = bytearray()
        for _ in range(rng.randrange(1, 6)):
            code = rng.randrange(1, 255)
            n = rng.randrange(0, 40)
            extra += bytes((code, n)) + rng.randbytes(n)
        b[-1:] = extra + b"\xff"
    elif choice == 8:  # odd-length arch, weird vendor class, broken option 97 / 43
        code = rng.choice((93, 60, 97, 43, 77, 175, 53, 50))
        val = rng.randbytes(rng.randrange(0, 20))
        b[-1:] = bytes((code, len(val))) + val + b"\xff"
    else:  # change MAC and xid (many clients: exercises caches and rate limiter)
        b[28:34] = rng.randbytes(6)
        b[4:8] = rng.randbytes(4)
    return bytes(b)


async def test_listener_survives_100k_fuzzed_packets_and_still_answers(dhcp_service):
    app, svc, ports = dhcp_service
    rng = random.Random(SEED)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.bind(("127.0.0.1", 0))
        targets = [("127.0.0.1", ports["port"]), ("127.0.0.1", ports["pxe_port"])]
        for i in range(TOTAL):
            tx.sendto(mutate(rng), targets[i & 1])
            if i % 32 == 31:  # let the listener drain (same loop, real socket)
                await asyncio.sleep(0)
        tx.setblocking(False)
        loop = asyncio.get_running_loop()
        # A valid request after the flood, resent like a real client would until its
        # answer comes: the listener reads its socket in order, so once the answer is
        # here every fuzzed packet before it was handled (or dropped by the kernel).
        valid = c.pxe_bootserver_request("52:54:00:fe:ed:01", 0xC0FFEE, "127.0.0.1")
        raw = await answer_to(loop, tx, valid, targets[1], 0xC0FFEE)
        h = svc.health()
        assert h["ok"], h
        handled = h["replies"] + h["dropped"]
        print(f"fuzz: seed {SEED}, handled {handled}, replies {h['replies']}, "
              f"dropped {h['dropped']}, send errors {h['send_errors']}")
        assert handled > TOTAL * 0.5, f"listener handled only {handled} (seed {SEED})"
        errors = app.metrics.registry.get_sample_value(
            "netbootd_errors_total", {"service": "dhcp"}) or 0
        assert errors == svc.send_errors, f"internal errors while fuzzing (seed {SEED})"
    msg = BOOTP(raw)
    assert msg.xid == 0xC0FFEE
    opts = {o[0]: o[1] for o in msg[DHCP].options if isinstance(o, tuple)}
    assert opts["boot-file-name"] == b"undionly.kpxe"
    malformed = app.metrics.registry.get_sample_value(
        "netbootd_malformed_inputs_total", {"service": "dhcp"})
    assert malformed and malformed > TOTAL * 0.2
    # (how fast the listener gets through the flood is measured in bench/, not here)


async def answer_to(loop, tx: socket.socket, request: bytes, target, xid: int,
                    *, resend: float = 1.0, bound: float = 120.0) -> bytes:
    """Send ``request`` every ``resend`` seconds until the reply with ``xid`` arrives;
    other datagrams (replies to fuzz packets) are read and discarded."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        await loop.sock_sendto(tx, request, target)
        resend_at = time.monotonic() + resend
        while (left := resend_at - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(loop.sock_recv(tx, 4096), left)
            except TimeoutError:
                break
            if BOOTP(raw).xid == xid:
                return raw
    raise AssertionError(f"no answer to xid {xid:#x} within {bound:.0f} s")
