"""The plan a booted OS runs with, shared through a real etcd: at hand-over the boot's
claim becomes a booted record every replica follows, so the OS's later requests
(cloud-init, lifecycle reports, events) reaching a replica that saw nothing of its boot
are answered for the version it runs; the record is never an open firmware session,
expires after ``boot.os_plan_ttl`` and goes with an operator's verb."""

from __future__ import annotations

import logging
import time

from tests.etcdkit import wait_for
from tests.integration.planners import MAC, OTHER, PI, ReplicaStore


def handed_over_on(planner, shared, others, mac=MAC):
    """The firmware of ``mac`` hands over on ``planner``'s replica; returns its plan once
    every replica in ``others`` has heard of the booted record."""
    plan = planner.current(mac)
    planner.handed_over(mac)
    wait_for(lambda: all(s.booted_record(mac) is not None for s in others), 30,
             "the booted record reaches every replica")
    return plan


def test_a_replica_that_saw_nothing_answers_the_booted_os_with_its_version(planners):
    a, sa = planners("a", ReplicaStore("1", {"1", "2"}))
    b, sb = planners("b", ReplicaStore("1", {"1", "2"}))
    first = a.plan(PI)
    handed_over_on(a, sa, [sb])
    assert sa.etcd.get(sa.prefix + MAC) is None, "the claim is gone: no open session"
    a.images.active = b.images.active = "2"  # hot swap after the boot
    before = sb.etcd.requests
    os_plan = b.current(MAC)  # the OS's cloud-init / lifecycle report reaches b
    assert sb.etcd.requests == before, "answered from memory, no etcd round trip"
    assert (os_plan.session, os_plan.token, os_plan.image.version) == \
        (first.session, first.token, "1")
    assert os_plan.node.hostname == "pi1" and "replica a" in os_plan.reason
    assert b.current(MAC) is os_plan and sb.booted_adopted == 1, "kept here from now on"
    assert ("demo", "1") in b.versions_in_use(), "b's GC keeps the version the OS runs"
    # a replica started after the hand-over loads the record at start
    d, _ = planners("d", ReplicaStore("2", {"1", "2"}))
    assert d.current(MAC).session == first.session
    # the booted record is not a session: the next firmware request (a power cycle)
    # plans afresh and gets the hot-swapped version, and the old OS plan is over
    second = b.plan(PI)
    assert second.session != first.session and second.image.version == "2"
    assert sb.won == 1 and sb.adopted == 0
    wait_for(lambda: sa.booted_record(MAC) is None, 30, "the new boot ends the OS plan")
    wait_for(lambda: MAC not in a._booted, 30, "on a too, which saw the hand-over")
    # the node's requests reaching a now belong to the new boot b opened
    wait_for(lambda: sa.lookup(MAC) is not None, 30, "a hearing b's claim")
    assert a.current(MAC).session == second.session
    c, _ = planners("c", ReplicaStore("2", {"1", "2"}))  # started while that boot is open
    assert c.current(MAC).session == second.session
    assert c.plan(PI).session == second.session


def test_a_replica_that_lacks_the_version_answers_as_before(planners, caplog):
    a, sa = planners("a", ReplicaStore("1", {"1"}))
    b, sb = planners("b", ReplicaStore("2", {"2"}))
    a.plan(PI)
    handed_over_on(a, sa, [sb])
    with caplog.at_level(logging.DEBUG, logger="netbootd.cluster.sessions"):
        assert b.current(MAC) is None
    assert "does not hold it" in caplog.text and "demo 1" in caplog.text
    b.images.held.add("1")  # copied here meanwhile
    assert b.current(MAC).image.version == "1"


def test_booted_records_share_the_replicas_lease(planners):
    a, sa = planners("a", ReplicaStore("1", {"1"}))
    a.plan(PI)
    a.plan(OTHER)
    handed_over_on(a, sa, [sa])
    handed_over_on(a, sa, [sa], mac=OTHER.mac)
    one = sa.etcd.get(sa.booted_prefix + MAC)
    two = sa.etcd.get(sa.booted_prefix + OTHER.mac)
    assert one.lease and one.lease == two.lease, "one lease for the replica's records"
    assert one.lease != sa._lease, "not the sessions' lease"


def test_booted_records_expire_after_os_plan_ttl(planners):
    ttl = 3.0
    a, sa = planners("a", ReplicaStore("1", {"1"}), os_plan_ttl=ttl)
    _, sb = planners("b", ReplicaStore("1", {"1"}), os_plan_ttl=ttl)
    a.plan(PI)
    a.plan(OTHER)
    t0 = time.monotonic()
    handed_over_on(a, sa, [sb])
    handed_over_on(a, sa, [sb], mac=OTHER.mac)
    # nobody asks: the lease ends the records everywhere, not before os_plan_ttl
    wait_for(lambda: sb.booted_record(MAC) is None and sb.booted_record(OTHER.mac) is None,
             60, "the booted records expire")
    assert time.monotonic() - t0 >= ttl
    assert sa.etcd.get(sa.booted_prefix + MAC) is None
    c, _ = planners("c", ReplicaStore("1", {"1"}), os_plan_ttl=ttl)
    assert c.current(MAC) is None


