"""The cluster's leader on a real etcd: one leader among replicas, a dead leader replaced
within its lease, and the GC decision taken by the leader and applied by every replica."""

from __future__ import annotations

import asyncio
import os
import time

from netbootd.cluster.leader import Leadership
from netbootd.cluster.pointers import SharedStoreState
from netbootd.cluster.retire import SharedGc
from netbootd.settings import StoreSettings
from netbootd.store.build import sample_build
from netbootd.store.store import ImageStore
from tests.etcdkit import wait_for

TTL = 3.0  #: etcd's shortest lease with the test cluster's election timing


async def until(cond, bound: float, what: str) -> float:
    """Seconds until ``cond()`` holds, polling without blocking the loop."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"not within {bound} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def test_one_leader_and_a_dead_leaders_lease_hands_over(clients, prefix):
    a = Leadership(clients(), prefix, "a", TTL)
    b = Leadership(clients(), prefix, "b", TTL)
    tasks = [asyncio.create_task(x.run()) for x in (a, b)]
    try:
        await until(lambda: a.leader and a.leader == b.leader, 60, "both see one leader")
        assert [a.is_leader, b.is_leader].count(True) == 1
        leader, other = (a, b) if a.is_leader else (b, a)
        # the leader's client dies (a replica killed): no resignation, its lease runs out
        t0 = time.monotonic()
        leader.etcd.close()
        took = await until(lambda: other.is_leader, 60, "the other takes over")
        await until(lambda: not leader.is_leader, 60, "the dead one stops calling itself leader")
        print(f"takeover after the leader's client closed: {took:.2f} s (lease {TTL} s)")
        # within the lease plus a renewal period and the watch's delivery (loaded machine)
        assert took <= TTL + TTL / 3 + 5.0, took
        assert other.leader == other.name and time.monotonic() - t0 >= 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_resigning_leader_hands_over_at_once(clients, prefix):
    a = Leadership(clients(), prefix, "a", 30.0)  # a long lease: only the resign can do it
    ta = asyncio.create_task(a.run())
    await until(lambda: a.is_leader, 60, "a leads alone")
    b = Leadership(clients(), prefix, "b", 30.0)
    tb = asyncio.create_task(b.run())
    try:
        await until(lambda: b.leader == "a", 60, "b sees a lead")
        assert not b.is_leader
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        await asyncio.to_thread(a.resign)
        took = await until(lambda: b.is_leader, 25, "b leads once a resigned")
        print(f"takeover after a resignation: {took:.2f} s")
    finally:
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)


def _store(root, etcd, prefix, name, in_use: set) -> ImageStore:
    store = ImageStore(root / name / "images", root / name / "state",
                       StoreSettings(keep=1, keep_booted_hours=0, auto_activate={}),
                       shared=SharedStoreState(etcd, prefix, name))
    for v in ("1", "2", "3"):
        src = root / name / f"build-{v}"
        sample_build(src, "demo", v)
        os.rename(src, store.layout.incoming / f"demo-{v}")
        assert store.ingest_entry(f"demo-{v}").accepted
    store.in_use_hook = lambda: set(in_use)
    return store


def _presence(store: ImageStore) -> dict:
    """What the cluster service publishes for a replica."""
    return {"versions": [f"{r.name} {r.version}" for r in store.all_refs()],
            "keep": [f"{i} {v}" for i, v in store.kept_for_use()]}


def test_the_leader_decides_what_is_retired_and_every_replica_deletes_its_copy(
        clients, prefix, tmp_path):
    ea, eb = clients(), clients()
    b_in_use = {("demo", "1")}  # a boot on demo 1 is open on replica b only
    a = _store(tmp_path, ea, prefix, "a", set())
    b = _store(tmp_path, eb, prefix, "b", b_in_use)
    try:
        a.activate("demo", "3", "prod")
        wait_for(lambda: b.active("demo", "prod") == "3", 30, "b sees the activation")
        la, lb = Leadership(ea, prefix, "a", 30.0), Leadership(eb, prefix, "b", 30.0)
        assert la.step() and not lb.step() and lb.leader == "a"
        replicas = {"a": _presence(a), "b": _presence(b)}
        ga = SharedGc(ea, prefix, la, lambda: replicas)
        gb = SharedGc(eb, prefix, lb, lambda: replicas)
        # a follower decides nothing on its own, though its own rules would delete 2
        assert gb.run(b, dry_run=True) == [] and gb.run(b) == []
        assert b.versions("demo") == ["1", "2", "3"]
        # the leader retires 2 only: 1 is in use on b (published in its presence)
        assert ga.run(a) == [("demo", "2")]
        assert a.versions("demo") == ["1", "3"]
        assert gb.run(b) == [("demo", "2")] and b.versions("demo") == ["1", "3"]
        assert gb.retired == {("demo", "2")}
        # b's boot ended: the next decision retires 1 too; 2 is held nowhere: its key goes
        b_in_use.clear()
        replicas.update(a=_presence(a), b=_presence(b))
        assert ga.run(a) == [("demo", "1")]
        assert gb.run(b) == [("demo", "1")]
        assert a.versions("demo") == ["3"] == b.versions("demo")
        replicas.update(a=_presence(a), b=_presence(b))
        ga.run(a)
        assert ga.read() == set(), "retired keys of versions no replica holds are removed"
    finally:
        a.close()
        b.close()
