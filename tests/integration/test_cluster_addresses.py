"""Learnt client addresses shared between replicas through a real etcd: evidence one
replica saw is evidence on the others (never ownership), expires with its lease, a
renewing client does not rewrite etcd per ACK, and every table and queue stays bounded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from netbootd.cluster.addresses import SharedAddresses
from netbootd.cluster.etcd import Etcd
from netbootd.neighbours import ClientAddresses
from tests.conftest import free_port
from tests.etcdkit import wait_for

MAC = "dc:a6:32:00:00:01"
OTHER = "dc:a6:32:00:00:02"
#: TEST-NET-2: an address no neighbour table on this host has an entry for.
IP = "198.51.100.7"
BOUND = 60.0  #: generous: a loaded 2-core machine


Replica = tuple[ClientAddresses, SharedAddresses]


@pytest.fixture
def replica(clients, prefix):
    """``replica(name)``: a ClientAddresses whose learnt evidence is shared through etcd,
    as the cluster service wires it (started: loaded and watching)."""
    made: list[SharedAddresses] = []

    def make(name: str, *, max_entries: int = 64, use_kernel: bool = False,
             etcd: Etcd | None = None, queue_max: int | None = None) -> Replica:
        table = ClientAddresses(use_kernel=use_kernel, max_entries=max_entries)
        shared = SharedAddresses(etcd or clients(), prefix, name, table,
                                 max_entries=max_entries, queue_max=queue_max)
        shared.start()
        made.append(shared)
        return table, shared

    yield make
    for shared in made:
        shared.stop()


def stored(etcd: Etcd, prefix: str, ip: str) -> tuple[dict, int, int] | None:
    """(value, mod revision, lease) of an address's key, or None."""
    kv = etcd.get(f"{prefix}addresses/{ip}")
    return (json.loads(kv.value), kv.mod_revision, kv.lease) if kv is not None else None


def learning(table: ClientAddresses, ip: str, mac: str, lease: float,
             done: Callable[[], bool]) -> Callable[[], bool]:
    """A wait_for condition that renews the binding (an ACK) at every poll."""
    def step() -> bool:
        table.learn(ip, mac, lease=lease)
        return done()
    return step


def test_evidence_learnt_on_one_replica_is_evidence_on_the_other(replica, clients, prefix):
    a, _ = replica("a")
    b, sb = replica("b")
    t0 = time.time()
    assert a.learn(IP, MAC, lease=600)
    wait_for(lambda: b.mac_for(IP) == MAC, BOUND, "B attributes the address A learnt")
    assert b.ip_for(MAC) == IP
    value, rev, lease = stored(clients(), prefix, IP)
    assert value["mac"] == MAC and value["replica"] == "a" and value["evidence"] == "dhcp-ack"
    assert t0 + 600 - 1 <= value["expires"] <= time.time() + 600 + 1
    assert 599 <= value["lease"] <= 600
    assert lease != 0, "the key lives on an etcd lease"
    # evidence, never ownership: B's owner_of still asks its own kernel neighbour table
    assert b.owner_of(IP) is None and a.owner_of(IP) is None
    assert b.confirmed([MAC]) == {}
    # no echo: B learnt it from etcd and wrote nothing back
    assert sb.learnt >= 1 and sb.written == 0 and sb.health()["pending"] == 0
    assert stored(clients(), prefix, IP)[1] == rev
    # a replica started later loads it
    c, _ = replica("c")
    assert c.mac_for(IP) == MAC


def test_owner_of_needs_the_local_kernel_table_whatever_etcd_says(replica):
    a, _ = replica("a")
    b, _ = replica("b", use_kernel=True)
    a.learn(IP, MAC, lease=600)
    wait_for(lambda: b.ip_for(MAC) == IP, BOUND, "B holds the shared evidence")
    # the kernel has no neighbour entry for a TEST-NET address: nothing is owned
    assert b.owner_of(IP) is None
    assert b.confirmed([MAC]) == {}


def test_a_moved_binding_is_written_again_and_followed_everywhere(replica, clients, prefix):
    a, sa = replica("a")
    b, sb = replica("b")
    a.learn(IP, MAC, lease=600)
    wait_for(lambda: b.mac_for(IP) == MAC, BOUND, "B learns A's binding")
    b.learn(IP, OTHER, lease=600)  # B saw the site server give the address to another MAC
    wait_for(lambda: a.mac_for(IP) == OTHER, BOUND, "A follows the move B saw")
    assert a.ip_for(MAC) is None and a.ip_for(OTHER) == IP
    value, _, _ = stored(clients(), prefix, IP)
    assert value["mac"] == OTHER and value["replica"] == "b"
    assert sa.written == 1 and sb.written == 1


