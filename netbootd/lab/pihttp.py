"""An emulated Raspberry Pi 5 HTTP boot, run inside one of the lab's Pi namespaces.

``python -m netbootd.lab.pihttp --eeprom FILE --out result.json`` does what a Pi 5 with
``BOOT_ORDER=0xf17`` does on the wire (docs/rpi-netboot.md, section 6): the Pi's DHCP
(:func:`netbootd.lab.piboot.dhcp`: the site server's address, netbootd's proxy offer
beside it), ``HTTP_HOST`` resolved through the DNS server the site DHCP named when it
is a name, then ``boot.sig`` and ``boot.img`` from ``HTTP_HOST:HTTP_PORT/HTTP_PATH``
checked with the public key and read like the bootloader does
(:func:`netbootd.rpi.httpclient.pi5_http_boot`). With ``--hand-over`` the booted OS then
asks for its cloud-init meta-data, as Raspberry Pi OS does at first boot, which ends the
firmware part of the boot on the server.

The EEPROM file is the text ``netbootd keys generate`` printed (:func:`eeprom_from`):
the board is configured with exactly what the operator is told to put into it.

``--hold FILE`` stops the boot between boot.sig and boot.img until FILE exists (after
writing ``<out>.held``): a board that is slow to ask for its image, so a test can move a
channel while boots are in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..rpi.httpclient import PI5_READS, Board, BootRefused, load_public_key, pi5_http_boot
from .piboot import dhcp

BEGIN, END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


@dataclass(frozen=True)
class Eeprom:
    """What a Pi's bootloader EEPROM holds for HTTP boot."""

    public_pem: bytes
    http_host: str
    http_port: int
    http_path: str

    def base_url(self, host_ip: str) -> str:
        return f"http://{host_ip}:{self.http_port}/{self.http_path.strip('/')}"


def eeprom_from(printed: str) -> Eeprom:
    """The public key and ``HTTP_*`` lines out of what ``netbootd keys generate`` printed."""
    pem = printed[printed.index(BEGIN):printed.index(END) + len(END)].encode() + b"\n"
    conf: dict[str, str] = {}
    for line in printed.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            conf[key] = value.split("#", 1)[0].strip()
    return Eeprom(pem, conf["HTTP_HOST"], int(conf["HTTP_PORT"]), conf["HTTP_PATH"])


def resolve(name: str, server: str, *, timeout: float = 2.0, tries: int = 5) -> str:
    """The first A record for ``name`` from ``server`` (a plain DNS query by hand: the
    board's resolver is not netbootd's dnslib)."""
    xid = random.randrange(1 << 16)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".")) + b"\0"
    query = struct.pack("!HHHHHH", xid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(query, (server, 53))
            try:
                reply = s.recv(1500)
            except TimeoutError:
                continue
            rid, flags, _qd, an = struct.unpack_from("!HHHH", reply)
            if rid != xid:
                continue
            if flags & 0xF or an == 0:
                raise LookupError(f"{name}: DNS rcode {flags & 0xF}, {an} answers")
            i = 12 + len(qname) + 4  # our one question, echoed
            for _ in range(an):
                i += 2 if reply[i] & 0xC0 == 0xC0 else reply.index(b"\0", i) + 1 - i
                rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", reply, i)
                i += 10
                if rtype == 1 and rdlen == 4:
                    return socket.inet_ntoa(reply[i:i + 4])
                i += rdlen
            raise LookupError(f"{name}: no A record")
    raise TimeoutError(f"no DNS answer from {server} for {name}")


def host_address(eeprom: Eeprom, ack: dict[str, Any]) -> str:
    """``HTTP_HOST`` as an address: itself, or resolved by the DNS server in the ACK."""
    try:
        return str(ipaddress.IPv4Address(eeprom.http_host))
    except ValueError:
        pass
    dns = bytes.fromhex(ack["options"].get("6", ""))
    if len(dns) < 4:
        raise LookupError(f"HTTP_HOST {eeprom.http_host} is a name and DHCP named no DNS server")
    return resolve(eeprom.http_host, socket.inet_ntoa(dns[:4]))


async def _hand_over(cmdline: str) -> int:
    """GET the NoCloud seed's meta-data named in cmdline.txt; the HTTP status."""
    seed = next(w for w in cmdline.split() if w.startswith("ds=nocloud;s="))
    url = seed.split(";s=", 1)[1]
    async with aiohttp.ClientSession() as s, s.get(url.rstrip("/") + "/meta-data") as r:
        await r.read()
        return r.status


async def http_boot(eeprom: Eeprom, host_ip: str, *, hold: Path | None, held: Path,
                    hand_over: bool) -> dict[str, Any]:
    """The HTTP part of the boot; what the board saw, for the test to judge."""
    out: dict[str, Any] = {"host": host_ip, "url": eeprom.base_url(host_ip)}

    async def wait_hold() -> None:
        held.write_text(str(time.time()))
        while hold is not None and not hold.exists():
            await asyncio.sleep(0.1)

    t0 = time.monotonic()
    try:
        log = await pi5_http_boot(out["url"], Board(load_public_key(eeprom.public_pem)),
                                  reads=PI5_READS, timeout=300,
                                  between=wait_hold if hold is not None else None)
    except BootRefused as exc:
        out["refused"] = str(exc)
        return out
    out.update(seconds=round(time.monotonic() - t0, 3), sig=log.sig, version=log.version,
               image_bytes=log.image_bytes, image_sha256=log.image_sha256,
               text={n: log.files[n].decode() for n in ("cmdline.txt", "config.txt")},
               files={n: hashlib.sha256(d).hexdigest() for n, d in log.files.items()},
               kernel_head=log.files["kernel_2712.img"][:100].decode(errors="replace"))
    if hand_over:
        out["hand_over"] = await _hand_over(out["text"]["cmdline.txt"])
    return out


def run(iface: str, serial: str, eeprom: Eeprom, collect: float, *, hold: Path | None,
        held: Path, hand_over: bool) -> dict[str, Any]:
    result = dhcp(iface, serial, collect)
    if "ip" not in result:
        return result
    try:
        host_ip = host_address(eeprom, result["ack"][0])
    except (LookupError, TimeoutError) as exc:
        result["http"] = {"refused": f"HTTP_HOST: {exc}"}
        return result
    result["http"] = asyncio.run(http_boot(eeprom, host_ip, hold=hold, held=held,
                                           hand_over=hand_over))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--serial", required=True, help="board serial (hex; low 8 digits used)")
    ap.add_argument("--eeprom", type=Path, required=True,
                    help="what `netbootd keys generate` printed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--collect", type=float, default=3.0,
                    help="seconds at most to collect the offers, and then the ACK")
    ap.add_argument("--hold", type=Path, help="wait for this file before boot.img")
    ap.add_argument("--hand-over", action="store_true",
                    help="then fetch cloud-init meta-data, as the booted OS does")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("pihttp: needs root (raw socket)", file=sys.stderr)
        return 1
    eeprom = eeprom_from(args.eeprom.read_text())
    result = run(args.iface, args.serial, eeprom, args.collect, hold=args.hold,
                 held=args.out.with_suffix(".held"), hand_over=args.hand_over)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(args.out)  # the test reads a whole result or none
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
