"""Node events shared between replicas through a real etcd (netbootd/cluster/events.py):
an event one replica records shows in another's timeline of that node, naming the
replica; the ring keeps a node at N keys per replica; a revoked lease takes a
replica's events away; a full queue drops and counts; with etcd gone the timeline
still answers from memory."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from netbootd.cluster.etcd import Etcd
from netbootd.cluster.events import SharedEvents, SharedEventsCollector
from netbootd.daemon import build_app
from netbootd.events import EventLog
from netbootd.http.testkit import ServerThread
from netbootd.inventory import Inventory
from netbootd.settings import load_settings
from tests.conftest import REPO, free_port
from tests.etcdkit import EtcdCluster, wait_for

MAC = "dc:a6:32:00:00:01"
OTHER = "dc:a6:32:00:00:02"


@pytest.fixture
def replicas(etcd_one):
    """make(name, ...) -> (EventLog, SharedEvents) of one replica on its own etcd client;
    every client and log is closed at the end."""
    made: list[tuple[Etcd, EventLog, SharedEvents]] = []

    def make(name: str, prefix: str, *, endpoints: list[str] | None = None,
             timeout: float = 2.0, **kw) -> tuple[EventLog, SharedEvents]:
        client = Etcd(endpoints or etcd_one.endpoints, timeout=timeout)
        log = EventLog(None)
        shared = SharedEvents(client, prefix, name, **kw)
        shared.attach(log)
        made.append((client, log, shared))
        return log, shared

    yield make
    for client, log, shared in made:
        shared.close()
        client.close()
        log.close()


@pytest.fixture
def reader(etcd_one):
    client = Etcd(etcd_one.endpoints, timeout=2.0)
    yield client
    client.close()


def keys(client: Etcd, prefix: str) -> list[str]:
    kvs, _ = client.range_prefix(prefix)
    return [kv.key for kv in kvs]


def test_an_event_seen_on_one_replica_is_in_the_others_timeline_with_its_name(
        replicas, prefix):
    log_a, _ = replicas("rep-a", prefix)
    log_b, _ = replicas("rep-b", prefix)
    log_a.record("dhcp", MAC, "proxy offer sent", ip="10.0.0.5", outcome="ok")
    log_b.record("tftp", MAC, "served start4.elf", outcome="ok")
    for log in (log_a, log_b):
        got = wait_for(lambda log=log: len(log.timeline(MAC)) == 2 and log.timeline(MAC),
                       30, "both replicas' events in one timeline")
        assert [(e.kind, e.replica) for e in got] == [("dhcp", "rep-a"), ("tftp", "rep-b")]
        assert got[0].ts <= got[1].ts
        assert got[0].fields["ip"] == "10.0.0.5" and got[0].message == "proxy offer sent"


def test_the_ring_keeps_n_keys_per_node_and_replica(replicas, reader, prefix):
    ring = 5
    log_a, shared_a = replicas("rep-a", prefix, ring=ring)
    log_b, _ = replicas("rep-b", prefix, ring=ring)
    for i in range(4 * ring + 2):
        log_a.record("tftp", MAC, f"served file {i}", outcome="ok")
        log_a.record("http", OTHER, f"served file {i}", outcome="ok")
    # noise: one event per packet stays local
    log_a.record("dhcp", MAC, "no reply: rate", outcome="ignored", decision="rate-limited")
    wait_for(lambda: shared_a.published == 2 * (4 * ring + 2) and not shared_a.pending(),
             30, "every event written")
    for mac in (MAC, OTHER):
        assert len(keys(reader, f"{prefix}events/{mac}/rep-a/")) == ring
    newest = [f"served file {i}" for i in range(3 * ring + 2, 4 * ring + 2)]
    got = wait_for(lambda: [e.message for e in log_b.timeline(MAC)] == newest
                   and log_b.timeline(MAC), 30, "the newest ring events on the other replica")
    assert all(e.replica == "rep-a" for e in got)
    # a burst larger than one transaction: written in several, every node bounded
    many = [f"02:00:00:00:{i // 256:02x}:{i % 256:02x}" for i in range(130)]
    for mac in many:
        for step in ("dhcp", "tftp", "http"):
            log_a.record(step, mac, f"{step} ok", outcome="ok")
    wait_for(lambda: not shared_a.pending(), 30, "the burst written")
    assert shared_a.failed == 0
    assert len(keys(reader, f"{prefix}events/02:00:00:00:")) == len(many) * 3
    wait_for(lambda: all(len(log_b.timeline(m)) == 3 for m in many), 30,
             "the burst on the other replica")


def test_a_revoked_lease_takes_the_replicas_events_away(replicas, reader, prefix):
    log_a, shared_a = replicas("rep-a", prefix)
    log_b, _ = replicas("rep-b", prefix)
    log_a.record("dhcp", MAC, "proxy offer sent", outcome="ok")
    log_b.record("tftp", MAC, "served start4.elf", outcome="ok")
    wait_for(lambda: len(log_b.timeline(MAC)) == 2, 30, "rep-a's event on rep-b")
    assert shared_a.lease
    reader.call("/v3/lease/revoke", {"ID": str(shared_a.lease)})  # rep-a as if dead
    wait_for(lambda: not keys(reader, f"{prefix}events/{MAC}/rep-a/"), 30,
             "rep-a's keys gone with its lease")
    got = wait_for(lambda: len(log_b.timeline(MAC)) == 1 and log_b.timeline(MAC), 30,
                   "rep-b's timeline without rep-a's event")
    assert got[0].replica == "rep-b"
    # a replica whose lease went takes a new one at its next write
    log_a.record("kernel", MAC, "kernel handed over", outcome="ok")
    wait_for(lambda: [e.kind for e in log_b.timeline(MAC)] == ["tftp", "kernel"], 30,
             "rep-a's next event on a new lease")
    assert shared_a.failed >= 1


def test_a_full_queue_drops_and_counts_and_the_timeline_answers_locally(replicas, prefix):
    nobody = [f"http://127.0.0.1:{free_port()}"]  # no etcd there: nothing leaves the queue
    log, shared = replicas("rep-a", prefix, endpoints=nobody, timeout=0.2, queue=5)
    for i in range(12):
        log.record("tftp", MAC, f"served file {i}", outcome="ok")
    log.record("booted", None, "a daemon event: not a node's")
    assert shared.pending() == 5 and shared.dropped == 7
    metrics = {m.name: m.samples[0].value for m in SharedEventsCollector(shared).collect()}
    assert metrics["netbootd_cluster_events_dropped"] == 7
    assert metrics["netbootd_cluster_events_queued"] == 5
    started = time.monotonic()
    got = log.timeline(MAC)
    assert time.monotonic() - started < 0.5, "the timeline never waits for etcd"
    assert [e.message for e in got] == [f"served file {i}" for i in range(12)]
    assert {e.replica for e in got} == {"rep-a"}


def test_with_etcd_gone_a_timeline_answers_with_what_it_holds(tmp_path, prefix):
    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    made: list[tuple[Etcd, EventLog, SharedEvents]] = []
    try:
        for name in ("rep-a", "rep-b"):
            client = Etcd(etcd.endpoints, timeout=0.5)
            log = EventLog(None)
            shared = SharedEvents(client, prefix, name)
            shared.attach(log)
            made.append((client, log, shared))
        (_, log_a, _), (_, log_b, shared_b) = made
        log_a.record("dhcp", MAC, "proxy offer sent", outcome="ok")
        wait_for(lambda: len(log_b.timeline(MAC)) == 1, 30, "rep-a's event on rep-b")
        etcd.stop(0)
        log_b.record("tftp", MAC, "served start4.elf", outcome="ok")
        started = time.monotonic()
        got = log_b.timeline(MAC)
        assert time.monotonic() - started < 0.5, "the timeline never waits for etcd"
        assert [(e.kind, e.replica) for e in got] == [("dhcp", "rep-a"), ("tftp", "rep-b")]
        assert shared_b.pending() == 1  # kept until etcd answers again
    finally:
        for client, log, shared in made:
            shared.close(timeout=0.5)
            client.close()
            log.close()
        etcd.close()


def test_the_api_and_status_page_show_the_other_replicas_events(etcd_one, tmp_path, prefix):
    """The daemon's own wiring (cluster.backend: etcd): rep-b's /api/v1/nodes/<mac> and
    status page show what rep-a saw."""
    log_a_client = Etcd(etcd_one.endpoints, timeout=2.0)
    log_a = EventLog(None)
    SharedEvents(log_a_client, prefix, "rep-a").attach(log_a)
    settings = load_settings(None, {
        "paths": {"images": str(tmp_path / "images"), "state": str(tmp_path / "state"),
                  "templates": str(REPO / "config" / "templates")},
        "http": {"port": free_port(), "bind": "127.0.0.1", "read_open": True},
        "dhcp": {"enabled": False}, "tftp": {"enabled": False},
        "policy": {"unknown": "default"},
        "cluster": {"backend": "etcd", "name": "rep-b",
                    "etcd": {"endpoints": etcd_one.endpoints, "key_prefix": prefix}},
    }, use_default_path=False)
    app = build_app(settings, inventory=Inventory.empty())
    try:
        with ServerThread(app) as srv:
            log_a.record("dhcp", MAC, "proxy offer sent", outcome="ok")
            log_a.record("dhcp", OTHER, "proxy offer sent", outcome="ok")
            app.events.record("tftp", MAC, "served start4.elf", outcome="ok")
            wait_for(lambda: len(app.events.timeline(MAC)) == 2
                     and app.events.timeline(OTHER), 30, "rep-a's events on rep-b")
            status, body = get(srv.url + f"/api/v1/nodes/{MAC}")
            assert status == 200, body
            timeline = json.loads(body)["timeline"]
            assert [(t["kind"], t["replica"]) for t in timeline] == [
                ("dhcp", "rep-a"), ("tftp", "rep-b")]
            status, body = get(srv.url + f"/api/v1/nodes/{OTHER}")  # only rep-a saw it
            assert status == 200, body
            assert [t["replica"] for t in json.loads(body)["timeline"]] == ["rep-a"]
            status, page = get(srv.url + f"/?node={MAC}")
            assert status == 200 and "proxy offer sent" in page and "rep-a" in page
            metrics = get(srv.url + "/metrics")[1]
            assert "netbootd_cluster_events_published" in metrics
    finally:
        app.cluster.close()
        log_a_client.close()
        log_a.close()


def get(url: str) -> tuple[int, str]:
    async def go() -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status, await r.text()
    return asyncio.run(go())


def test_local_backend_shares_nothing(tmp_path: Path):
    settings = load_settings(None, {"paths": {"state": str(tmp_path / "state")}},
                             use_default_path=False)
    app = build_app(settings, inventory=Inventory.empty())
    try:
        assert app.cluster is None and app.events.others is None
        app.events.record("dhcp", MAC, "proxy offer sent", outcome="ok")
        assert [e.replica for e in app.events.timeline(MAC)] == [""]
    finally:
        app.events.close()
