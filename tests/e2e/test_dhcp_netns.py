"""Proxy-DHCP beside a real site DHCP server, on a bridge inside test-made namespaces.

Topology (lab.md): ``sw`` holds a bridge; ``dhcp`` runs dnsmasq (address pool only, the
"site" server), ``srv`` runs netbootd's DHCP service (``python -m netbootd.dhcp``), ``cli``
is where clients live: raw Ethernet frames for the Pi and PXE clients (so the source is
0.0.0.0:68 with any MAC, exactly as firmware sends), busybox udhcpc as a plain client,
and tcpdump writing a pcap that proves who got *no* packet. Everything is torn down in
``finally``: PIDs from ``ip netns pids`` are killed, then the namespaces deleted.
"""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest
from pyroute2 import netns as pynetns
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.lab.tools import require
from tests.e2e.dhcplan import DhcpLan, Port, dhcp_lan, sh, wait_line

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
]

LOCAL_MAC = "52:54:00:00:0a:01"
IGNORE_MAC = "52:54:00:00:0a:02"
INV_PI_MAC = "02:00:00:00:5e:01"  # not a Pi OUI: known as a Pi only through the inventory
INV_PI_SERIAL = 0x0BADCAFE
ETH_P_ALL = 0x0003


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require(["ip", "dnsmasq", "busybox", "tcpdump"])  # root and the tools: fails, never skips
    with dhcp_lan(tmp_path_factory.mktemp("dhcp-lab"), "nbdh", [Port("cli", 50)],
                  "profiles:\n  default: {action: netboot}\nnodes:\n"
                  f"  {LOCAL_MAC}: {{action: local}}\n  {IGNORE_MAC}: {{action: ignore}}\n"
                  f"  {INV_PI_MAC}: {{serial: {INV_PI_SERIAL:08x}}}\n") as lan:
        yield lan


@contextmanager
def capture(lab: DhcpLan, name: str):
    """tcpdump on the client's link for the duration; yields the pcap path."""
    path = lab.tmp / f"{name}.pcap"
    p = lab.spawn("cli", "tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-w", str(path),
                  "udp port 67 or udp port 68 or udp port 4011",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_line(p, p.stderr, "listening on", 10)
    try:
        yield path
    finally:
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=5)


@contextmanager
def raw_link(lab: DhcpLan):
    """An AF_PACKET socket on the client namespace's eth0 (created inside that netns)."""
    pynetns.pushns(lab.ns("cli"))
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind(("eth0", 0))
    finally:
        pynetns.popns()
    try:
        yield s
    finally:
        s.close()


def send_from_0(sock: socket.socket, mac: str, payload: bytes) -> None:
    """As firmware does: 0.0.0.0:68 -> 255.255.255.255:67, Ethernet broadcast."""
    frame = (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
             / UDP(sport=68, dport=67) / Raw(payload))
    sock.send(bytes(frame))


def replies(sock: socket.socket, xid: int, seconds: float) -> list[Ether]:
    """Every BOOTP reply with ``xid`` seen on the link within ``seconds``."""
    out, end = [], time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < end:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        pkt = Ether(data)
        if UDP in pkt and pkt[UDP].dport == 68 and BOOTP in pkt and pkt[BOOTP].op == 2 \
                and pkt[BOOTP].xid == xid:
            out.append(pkt)
    return out


def raw_opt(bootp: BOOTP, code: int) -> bytes | None:
    raw = bytes(bootp)
    return pk.parse(b"\x01" + raw[1:]).options.get(code)


def from_server(lab: DhcpLan, pkts) -> list:
    return [p for p in pkts if IP in p and p[IP].src == lab.server and UDP in p
            and p[UDP].sport in (67, 4011)]


@pytest.mark.parametrize("mac,machine_id", [
    ("d8:3a:dd:77:00:01", c.pi_machine_id("d8:3a:dd:77:00:01", 0x1A2B3C4D, b"RPi5")),
    ("d8:3a:dd:77:00:02", c.pi_machine_id("d8:3a:dd:77:00:02", 0x1A2B3C4E, b"5iPR")),
    (INV_PI_MAC, c.pi_serial_only_id(INV_PI_SERIAL)),
], ids=["tag-RPi5", "tag-5iPR", "inventory-only"])
def test_pi5_gets_broadcast_proxy_offer(lab, mac, machine_id):
    xid = secrets.randbits(32)
    with raw_link(lab) as s:
        send_from_0(s, mac, c.pi_discover(mac, xid, machine_id=machine_id))
        got = replies(s, xid, 1.5)
    ours = from_server(lab, got)
    assert len(ours) == 1, f"expected one proxy offer, got {[p.summary() for p in got]}"
    p = ours[0]
    assert p[Ether].dst == "ff:ff:ff:ff:ff:ff" and p[IP].dst == "255.255.255.255"
    b = p[BOOTP]
    opts = {o[0]: o[1] for o in b[DHCP].options if isinstance(o, tuple)}
    assert opts["message-type"] == pk.OFFER
    assert b.yiaddr == "0.0.0.0"
    assert b"Raspberry Pi Boot" in raw_opt(b, 43)
    assert opts["server_id"] == b.siaddr == lab.server
    assert raw_opt(b, 66) == lab.server.encode()
    assert raw_opt(b, 97) == machine_id
    # The site server answered the same DISCOVER with an address: both coexist.
    site = [q for q in got if IP in q and q[IP].src == lab.site]
    assert site and site[0][BOOTP].yiaddr.startswith(lab.net)