def test_forget_removes_the_booted_record_everywhere(planners):
    a, sa = planners("a", ReplicaStore("1", {"1"}))
    b, sb = planners("b", ReplicaStore("1", {"1"}))
    c, sc = planners("c", ReplicaStore("1", {"1"}))
    a.plan(PI)
    handed_over_on(a, sa, [sb, sc])
    assert b.current(MAC) is not None and MAC in b._booted
    # an operator's verb or the node's `installed` report reaches a: its planner forgets
    # (the installed OS must not be answered with the installer's plan on any replica)
    a.forget(MAC)
    wait_for(lambda: sa.etcd.get(sa.booted_prefix + MAC) is None, 30, "record deleted")
    wait_for(lambda: sc.booted_record(MAC) is None and MAC not in b._booted, 30,
             "every replica drops the record and its copy of the plan")
    assert a.current(MAC) is None and b.current(MAC) is None and c.current(MAC) is None


def test_a_booted_record_in_use_lives_on_and_ends_os_plan_ttl_after_the_last_ask(
        planners):
    ttl = 5.0
    a, sa = planners("a", ReplicaStore("1", {"1"}), os_plan_ttl=ttl)
    b, sb = planners("b", ReplicaStore("1", {"1"}), os_plan_ttl=ttl)
    _, sc = planners("c", ReplicaStore("1", {"1"}), os_plan_ttl=ttl)
    first = a.plan(PI)
    handed_over_on(a, sa, [sb, sc])
    written = sc.booted_record(MAC).rev
    t0 = time.monotonic()
    # the OS keeps asking replica b (its events, a cloud-init re-run) for twice the ttl:
    # c, which it never asks, keeps knowing the plan because b writes it again
    while time.monotonic() - t0 < 2 * ttl:
        assert b.current(MAC).session == first.session
        assert sc.booted_record(MAC) is not None, "record kept while the OS asks"
        time.sleep(0.2)  # the OS's pace, not a wait for a condition
    assert sc.booted_record(MAC).rev > written, "written again while in use"
    last_ask = time.monotonic()
    wait_for(lambda: sc.booted_record(MAC) is None, 60, "expiry after the last ask")
    assert time.monotonic() - last_ask >= ttl - 0.5
    wait_for(lambda: MAC not in b._booted and MAC not in a._booted, 30,
             "the replicas' copies end with the record")


def test_a_replica_loads_at_most_max_sessions_records_the_newest(planners):
    a, sa = planners("a", ReplicaStore("1", {"1"}))
    a.plan(PI)
    a.plan(OTHER)
    handed_over_on(a, sa, [sa])
    handed_over_on(a, sa, [sa], mac=OTHER.mac)
    _, se = planners("e", ReplicaStore("1", {"1"}), max_sessions=1)
    assert se.booted_record(OTHER.mac) is not None and se.booted_record(MAC) is None


def test_a_request_of_an_open_boot_on_another_replica_gets_that_boot(planners):
    """A Pi answered by replica a (no beacon: its first cloud-init request is its
    hand-over) sends that request to replica b: b answers with a's open boot, from the
    claim in memory, and the hand-over there ends the boot on every replica."""
    a, sa = planners("a", ReplicaStore("1", {"1", "2"}))
    b, sb = planners("b", ReplicaStore("2", {"1", "2"}))  # b already sees version 2
    first = a.plan(PI)
    wait_for(lambda: sb.lookup(MAC) is not None, 30, "b hearing a's claim")
    before = sb.etcd.requests
    got = b.current(MAC)
    assert sb.etcd.requests == before, "answered from memory, no etcd round trip"
    assert (got.session, got.token, got.image.version) == (first.session, first.token, "1")
    assert "open boot planned by replica a" in got.reason and sb.adopted == 1
    b.handed_over(MAC)  # the cloud-init request is the hand-over
    wait_for(lambda: sa.booted_record(MAC) is not None and MAC not in a._sessions, 30,
             "the boot ends on a too")
    assert a.current(MAC).session == first.session, "the OS keeps its plan on a"
    assert b.current(MAC).session == first.session
    # no claim known: nothing to adopt, as before
    c, _ = planners("c", ReplicaStore("1", {"1"}))
    assert c.current(OTHER.mac) is None
