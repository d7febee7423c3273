"""The event log's memory is bounded however many machines talk to us.

A DHCP flood from random MACs once grew the daemon from 132 to 799 MB in 60 s, and
110,896 fake nodes came back after a restart from the event files. Driven through
the real proxy-DHCP responder with real DISCOVER packets.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import generate_latest

from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp.netif import Interface, Interfaces
from netbootd.dhcp.responder import Responder
from netbootd.dhcp.testkit import responder_for
from netbootd.events import EventLog
from netbootd.inventory import load_inventory
from netbootd.settings import load_settings

SERVER = "10.231.1.1"
IFINDEX = 3
KNOWN = "52:54:00:12:34:56"
BOUND = 50
FLOOD = 2000


def make(tmp_path: Path, policy: str):
    (tmp_path / "nodes.yaml").write_text(f"nodes:\n  {KNOWN}: {{hostname: known-1}}\n")
    settings = load_settings(None, {
        "paths": {"state": str(tmp_path / "state")}, "policy": {"unknown": policy},
        "events": {"max_nodes": BOUND, "ignored_sample": 8},
        "dhcp": {"rate_limit_per_mac": 1000}}, use_default_path=False)
    app = build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))
    ifs = Interfaces()
    ifs.by_index = {IFINDEX: Interface(IFINDEX, "veth0", [(SERVER, 24)])}
    return app, responder_for(app, ifs, available=frozenset({"undionly.kpxe", "ipxe.efi"}))


def random_mac() -> str:
    return "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))


def flood(responder: Responder, n: int) -> None:
    for i in range(n):
        responder.handle(c.efi_ipxe_discover(random_mac(), i), ifindex=IFINDEX,
                         local_ip=SERVER, peer=("0.0.0.0", 68), pxe_port=False)


def metric(app, name: str) -> float:
    for line in generate_latest(app.metrics.registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_flood_of_ignored_machines_makes_no_rows(tmp_path: Path):
    """policy.unknown: ignore: strangers are counted and sampled, never given a row."""
    app, r = make(tmp_path, "ignore")
    flood(r, FLOOD)
    assert len(app.events.nodes) == 0
    total, sample = app.events.ignored()
    assert total == FLOOD and len(sample) == 8
    assert metric(app, "netbootd_ignored_machine_events_total") == FLOOD
    # a fleet machine still gets its row
    r.handle(c.efi_ipxe_discover(KNOWN, 1), ifindex=IFINDEX, local_ip=SERVER,
             peer=("0.0.0.0", 68), pxe_port=False)
    assert KNOWN in app.events.nodes
    app.events.close()


def test_flood_of_booted_machines_stays_at_the_bound(tmp_path: Path):
    """policy.unknown: default: every stranger is a node, but the table keeps the most
    recent ``events.max_nodes``; evictions are counted."""
    app, r = make(tmp_path, "default")
    flood(r, FLOOD)
    assert len(app.events.nodes) == BOUND
    assert app.events.evicted == FLOOD - BOUND
    assert metric(app, "netbootd_event_nodes") == BOUND
    assert metric(app, "netbootd_event_nodes_evicted_total") == FLOOD - BOUND
    assert app.events.flush()
    app.events.close()

    # a restart replays every event in the files, but keeps at most the bound
    again = EventLog(tmp_path / "state", max_nodes=BOUND)
    assert len(again.nodes) == BOUND
    assert again.evicted >= FLOOD - BOUND
    again.close()


def test_recently_seen_node_is_not_evicted(tmp_path: Path):
    log = EventLog(None, max_nodes=3)
    for mac in ("aa:00:00:00:00:01", "aa:00:00:00:00:02", "aa:00:00:00:00:03"):
        log.record("dhcp", mac)
    log.record("tftp", "aa:00:00:00:00:01")  # seen again: now the most recent
    log.record("dhcp", "aa:00:00:00:00:04")
    assert list(log.nodes) == ["aa:00:00:00:00:03", "aa:00:00:00:00:01", "aa:00:00:00:00:04"]
    assert log.timeline("aa:00:00:00:00:02") == []
    assert [e.kind for e in log.timeline("aa:00:00:00:00:01")] == ["dhcp", "tftp"]
