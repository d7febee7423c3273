"""Spoofed DHCP claims, run inside the attacker's namespace (bench/attack/run.py starts it).

    python bench/attack/spoof.py SERVER --mac NODE_MAC --claim ATTACKER_IP [--repeat 5]

Sends, ``--repeat`` times each, the packets that once rebound a node to an attacker:
a REQUEST with chaddr = the node's MAC and option 50 = the attacker's own address (port
67, and the PXE boot-server REQUEST with ciaddr = that address to port 4011), and an
INFORM with ciaddr = the attacker's address. The attacker's interface keeps its own MAC:
only the DHCP payload lies. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab import check_target

from netbootd.dhcp import clients
from netbootd.dhcp import packet as pk


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("--mac", required=True)
    ap.add_argument("--claim", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    server, claim = check_target(args.server), check_target(args.claim)
    ip = socket.inet_aton(claim)
    vendor = clients.PI_VENDOR
    request = clients.request(args.mac, 0x5EED0001, [
        (53, bytes((pk.REQUEST,))), (50, ip), (54, socket.inet_aton(server)),
        (60, vendor), (93, b"\x00\x00"), (94, b"\x01\x02\x01"), (77, b"iPXE")])
    inform = clients.request(args.mac, 0x5EED0002, [
        (53, bytes((pk.INFORM,))), (60, vendor), (93, b"\x00\x00"), (94, b"\x01\x02\x01")],
        ciaddr=claim)
    bootserver = clients.pxe_bootserver_request(args.mac, 0x5EED0003, claim)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((claim, 68))
    s.settimeout(0.2)
    sent = replies = 0
    for _ in range(args.repeat):
        for pkt, port in ((request, 67), (inform, 67), (bootserver, 4011)):
            s.sendto(pkt, (server, port))
            sent += 1
        time.sleep(0.2)  # apart: the per-MAC rate limit is not what is tested here
        try:
            while True:
                s.recv(2048)
                replies += 1
        except OSError:
            pass
    print(json.dumps({"sent": sent, "replies": replies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
