"""Proxy-DHCP hardening: serial spoofing, oversized option 97, ACK evidence parsing,
bounded per-client tables, and the fence around the DHCP/NFS/DNS services."""

from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp import packet as pk
from netbootd.dhcp.acks import parse_server_ack
from netbootd.dhcp.netif import Interface, Interfaces
from netbootd.dhcp.testkit import responder_for
from netbootd.inventory import load_inventory
from netbootd.neighbours import ClientAddresses
from netbootd.settings import load_settings

SERVER = "10.231.1.1"
PI_MAC = "d8:3a:dd:12:34:56"
PI_SERIAL = 0x1A2B3C4D
STRANGER = "d8:3a:dd:99:99:99"  # a Pi OUI, not in the inventory
REPO = Path(__file__).resolve().parents[2]


def make(tmp_path: Path, nodes: str, **overrides):
    (tmp_path / "nodes.yaml").write_text(nodes)
    ov = {"paths": {"state": str(tmp_path / "state")}, "policy": {"unknown": "ignore"}}
    for k, v in overrides.items():
        ov.setdefault(k, {}).update(v)
    settings = load_settings(None, ov, use_default_path=False)
    app = build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))
    ifs = Interfaces()
    ifs.by_index = {3: Interface(3, "veth0", [(SERVER, 24)])}
    return app, responder_for(app, ifs, available=frozenset({"undionly.kpxe", "ipxe.efi"}))


def ask(r, raw):
    return r.handle(raw, ifindex=3, local_ip=SERVER, peer=("0.0.0.0", 68), pxe_port=False)


def sample(app, name: str, labels: dict) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


# -- (a) a serial names a node only with that node's MAC ----------------------------------
def test_unlisted_mac_with_a_known_pis_serial_gets_nothing(tmp_path):
    _app, r = make(tmp_path, f"nodes:\n  {PI_MAC}: {{serial: {PI_SERIAL:08x}}}\n")
    assert ask(r, c.pi_discover(STRANGER, 1, PI_SERIAL)) is None
    assert ask(r, c.pi_discover(PI_MAC, 2, PI_SERIAL)) is not None  # the real Pi


@pytest.mark.parametrize("where", ["node", "profile"])
def test_match_serial_lets_the_serial_alone_identify_the_board(tmp_path, where):
    if where == "node":
        nodes = f"nodes:\n  {PI_MAC}: {{serial: {PI_SERIAL:08x}, match: serial}}\n"
    else:
        nodes = (f"profiles:\n  cm5: {{match: serial}}\n"
                 f"nodes:\n  {PI_MAC}: {{serial: {PI_SERIAL:08x}, profile: cm5}}\n")
    _app, r = make(tmp_path, nodes)
    out = ask(r, c.pi_discover(STRANGER, 1, PI_SERIAL))
    assert out is not None and b"Raspberry Pi Boot" in bytes(out.payload)


def test_serial_repeated_form_from_another_mac_is_not_that_pi(tmp_path):
    _app, r = make(tmp_path, f"nodes:\n  02:00:00:00:5e:01: {{serial: {PI_SERIAL:08x}}}\n")
    other = "02:00:00:00:5e:02"  # no Pi OUI: only the inventory could make it a Pi
    assert ask(r, c.pi_discover(other, 1, machine_id=c.pi_serial_only_id(PI_SERIAL))) is None


# -- (b) an option 97 longer than one TLV ---------------------------------------------------
def test_long_option97_is_malformed_dropped_and_counted(tmp_path):
    app, r = make(tmp_path, "nodes: {}\n", policy={"unknown": "default"})
    # Three option-97 TLVs: RFC 3396 concatenates them into 300 bytes, which the reply
    # (it echoes 97) cannot hold in one option. It used to raise struct.error in scapy.
    raw = c.request(PI_MAC, 7, [(53, bytes([pk.DISCOVER])), (93, b"\x00\x00"),
                                (97, b"\x00RPi5" + b"A" * 95), (97, b"B" * 100),
                                (97, b"C" * 100), (60, c.PI_VENDOR)])
    assert ask(r, raw) is None
    assert sample(app, "netbootd_malformed_inputs_total", {"service": "dhcp"}) == 1
    assert sample(app, "netbootd_errors_total", {"service": "dhcp"}) == 0
    assert ask(r, c.pi_discover(PI_MAC, 8)) is not None  # still answering


# -- evidence: the site server's ACK as seen on the wire -----------------------------------
def ack_frame(*, src="10.231.1.2", server_id="10.231.1.2", yiaddr="10.231.1.150",
              mtype="ack", giaddr="0.0.0.0") -> bytes:
    opts = [("message-type", mtype), ("lease_time", 600)]
    if server_id:
        opts.append(("server_id", server_id))
    return bytes(Ether(src="02:00:00:00:00:02", dst="ff:ff:ff:ff:ff:ff")
                 / IP(src=src, dst="255.255.255.255") / UDP(sport=67, dport=68)
                 / BOOTP(op=2, yiaddr=yiaddr, giaddr=giaddr,
                         chaddr=c.mac_bytes(PI_MAC) + b"\0" * 10)
                 / DHCP(options=[*opts, "end"]))


