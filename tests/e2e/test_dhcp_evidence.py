"""Address evidence in real namespaces: forged DHCP does not move a node's address.

Topology: ``sw`` holds a bridge; ``dhcp`` runs dnsmasq (the site server, address pool
only); ``srv`` runs ``python -m netbootd.dhcp`` (which watches for the site server's
ACKs); ``node`` is the real machine (busybox udhcpc with the node's MAC); ``evil`` is a
LAN neighbour with its own MAC and address that sends DHCP packets carrying the
node's MAC as chaddr. The ownership check runs in this process inside ``srv`` against
that namespace's real kernel neighbour table. Everything is removed in ``finally``.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pyroute2 import netns as pynetns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.inventory import load_inventory
from netbootd.lab.tools import require
from netbootd.neighbours import ClientAddresses
from netbootd.nfs.service import NfsService
from netbootd.settings import load_settings
from netbootd.views import InventoryNodes, hooks
from tests.conftest import wait_for
from tests.e2e.dhcplan import DhcpLan, Port, dhcp_lan, sh

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
]

NODE_MAC = "02:00:00:e1:00:01"
EVIL_MAC = "02:00:00:e1:00:66"


@contextmanager
def in_ns(name: str) -> Iterator[None]:
    pynetns.pushns(name)
    try:
        yield
    finally:
        pynetns.popns()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require(["ip", "dnsmasq", "busybox"])  # root and the tools: fails, never skips
    with dhcp_lan(tmp_path_factory.mktemp("evidence"), "nbev",
                  [Port("node", mac=NODE_MAC), Port("evil", 66, EVIL_MAC)],
                  f"profiles:\n  default: {{action: netboot}}\nnodes:\n"
                  f"  {NODE_MAC}: {{hostname: node-01}}\n", subnets=range(200, 250)) as lan:
        yield lan


def evil_ip(lab: DhcpLan) -> str:
    return f"{lab.net}.66"


def udhcpc(lab: DhcpLan) -> str:
    """The real node asks the site server for an address (broadcast flag set, so the
    ACK reaches every port of the bridge); returns the address it was given."""
    r = subprocess.run(["ip", "netns", "exec", lab.ns("node"), "busybox", "udhcpc", "-i",
                        "eth0", "-n", "-q", "-f", "-B", "-t", "5", "-T", "1", "-s",
                        "/bin/true"], check=False, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    for line in out.splitlines():
        if "obtained" in line:  # "udhcpc: lease of 10.231.x.y obtained from ..."
            return line.split(" of ", 1)[1].split()[0]
    raise AssertionError(f"udhcpc got no address: {out}")


def evil_sends(lab: DhcpLan, payload: bytes, src_ip: str) -> None:
    """A broadcast DHCP packet from the evil namespace: its own Ethernet address, the
    node's MAC only inside the DHCP payload (chaddr), as any LAN host can do."""
    with in_ns(lab.ns("evil")):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind(("eth0", 0))
    with s:
        frame = (Ether(src=EVIL_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / IP(src=src_ip, dst="255.255.255.255") / UDP(sport=68, dport=67)
                 / Raw(payload))
        s.send(bytes(frame))


def test_forged_request_and_inform_do_not_move_the_node(lab):
    # 1. The real node gets its address from the site server; netbootd sees the ACK.
    node_ip = udhcpc(lab)
    wait_for(lambda: node_ip in lab.learnt(NODE_MAC), 10, "the site server's ACK to be learnt")
    sh("ip", "-n", lab.ns("node"), "addr", "add", f"{node_ip}/24", "dev", "eth0")

    # 2. A neighbour forges a REQUEST (option 50 = its address) and an INFORM (ciaddr =
    #    its address) with the node's MAC as chaddr, as iPXE would (netbootd answers).
    before = len(lab.events())
    evil_sends(lab, c.request(NODE_MAC, 0xE1, [
        (53, bytes([pk.REQUEST])), (50, socket.inet_aton(evil_ip(lab))), (93, b"\x00\x07"),
        (60, c.OVMF_PXE_VENDOR), (77, b"iPXE")]), "0.0.0.0")
    evil_sends(lab, c.request(NODE_MAC, 0xE2, [
        (53, bytes([pk.INFORM])), (93, b"\x00\x07"), (60, c.OVMF_PXE_VENDOR),
        (77, b"iPXE")],
        ciaddr=evil_ip(lab)), evil_ip(lab))
    # netbootd handled both (its ACKs are recorded): only then is "nothing learnt" news.
    wait_for(lambda: sum(1 for e in lab.events()[before:] if e.get("kind") == "dhcp"
                      and e.get("mac") == NODE_MAC
                      and e["fields"].get("decision") == "ack") >= 2,
          10, "netbootd to answer the forged packets")
    assert evil_ip(lab) not in lab.learnt(NODE_MAC)
    assert lab.learnt(NODE_MAC)[-1] == node_ip

    # 3. Ownership in srv's real kernel neighbour table: both hosts talk to the server.
    for role in ("node", "evil"):
        sh("ip", "netns", "exec", lab.ns(role), "busybox", "ping", "-c", "1", "-W", "2",
           lab.server)
    with in_ns(lab.ns("srv")):
        addresses = ClientAddresses()
        addresses.learn(node_ip, NODE_MAC)  # what the daemon learnt (events above)
        assert addresses.owner_of(node_ip) == NODE_MAC
        assert addresses.owner_of(evil_ip(lab)) != NODE_MAC  # the kernel names evil there
        # Even if a forged ACK had been believed, the kernel names the evil MAC there:
        forged = ClientAddresses()
        forged.learn(evil_ip(lab), NODE_MAC)
        assert forged.owner_of(evil_ip(lab)) is None
        inv = load_inventory(lab.tmp / "nodes.yaml")
        settings = load_settings(lab.tmp / "netbootd.yaml")
        nodes = InventoryNodes(lambda: inv, forged, lambda: settings)
        assert not nodes.owns(NODE_MAC, evil_ip(lab))
        nodes = InventoryNodes(lambda: inv, addresses, lambda: settings)
        assert nodes.owns(NODE_MAC, node_ip)
        assert not nodes.owns(NODE_MAC, evil_ip(lab))

        async def from_the_event_loop() -> tuple[bool, bool]:
            # where the HTTP handlers ask (netlink must still answer on a loop's thread)
            fresh = ClientAddresses()
            fresh.learn(node_ip, NODE_MAC)
            on_loop = InventoryNodes(lambda: inv, fresh, lambda: settings)
            return on_loop.owns(NODE_MAC, node_ip), on_loop.owns(NODE_MAC, evil_ip(lab))

        assert asyncio.run(from_the_event_loop()) == (True, False)


class _NoVersions:
    """No stored versions (this test is about the state export only)."""

    def refs(self) -> list:
        return []

    def subscribe(self, callback) -> Callable[[], None]:
        return lambda: None


def test_state_export_follows_only_a_confirmed_settled_address(lab, tmp_path):
    """NFS: a learnt address is used for the read-write export only once the kernel
    neighbour table confirms it and it stayed unchanged ``nfs.state_settle_seconds``;
    a forged move (kernel names another MAC) never re-points it."""
    settle = 1.0
    (tmp_path / "nodes.yaml").write_text(f"nodes:\n  {NODE_MAC}: {{hostname: node-01}}\n")
    settings = load_settings(None, {"paths": {"state": str(tmp_path / "state")},
                                    "nfs": {"state_settle_seconds": settle}},
                             use_default_path=False)
    inv = load_inventory(tmp_path / "nodes.yaml")
    addresses = ClientAddresses()
    svc = NfsService(settings, versions=_NoVersions(),
                     nodes=InventoryNodes(lambda: inv, addresses, lambda: settings),
                     addresses=addresses, on_reload=hooks([]))
    ns = lab.ns("srv")
    ip1, ip2 = f"{lab.net}.171", f"{lab.net}.172"

    def state_to() -> str | None:
        with in_ns(ns):
            return next((e.clients for e in svc.desired() if e.rw), None)

    try:
        sh("ip", "-n", ns, "neigh", "replace", ip1, "lladdr", NODE_MAC, "dev", "eth0",
           "nud", "permanent")
        addresses.learn(ip1, NODE_MAC)
        t0 = time.monotonic()
        assert state_to() is None, "exported on the first sighting"
        wait_for(lambda: state_to() == ip1, 10, "the confirmed address to settle")
        assert time.monotonic() - t0 >= settle

        # A forged ACK moves the learnt address; the kernel says another MAC is there.
        sh("ip", "-n", ns, "neigh", "replace", ip2, "lladdr", EVIL_MAC, "dev", "eth0",
           "nud", "permanent")
        addresses.learn(ip2, NODE_MAC)
        t1 = time.monotonic()
        wait_for(lambda: time.monotonic() - t1 > settle * 1.5, 10, "the settle time to pass")
        assert state_to() == ip1, "a forged address re-pointed the read-write export"

        # The node really moved: the kernel confirms, and after settling it follows.
        sh("ip", "-n", ns, "neigh", "replace", ip2, "lladdr", NODE_MAC, "dev", "eth0",
           "nud", "permanent")
        wait_for(lambda: state_to() == ip2, 10, "the genuine move to settle")
    finally:
        for ip in (ip1, ip2):
            sh("ip", "-n", ns, "neigh", "del", ip, "dev", "eth0", check=False)
