"""DHCP flood, run inside the attacker's namespace (bench/attack/run.py starts it).

    python bench/attack/flood.py SERVER --seconds 60 --rate 5000 --known MAC[,MAC...]

For ``--seconds`` at ``--rate`` packets/s (bounded: at most seconds x rate packets), 4
of every 5 packets are DISCOVERs from a fresh random MAC (a Pi 5, UEFI PXE, BIOS PXE or
iPXE firmware, in turn) and 1 is a REQUEST from one of the ``--known`` MACs (to port 67,
and the PXE boot-server REQUEST to port 4011, in turn): machines nobody knows, and known
machines asking far beyond the per-MAC rate limit. Replies are drained and counted.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab import check_target

from netbootd.dhcp import clients
from netbootd.dhcp import packet as pk

KINDS = (clients.pi_discover, clients.efi_ipxe_discover, clients.ovmf_pxe_discover,
         clients.bios_pxe_discover)


def random_mac() -> str:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] | 0x02) & 0xFE  # locally administered, unicast
    return ":".join(f"{x:02x}" for x in b)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--known", default="")
    ap.add_argument("--client-ip", default="0.0.0.0", help="address the REQUESTs name")
    args = ap.parse_args()
    server = check_target(args.server)
    known = [m for m in args.known.split(",") if m]

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", 68))
    s.setblocking(False)

    limit = int(args.seconds * args.rate)
    sent = unknown = known_sent = replies = 0
    t0 = time.monotonic()
    batch = max(1, int(args.rate / 100))  # one batch per 10 ms
    while sent < limit:
        now = time.monotonic() - t0
        if now >= args.seconds:
            break
        due = min(limit, int(now * args.rate) + batch)
        while sent < due:
            xid = sent & 0xFFFFFFFF
            if known and sent % 5 == 4:
                mac = known[known_sent % len(known)]
                if known_sent % 2:
                    pkt, port = clients.pxe_bootserver_request(mac, xid, args.client_ip), 4011
                else:
                    pkt = clients.bios_ipxe_discover(mac, xid, msg_type=pk.REQUEST)
                    port = 67
                known_sent += 1
            else:
                pkt, port = KINDS[unknown % len(KINDS)](random_mac(), xid), 67
                unknown += 1
            try:
                s.sendto(pkt, (server, port))
            except BlockingIOError:
                time.sleep(0.001)
                continue
            sent += 1
        while True:
            try:
                s.recv(2048)
                replies += 1
            except BlockingIOError:
                break
        time.sleep(0.01)
    took = time.monotonic() - t0
    print(json.dumps({"sent": sent, "random_mac_discovers": unknown,
                      "known_mac_requests": known_sent, "replies": replies,
                      "seconds": round(took, 1), "rate": round(sent / took)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