def test_a_renewing_client_does_not_rewrite_etcd_per_ack(replica, clients, prefix):
    a, sa = replica("a")
    etcd = clients()
    a.learn(IP, MAC, lease=600)
    wait_for(lambda: sa.written == 1, BOUND, "the first write")
    _, rev, _ = stored(etcd, prefix, IP)
    requests = sa.etcd.requests
    for _ in range(200):
        a.learn(IP, MAC, lease=600)
    assert sa.coalesced >= 200 and sa.written == 1
    assert stored(etcd, prefix, IP)[1] == rev, "200 renewals, no write"
    assert sa.etcd.requests == requests, "nor any other round trip"
    # once more than half of the written lease has passed, a renewal writes it once
    short = "198.51.100.8"
    t0 = time.monotonic()
    a.learn(short, MAC, lease=6)
    wait_for(lambda: stored(etcd, prefix, short), BOUND, "the short binding's first write")
    first = stored(etcd, prefix, short)[0]["expires"]
    wait_for(learning(a, short, MAC, 6, lambda: sa.written == 3), BOUND,
             "a renewal past half the lease is written")
    assert time.monotonic() - t0 > 3.0, "not before half of the lease passed"
    wait_for(lambda: stored(etcd, prefix, short)[0]["expires"] > first + 3, BOUND,
             "the rewritten binding in etcd")
    assert sa.written == 3


def test_a_binding_expires_everywhere_with_its_lease(replica, clients, prefix):
    a, _ = replica("a")
    b, _ = replica("b")
    a.learn(IP, MAC, lease=3)
    wait_for(lambda: b.mac_for(IP) == MAC, BOUND, "B learns the short binding")
    wait_for(lambda: b.mac_for(IP) is None and a.mac_for(IP) is None, BOUND,
             "the binding expires on both replicas")
    wait_for(lambda: stored(clients(), prefix, IP) is None, BOUND,
             "its key vanishes with its etcd lease")
    c, sc = replica("c")
    assert c.mac_for(IP) is None and sc.learnt == 0


def test_the_tables_stay_bounded(replica, clients, prefix):
    a, sa = replica("a", max_entries=64)
    b, sb = replica("b", max_entries=8)
    ips = [f"198.51.100.{i}" for i in range(10, 50)]
    for i, ip in enumerate(ips):
        a.learn(ip, f"02:00:00:00:01:{i:02x}", lease=600)
    wait_for(lambda: sa.written == len(ips), BOUND, "A published every binding")
    wait_for(lambda: sb.learnt == len(ips), BOUND, "B saw every binding")
    assert b.sizes()["bindings"] <= 8 and sb.health()["known"] <= 8
    assert b.evictions >= len(ips) - 8
    newest = [f"198.51.100.{i}" for i in range(50, 58)]
    for i, ip in enumerate(newest):
        a.learn(ip, f"02:00:00:00:03:{i:02x}", lease=600)
    wait_for(lambda: sa.written == len(ips) + len(newest), BOUND, "the newest bindings")
    c, sc = replica("c", max_entries=8)  # loads the 8 most recently written
    assert sc.learnt == 8 and c.sizes()["bindings"] == 8 and sc.health()["known"] == 8
    assert all(c.mac_for(ip) for ip in newest)


def test_the_write_queue_is_bounded_and_never_blocks_learning(replica, clients):
    gone = clients([f"http://127.0.0.1:{free_port()}"], timeout=5.0)
    a, sa = replica("a", etcd=gone, queue_max=4)
    assert not sa.loaded and not gone.reachable
    t0 = time.monotonic()
    for i in range(10):
        assert a.learn(f"198.51.100.{60 + i}", f"02:00:00:00:02:{i:02x}", lease=600)
    assert time.monotonic() - t0 < gone.timeout, "learning never waits for etcd"
    assert sa.health()["pending"] == 4 and sa.dropped == 6
    assert a.sizes()["bindings"] == 10, "the local evidence is all there"


async def test_the_cluster_service_shares_the_daemons_addresses(etcd_one, prefix, tmp_path):
    from netbootd.cluster.service import ClusterService
    from netbootd.daemon import build_app
    from netbootd.inventory import Inventory
    from netbootd.settings import load_settings

    local = build_app(load_settings(None, {"paths": {"state": str(tmp_path / "l")}},
                                    use_default_path=False), inventory=Inventory.empty())
    assert local.cluster is None and local.clients.publish is None

    def app(name: str):
        s = load_settings(None, {"paths": {"state": str(tmp_path / name)}, "cluster": {
            "backend": "etcd", "name": name, "replicate": False,
            "etcd": {"endpoints": etcd_one.endpoints, "key_prefix": prefix}}},
            use_default_path=False)
        return build_app(s, inventory=Inventory.empty())

    apps = [app("r1"), app("r2")]
    services = [ClusterService(x) for x in apps]
    try:
        for svc in services:
            await svc.start()
        r1, r2 = (x.clients for x in apps)
        assert r1.publish == services[0].addresses.offer
        r1.learn(IP, MAC, lease=600)  # what the DHCP service does with a site server's ACK
        t0 = time.monotonic()
        while r2.mac_for(IP) != MAC:
            assert time.monotonic() - t0 < BOUND, "r2 never learnt r1's binding"
            await asyncio.sleep(0.05)
        assert services[1].health()["addresses"]["learnt_from_peers"] == 1
    finally:
        for svc in services:
            await svc.stop()
        for x in apps:
            x.cluster.close()
    assert r1.publish is None, "a stopped service publishes nothing"
