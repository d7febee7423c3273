"""Channel pointers, pins and activation history shared through a real etcd: each replica
keeps its own store directory, and an activation through any replica is seen by all."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from netbootd.cluster.etcd import Etcd
from netbootd.cluster.pointers import SharedStoreState
from netbootd.settings import StoreSettings
from netbootd.store.build import sample_build
from netbootd.store.errors import Conflict, StoreLocked
from netbootd.store.store import ImageStore
from tests.conftest import free_port
from tests.etcdkit import wait_for

MAC = "dc:a6:32:00:00:21"




@pytest.fixture
def replica(etcd_one, tmp_path):
    """replica(name, versions) -> an ImageStore with its own directory holding
    ``versions`` of image demo, its pointers and pins in etcd (one prefix per test)."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    made: list[tuple[Etcd, ImageStore]] = []

    def make(name: str, versions: tuple[str, ...] = ("1", "2")) -> ImageStore:
        client = Etcd(etcd_one.endpoints, timeout=2.0)
        root = tmp_path / name
        store = ImageStore(root / "images", root / "state", StoreSettings(),
                           shared=SharedStoreState(client, prefix, name))
        for v in versions:
            src = root / f"build-{v}"
            sample_build(src, "demo", v)
            os.rename(src, store.layout.incoming / f"demo-{v}")
            assert store.ingest_entry(f"demo-{v}").accepted
        made.append((client, store))
        return store

    yield make
    for client, store in made:
        store.close()
        client.close()


def test_an_activation_on_one_replica_is_seen_by_the_others(replica):
    a, b, c = replica("a"), replica("b"), replica("c")
    heard: list[int] = []
    b.on_change.append(lambda: heard.append(1))
    t0 = time.monotonic()
    a.activate("demo", "1", "prod", by="api")
    wait_for(lambda: b.active("demo", "prod") == "1" and c.active("demo", "prod") == "1",
             30, "activation seen by every replica")
    print(f"activation seen by both other replicas after {time.monotonic() - t0:.3f} s")
    wait_for(lambda: heard, 30, "b's store listeners (the planner) told")
    assert b.resolve("demo", "prod", None).version == "1"
    b.activate("demo", "2", "prod", by="api")
    wait_for(lambda: a.active("demo", "prod") == "2", 30, "b's activation seen by a")
    hist = [h for h in a.history("demo") if h["channel"] == "prod"]
    assert [(h["version"], h["previous"], h["replica"]) for h in hist] == [
        ("1", None, "a"), ("2", "1", "b")]
    wait_for(lambda: c.active("demo", "prod") == "2", 30, "b's activation seen by c")
    assert c.rollback("demo", "prod", by="api") == "1"  # from any replica
    wait_for(lambda: a.active("demo", "prod") == "1" == b.active("demo", "prod"), 30,
             "rollback seen everywhere")


def test_pins_are_shared(replica):
    a, b = replica("a"), replica("b")
    a.activate("demo", "1", "prod")
    a.pin(MAC, "2", "demo", by="api")
    wait_for(lambda: MAC in b.pins(), 30, "pin seen by b")
    assert b.resolve("demo", "prod", None, mac=MAC).version == "2"
    b.unpin(MAC)
    wait_for(lambda: MAC not in a.pins(), 30, "unpin seen by a")
    assert a.resolve("demo", "prod", None, mac=MAC).version == "1"


def test_activation_is_refused_clearly_while_etcd_is_unreachable(replica):
    a, b = replica("a"), replica("b")
    a.activate("demo", "1", "prod")
    wait_for(lambda: b.active("demo", "prod") == "1", 30, "seen by b")
    mirror = b.pointers.mirror
    mirror.etcd.timeout = 0.3
    mirror.etcd.endpoints = [f"http://127.0.0.1:{free_port()}"]  # etcd gone for b
    with pytest.raises(Conflict, match="refused: the cluster's etcd is unreachable from "
                                       "replica b"):
        b.activate("demo", "2", "prod", by="api")
    with pytest.raises(Conflict, match="unreachable"):
        b.pin(MAC, "2", "demo")
    # what b knew keeps serving: the channel still resolves, nothing changed
    assert b.active("demo", "prod") == "1" and b.resolve("demo", "prod", None).version == "1"
    assert a.active("demo", "prod") == "1"
    assert not mirror.etcd.reachable


def test_two_replicas_on_one_store_directory_are_refused(replica, tmp_path, etcd_one):
    """A second daemon (here: another replica's store writer) on the same images
    directory is refused with the holder's pid, not allowed to rewrite it."""
    replica("a")  # replica a's directory, pointers in etcd
    images, state = tmp_path / "a" / "images", tmp_path / "a" / "state"
    clients = [Etcd(etcd_one.endpoints), Etcd(etcd_one.endpoints)]
    first = ImageStore(images, state, StoreSettings(), writer=True,
                       shared=SharedStoreState(clients[0], "/lock-test/", "r1"))
    try:
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()} \\(daemon\\)"):
            ImageStore(images, state, StoreSettings(), writer=True,
                       shared=SharedStoreState(clients[1], "/lock-test/", "r2"))
    finally:
        first.close()
        for c in clients:
            c.close()


def test_a_replica_started_without_etcd_boots_nothing_until_it_answers(replica, etcd_one,
                                                                       tmp_path):
    a = replica("a")
    a.activate("demo", "1", "prod")
    prefix = a.pointers.mirror.prefix[: -len("store/")]
    client = Etcd([f"http://127.0.0.1:{free_port()}"], timeout=0.3)  # etcd away at start
    try:
        late = ImageStore(tmp_path / "late" / "images", tmp_path / "late" / "state",
                          StoreSettings(auto_activate={}),
                          shared=SharedStoreState(client, prefix, "late"))
        sample_build(tmp_path / "late-build", "demo", "1")
        os.rename(tmp_path / "late-build", late.layout.incoming / "demo-1")
        assert late.ingest_entry("demo-1").accepted
        assert late.active("demo", "prod") is None
        with pytest.raises(Conflict, match="refused"):
            late.activate("demo", "1", "prod")
        heard: list[int] = []
        late.on_change.append(lambda: heard.append(1))
        client.endpoints = etcd_one.endpoints  # etcd answers again
        wait_for(lambda: late.active("demo", "prod") == "1" and heard, 60,
                 "pointers read once etcd answers, listeners told")
    finally:
        client.close()