def test_server_ack_is_evidence():
    ack = parse_server_ack(ack_frame())
    assert ack is not None and (ack.ip, ack.mac, ack.server, ack.lease) == \
        ("10.231.1.150", PI_MAC, "10.231.1.2", 600.0)
    relayed = parse_server_ack(ack_frame(src="10.231.1.254", giaddr="10.231.1.254"))
    assert relayed is not None and relayed.server == "10.231.1.2"


@pytest.mark.parametrize("frame", [
    ack_frame(mtype="offer"),                    # an offer binds nothing
    ack_frame(yiaddr="0.0.0.0"),                 # a proxy's ACK (ours included)
    ack_frame(server_id=None),                   # no server identifier
    ack_frame(src="10.231.1.66"),                # sender is not the server it names
    ack_frame()[:60],                            # truncated
    b"\xff" * 400,                               # garbage
], ids=["offer", "no-yiaddr", "no-server-id", "wrong-source", "truncated", "garbage"])
def test_what_is_not_evidence(frame):
    assert parse_server_ack(frame) is None


def test_site_servers_restrict_whose_acks_count():
    assert parse_server_ack(ack_frame(), frozenset({"10.231.1.9"})) is None
    assert parse_server_ack(ack_frame(), frozenset({"10.231.1.2"})) is not None


# -- bounded tables ------------------------------------------------------------------------
def test_address_table_is_bounded_and_counts_evictions():
    evicted = []
    a = ClientAddresses(max_entries=16, use_kernel=False, evicted=lambda: evicted.append(1))
    for i in range(100):
        a.learn(f"10.231.2.{i + 1}", f"02:00:00:00:01:{i:02x}")
    assert a.sizes()["bindings"] == 16 and a.sizes()["macs"] == 16
    assert len(evicted) == 84 == a.evictions
    assert a.ip_for("02:00:00:00:01:63") == "10.231.2.100"  # the newest stays
    assert a.ip_for("02:00:00:00:01:00") is None  # the oldest went


def test_newest_address_of_a_mac_and_an_address_given_to_someone_else():
    a = ClientAddresses(use_kernel=False)
    a.learn("10.231.2.1", PI_MAC)
    a.learn("10.231.2.2", PI_MAC)
    assert a.ip_for(PI_MAC) == "10.231.2.2"
    a.learn("10.231.2.2", STRANGER)  # the server gave that address to someone else
    assert a.ip_for(PI_MAC) is None and a.mac_for("10.231.2.2") == STRANGER


def test_learnt_but_not_confirmed_is_not_ownership():
    a = ClientAddresses(use_kernel=False)
    a.learn("10.231.2.1", PI_MAC)
    assert a.owner_of("10.231.2.1") is None



def test_scapy_is_imported_by_the_warm_up_not_before_the_service_answers(tmp_path):
    """In a fresh interpreter: scapy is absent before and after start (start-up does not
    wait for it), the warm-up the daemon runs once services answer imports it, and the
    first reply then imports nothing new."""
    import subprocess
    import sys
    code = f"""
import asyncio, socket, sys
from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp.proxy import create
from netbootd.inventory import Inventory
from netbootd.settings import load_settings

def free():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

async def main():
    port, pxe = free(), free()
    s = load_settings(None, {{"dhcp": {{"port": port, "pxe_port": pxe, "bind": "127.0.0.1",
        "learn_from_acks": False}}, "policy": {{"unknown": "default"}},
        "paths": {{"state": {str(tmp_path / 'state')!r}}}}}, use_default_path=False)
    app = build_app(s, inventory=Inventory.empty())
    assert "scapy" not in sys.modules, "scapy imported before the service started"
    svc = create(app)
    await svc.start()
    assert "scapy" not in sys.modules, "scapy imported before the service answered"
    await asyncio.to_thread(svc.warm_up)
    assert "scapy.layers.dhcp" in sys.modules
    before = set(sys.modules)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
        q.bind(("127.0.0.1", 0)); q.setblocking(False)
        await loop.sock_sendto(q, c.pxe_bootserver_request("52:54:00:00:0c:01", 1,
                               "127.0.0.1"), ("127.0.0.1", pxe))
        await asyncio.wait_for(loop.sock_recv(q, 4096), 5)
    new = sorted(set(sys.modules) - before)
    assert not new, new
    await svc.stop(); app.events.close()
    print("ok")

asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO, check=False)
    assert r.stdout.strip() == "ok", r.stdout + r.stderr
