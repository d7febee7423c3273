"""The node lifecycle state in a real etcd: same interface and answers as the local files,
shared between replicas, and served from memory while etcd is away."""

from __future__ import annotations

import asyncio
import logging

import pytest

from netbootd.cluster.nodestate import EtcdNodeState
from netbootd.errors import Conflict
from netbootd.nodestate import NodeRecord, Stage
from tests.etcdkit import wait_for

MAC = "dc:a6:32:00:00:01"




def test_cas_get_put_and_delete_like_the_local_files(clients, prefix):
    st = EtcdNodeState(clients(), prefix)
    assert st.get(MAC) is None
    rec = st.compare_and_set(MAC, None, NodeRecord(mac=MAC, stage=Stage.INSTALL, by="cli"))
    assert rec is not None and rec.rev > 0 and st.get(MAC) == rec
    with pytest.raises(Conflict, match="changed meanwhile"):
        st.compare_and_set(MAC, None, NodeRecord(mac=MAC, stage=Stage.LOCAL))
    with pytest.raises(Conflict, match="changed meanwhile"):
        st.compare_and_set(MAC, rec.rev + 1000, NodeRecord(mac=MAC, stage=Stage.LOCAL))
    rec2 = st.compare_and_set(MAC, rec.rev, NodeRecord(mac=MAC, stage=Stage.INSTALLING,
                                                       progress=40))
    assert rec2.rev > rec.rev and st.get(MAC).progress == 40
    rec3 = st.put(NodeRecord(mac=MAC.upper(), stage=Stage.INSTALLED))
    assert rec3.rev > rec2.rev and st.get(MAC).stage is Stage.INSTALLED
    assert [r.mac for r in st.all()] == [MAC]
    assert st.compare_and_set(MAC, rec3.rev, None) is None
    assert st.get(MAC) is None


async def test_a_write_on_one_replica_is_seen_and_watched_on_another(clients, prefix):
    a = EtcdNodeState(clients(), prefix)
    b = EtcdNodeState(clients(), prefix)
    seen: list[str] = []

    async def follow():
        async for mac in b.watch():
            seen.append(mac)

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0)  # the watcher is registered before the write
        rec = await asyncio.to_thread(
            a.compare_and_set, MAC, None, NodeRecord(mac=MAC, stage=Stage.INSTALL, by="api"))
        for _ in range(1500):
            if MAC in seen and b.get(MAC) is not None:
                break
            await asyncio.sleep(0.02)
        assert MAC in seen
        assert b.get(MAC) == rec, "the other replica holds the same record and rev"
        # CAS from the other replica with the rev it saw works, and a stale one conflicts
        await asyncio.to_thread(b.compare_and_set, MAC, rec.rev,
                                NodeRecord(mac=MAC, stage=Stage.LOCAL, by="api"))
        with pytest.raises(Conflict):
            await asyncio.to_thread(a.compare_and_set, MAC, rec.rev,
                                    NodeRecord(mac=MAC, stage=Stage.NETBOOT))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_replica_started_later_loads_every_record(clients, prefix):
    a = EtcdNodeState(clients(), prefix)
    for i in range(5):
        a.put(NodeRecord(mac=f"dc:a6:32:00:01:0{i}", stage=Stage.INSTALLED))
    b = EtcdNodeState(clients(), prefix)
    assert len(b.all()) == 5 and b.get("dc:a6:32:00:01:03").stage is Stage.INSTALLED


def test_unreachable_etcd_keeps_reads_and_refuses_writes_clearly(clients, prefix, etcd_one):
    a = EtcdNodeState(clients(), prefix)
    a.put(NodeRecord(mac=MAC, stage=Stage.INSTALLED))
    # a second client that only knows a port nobody listens on: etcd is "down" for it
    from tests.conftest import free_port
    gone = clients([f"http://127.0.0.1:{free_port()}"], timeout=0.5)
    b = EtcdNodeState(gone, prefix)
    assert b.get(MAC) is None and not gone.reachable
    with pytest.raises(Conflict, match="etcd is unreachable"):
        b.put(NodeRecord(mac=MAC, stage=Stage.LOCAL))
    # the replica that loaded its records keeps answering from memory when etcd goes
    a.etcd.endpoints = gone.endpoints
    assert a.get(MAC).stage is Stage.INSTALLED
    with pytest.raises(Conflict, match="unreachable"):
        a.put(NodeRecord(mac=MAC, stage=Stage.LOCAL))
    assert a.get(MAC).stage is Stage.INSTALLED
    wait_for(lambda: not a.etcd.reachable, 10, "unreachable flag")


def test_a_replica_started_without_etcd_reads_the_records_once_it_answers(
        clients, prefix, etcd_one, caplog):
    """One warning at start, not one per retry; the records arrive when etcd does."""
    from tests.conftest import free_port
    EtcdNodeState(clients(), prefix).put(NodeRecord(mac=MAC, stage=Stage.INSTALLED))
    late = clients([f"http://127.0.0.1:{free_port()}"], timeout=0.3)
    with caplog.at_level(logging.INFO, logger="netbootd.cluster.nodestate"):
        b = EtcdNodeState(late, prefix)
        assert b.get(MAC) is None
        wait_for(lambda: late.attempts >= 4, 30, "a few retries against nobody")
        late.endpoints = etcd_one.endpoints  # etcd answers now
        wait_for(lambda: b.get(MAC) is not None, 30, "the records read on a retry")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
    assert b.get(MAC).stage is Stage.INSTALLED


def test_the_daemon_picks_the_backend_from_the_settings(etcd_one, prefix, tmp_path):
    from netbootd.daemon import build_app
    from netbootd.inventory import Inventory
    from netbootd.nodestate import LocalNodeState
    from netbootd.settings import load_settings

    local = build_app(load_settings(None, {"paths": {"state": str(tmp_path / "s")}},
                                    use_default_path=False), inventory=Inventory.empty())
    assert isinstance(local.node_state, LocalNodeState) and local.cluster is None
    s = load_settings(None, {"paths": {"state": str(tmp_path / "s")}, "cluster": {
        "backend": "etcd", "name": "r1",
        "etcd": {"endpoints": etcd_one.endpoints, "key_prefix": prefix}}},
        use_default_path=False)
    app = build_app(s, inventory=Inventory.empty())
    try:
        assert isinstance(app.node_state, EtcdNodeState)
        assert app.planner.state is app.node_state
        assert app.cluster.health()["ok"] and app.cluster.health()["replica"] == "r1"
    finally:
        app.cluster.close()


@pytest.mark.parametrize("cluster, message", [
    ({"backend": "etcd"}, "endpoints is empty"),
    ({"etcd": {"endpoints": ["127.0.0.1:2379"]}}, "http:// or https://"),
    ({"etcd": {"key_prefix": "netbootd"}}, "start and end with '/'"),
    ({"etcd": {"cert_file": "c.pem"}}, "go together"),
    ({"name": "no spaces"}, "replica name"),
])
def test_cluster_settings_are_validated(cluster, message):
    from netbootd.settings import load_settings
    from netbootd.yamlfile import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_settings(None, {"cluster": cluster}, use_default_path=False)
