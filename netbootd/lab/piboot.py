"""An emulated Raspberry Pi 5 network boot, run inside the lab's ``pi`` namespace.

``python -m netbootd.lab.piboot --serial HEX --out result.json`` does what the Pi 5
bootloader does on the wire (docs/rpi-netboot.md): a DHCP DISCOVER from 0.0.0.0 with the
Pi's options (vendor class ``PXEClient:Arch:00000:UNDI:002001``, arch 0, option 97 machine
id), collects the site server's address offer and netbootd's proxy offer, completes
REQUEST/ACK with the site server, puts the address on ``eth0``, then loads the Pi 5 file set
for its serial over TFTP with :mod:`netbootd.tftp.piclient` (probe-and-abort, blksize 1468).
The result (both offers, every file's size and sha256, the text of cmdline.txt and
config.txt) is written as JSON for the test to judge.

DHCP is built by hand with struct on an AF_PACKET socket rather than with scapy: a peer
must not share the server's codec, and the BOOTP layout is a fixed 240-byte header.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..tftp.piclient import pi5_boot

ETH_P_IP = 0x0800
VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
PARAMS = bytes([1, 3, 43, 60, 66, 67, *range(128, 136)])


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def machine_id(mac: bytes, serial: int, tag: bytes = b"RPi5", rev: int = 0xD04170) -> bytes:
    """Option 97 as a Pi 5 sends it: 0x00, tag, board revision (LE), low 4 MAC bytes,
    serial (LE): 17 bytes."""
    return b"\x00" + tag + struct.pack("<I", rev) + mac[2:] + struct.pack("<I", serial)


def dhcp_packet(mac: bytes, xid: int, msg_type: int, extra: list[tuple[int, bytes]],
                serial: int) -> bytes:
    """A Pi-style DHCP message (flags 0x0000: no broadcast flag) in Ethernet/IP/UDP."""
    opts = [(53, bytes([msg_type])), (55, PARAMS), (93, b"\x00\x00"), (94, b"\x01\x02\x01"),
            (97, machine_id(mac, serial)), (60, VENDOR_CLASS), *extra]
    body = b"".join(bytes([c, len(v)]) + v for c, v in opts) + b"\xff"
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0, b"\0" * 4,
                        b"\0" * 4, b"\0" * 4, b"\0" * 4, mac.ljust(16, b"\0"), b"", b"")
    payload = bootp + b"\x63\x82\x53\x63" + body
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.randrange(65536), 0,
                     64, 17, 0, b"\0" * 4, b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_IP) + ip + udp


def parse_reply(frame: bytes, xid: int) -> dict[str, Any] | None:
    """A BOOTREPLY for ``xid`` from an Ethernet frame, or None."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != 17:
        return None
    udp = 14 + ihl
    sport, dport = struct.unpack("!HH", frame[udp:udp + 4])
    if dport != 68:
        return None
    b = frame[udp + 8:]
    if b[0] != 2 or struct.unpack("!I", b[4:8])[0] != xid or b[236:240] != b"\x63\x82\x53\x63":
        return None
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(b) and b[i] != 255:
        if b[i] == 0:
            i += 1
            continue
        code, n = b[i], b[i + 1]
        opts[code] = b[i + 2:i + 2 + n]
        i += 2 + n
    return {"eth_dst": frame[0:6].hex(":"), "ip_src": socket.inet_ntoa(frame[26:30]),
            "ip_dst": socket.inet_ntoa(frame[30:34]), "sport": sport,
            "yiaddr": socket.inet_ntoa(b[16:20]), "siaddr": socket.inet_ntoa(b[20:24]),
            "flags": struct.unpack("!H", b[10:12])[0],
            "file": b[108:236].split(b"\0", 1)[0].decode(errors="replace"),
            "options": {str(k): v.hex() for k, v in opts.items()},
            "type": opts.get(53, b"\0")[0]}