def test_plain_client_gets_address_from_site_and_nothing_from_netbootd(lab):
    with capture(lab, "udhcpc") as pcap:
        r = subprocess.run(["ip", "netns", "exec", lab.ns("cli"), "busybox", "udhcpc", "-i",
                            "eth0", "-n", "-q", "-f", "-t", "4", "-T", "1", "-s", "/bin/true"],
                           check=False, capture_output=True, text=True, timeout=30)
    assert "obtained" in r.stdout + r.stderr, r.stdout + r.stderr
    cli_mac = sh("ip", "-n", lab.ns("cli"), "-br", "link", "show", "eth0").stdout.split()[2]
    pkts = rdpcap(str(pcap))
    to_client = [p for p in pkts if BOOTP in p and p[BOOTP].op == 2
                 and p[BOOTP].chaddr[:6] == c.mac_bytes(cli_mac)]
    assert any(p[IP].src == lab.site for p in to_client), "dnsmasq did not answer udhcpc"
    assert from_server(lab, to_client) == [], "netbootd answered a plain DHCP client"


def test_local_and_ignored_machines_get_no_packet(lab):
    with capture(lab, "policy") as pcap, raw_link(lab) as s:
        for mac in (LOCAL_MAC, IGNORE_MAC):
            send_from_0(s, mac, c.efi_ipxe_discover(mac, secrets.randbits(32)))
            send_from_0(s, mac, c.bios_pxe_discover(mac, secrets.randbits(32)))
        time.sleep(1.0)
    pkts = rdpcap(str(pcap))
    requests = [p for p in pkts if BOOTP in p and p[BOOTP].op == 1]
    assert len(requests) == 4  # the capture saw what we sent
    for mac in (LOCAL_MAC, IGNORE_MAC):
        mine = [p for p in pkts if BOOTP in p and p[BOOTP].op == 2
                and p[BOOTP].chaddr[:6] == c.mac_bytes(mac)]
        assert from_server(lab, mine) == [], f"netbootd answered {mac}"
    events = (lab.tmp / "state" / "events.jsonl").read_text()
    assert f'"mac":"{LOCAL_MAC}"' in events and '"outcome":"ignored"' in events


def test_bios_pxe_boot_server_request_on_4011_gets_ack_with_boot_file(lab):
    mac = "52:54:00:00:0b:01"
    pynetns.pushns(lab.ns("cli"))
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"{lab.net}.50", 0))
    finally:
        pynetns.popns()
    with s:
        s.settimeout(2)
        s.sendto(c.pxe_bootserver_request(mac, 0x4011, f"{lab.net}.50"), (lab.server, 4011))
        data, peer = s.recvfrom(4096)
    assert peer == (lab.server, 4011)
    b = BOOTP(data)
    opts = {o[0]: o[1] for o in b[DHCP].options if isinstance(o, tuple)}
    assert opts["message-type"] == pk.ACK
    assert opts["boot-file-name"] == b"undionly.kpxe"
    assert b.file.rstrip(b"\0") == b"undionly.kpxe"
    assert b.yiaddr == "0.0.0.0" and opts["server_id"] == lab.server


def test_address_change_is_picked_up_without_restart(lab):
    """netif tracks addresses live: a new primary address shows up in replies."""
    srv = lab.ns("srv")
    sh("ip", "-n", srv, "addr", "flush", "dev", "eth0")
    sh("ip", "-n", srv, "addr", "add", f"{lab.net}.9/24", "dev", "eth0")
    try:
        time.sleep(0.5)
        mac = "d8:3a:dd:77:00:09"
        xid = secrets.randbits(32)
        with raw_link(lab) as s:
            send_from_0(s, mac, c.pi_discover(mac, xid))
            got = replies(s, xid, 1.5)
        ours = [p for p in got if IP in p and p[IP].src == f"{lab.net}.9"]
        assert ours and ours[0][BOOTP].siaddr == f"{lab.net}.9"
    finally:
        sh("ip", "-n", srv, "addr", "flush", "dev", "eth0")
        sh("ip", "-n", srv, "addr", "add", f"{lab.server}/24", "dev", "eth0")
        time.sleep(0.3)