def exchange(sock: socket.socket, frame: bytes, xid: int, seconds: float,
             done: Callable[[list[dict]], bool] = lambda r: False) -> list[dict]:
    """Send ``frame`` and collect replies for ``xid`` for up to ``seconds`` (resend every
    2 s, as the firmware retries), stopping early once ``done(replies)``."""
    replies: list[dict] = []
    deadline = time.monotonic() + seconds
    next_send = 0.0
    while time.monotonic() < deadline and not done(replies):
        if time.monotonic() >= next_send:
            sock.send(frame)
            next_send = time.monotonic() + 2.0
        sock.settimeout(max(0.05, min(deadline, next_send) - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        r = parse_reply(data, xid)
        if r is not None and r not in replies:
            replies.append(r)
    return replies


def _site_ack(reply: dict[str, Any]) -> bool:
    return reply["type"] == 5 and reply["yiaddr"] != "0.0.0.0"


def dhcp(iface: str, serial: str, collect: float) -> dict[str, Any]:
    """The Pi's DHCP: DISCOVER, both offers, REQUEST/ACK with the site server, and the
    acked address put on ``iface``. The result says what was offered (``offers``,
    ``proxy``, ``site``, ``ack``) and, once bound, ``ip``."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().strip()
                        .replace(":", ""))
    ser = int(serial[-8:], 16)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((iface, 0))
    xid = random.randrange(1 << 32)
    t0 = time.monotonic()
    def both(replies: list[dict]) -> bool:  # a site offer and a proxy offer
        return (any(o["yiaddr"] != "0.0.0.0" for o in replies)
                and any("43" in o["options"] for o in replies))

    with sock:
        offers = exchange(sock, dhcp_packet(mac, xid, 1, [], ser), xid, collect, both)
        proxy = [o for o in offers if o["yiaddr"] == "0.0.0.0" and "43" in o["options"]]
        site = [o for o in offers if o["yiaddr"] != "0.0.0.0" and o["type"] == 2]
        result: dict[str, Any] = {"mac": mac.hex(":"), "offers": offers, "proxy": proxy[:1],
                                  "site": site[:1], "files": {}, "text": {}}
        if not site:
            return result
        lease = site[0]
        server_id = bytes.fromhex(lease["options"]["54"])
        acks = exchange(sock, dhcp_packet(mac, xid, 3,
                                          [(50, socket.inet_aton(lease["yiaddr"])),
                                           (54, server_id)], ser), xid, collect,
                        lambda replies: any(_site_ack(a) for a in replies))
    # netbootd may ACK the REQUEST too (a proxy ACK without address): the lease is the
    # site server's
    result["ack"] = [a for a in acks if _site_ack(a)][:1]
    result["dhcp_seconds"] = round(time.monotonic() - t0, 3)
    if result["ack"]:
        result["ip"] = lease["yiaddr"]
        subprocess.run(["ip", "addr", "add", f"{lease['yiaddr']}/24", "dev", iface],
                       check=False)
    return result


def run(iface: str, serial: str, out: Path, collect: float) -> dict[str, Any]:
    """DHCP, then the Pi 5 file set over TFTP from the proxy offer's server."""
    result = dhcp(iface, serial, collect)
    if "ip" not in result or not result["proxy"]:
        return result
    ip = result["ip"]
    tftp_ip = result["proxy"][0]["siaddr"]
    t1 = time.monotonic()
    log = asyncio.run(pi5_boot((tftp_ip, 69), serial[-8:].lower(), bind_ip=ip))
    result["tftp_seconds"] = round(time.monotonic() - t1, 3)
    result["prefix_used"] = log.prefix_used
    for name, data in log.files.items():
        result["files"][name] = None if data is None else {
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if data is not None and name.endswith(".txt"):
            result["text"][name] = data.decode(errors="replace")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--serial", required=True, help="board serial (hex; low 8 digits used)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--collect", type=float, default=3.0, help="seconds to collect offers")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("piboot: needs root (raw socket)", file=sys.stderr)
        return 1
    result = run(args.iface, args.serial, args.out, args.collect)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
