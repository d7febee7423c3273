"""Boot sessions shared through a real etcd: the first replica to plan a boot wins, the
others adopt its plan; an open session never waits for etcd; etcd away = plan locally."""

from __future__ import annotations

from netbootd.model import Action, ClientFacts, ClientKind
from tests.conftest import free_port
from tests.etcdkit import wait_for
from tests.integration.planners import MAC, OTHER, PI, ReplicaStore


def test_first_replica_wins_the_other_adopts_with_one_round_trip(planners):
    a, sa = planners("a", ReplicaStore("1", {"1", "2"}))
    b, sb = planners("b", ReplicaStore("2", {"1", "2"}))  # b already sees version 2 active
    before = sa.etcd.requests
    pa = a.plan(PI)
    assert sa.etcd.requests - before == 1, "a new session costs one etcd round trip"
    assert pa.image.version == "1" and sa.won == 1
    before = sb.etcd.requests
    pb = b.plan(PI)
    assert sb.etcd.requests - before == 1
    assert (pb.session, pb.token, pb.image.version) == (pa.session, pa.token, "1")
    assert "planned by replica a" in pb.reason and sb.adopted == 1
    # memo hits never ask etcd: even with etcd gone for both
    for planner, shared in ((a, sa), (b, sb)):
        shared.etcd.endpoints = [f"http://127.0.0.1:{free_port()}"]
        n = shared.etcd.requests
        for _ in range(50):
            assert planner.plan(PI).session == pa.session
        assert shared.etcd.requests == n and shared.etcd.reachable


def test_hand_over_ends_the_boot_on_every_replica(planners):
    a, sa = planners("a", ReplicaStore("1", {"1", "2"}))
    b, sb = planners("b", ReplicaStore("1", {"1", "2"}))
    first = a.plan(PI)
    assert b.plan(PI).session == first.session
    a.handed_over(MAC)  # the kernel started (beacon / cloud-init reached replica a)
    wait_for(lambda: MAC not in b._sessions, 30, "replica b ends its copy of the boot")
    assert b.current(MAC).session == first.session, "the OS still sees the plan it booted"
    b.images.active = a.images.active = "2"  # hot swap: the next boot gets version 2
    wait_for(lambda: sb.lookup(MAC) is None and sa.lookup(MAC) is None, 30, "claim gone")
    second = b.plan(PI)
    assert second.session != first.session and second.image.version == "2"
    assert a.plan(PI).session == second.session


def test_a_replica_never_plans_a_version_it_lacks(planners):
    a, _ = planners("a", ReplicaStore("7", {"7"}))
    b, _ = planners("b", ReplicaStore("6", {"6"}))
    assert a.plan(PI).image.version == "7"
    pb = b.plan(PI)
    assert pb.action is Action.IGNORE and not pb.answers and pb.image is None
    assert "replica a planned this boot on demo 7" in pb.reason
    b.images.held.add("7")  # replicated meanwhile: b now answers with a's plan
    b.changed()
    assert b.plan(PI).image.version == "7"


def test_without_etcd_a_replica_plans_locally_and_keeps_open_boots(planners):
    dead = [f"http://127.0.0.1:{free_port()}"]
    c, sc = planners("c", ReplicaStore("1", {"1"}), endpoints=dead, timeout=0.3)
    p = c.plan(PI)
    assert p.answers and p.image.version == "1" and sc.unshared == 1
    assert c.plan(PI).session == p.session
    assert not sc.etcd.reachable
    # further new boots do not wait for an etcd that just failed: no request is tried
    tried = sc.etcd.attempts
    assert c.plan(OTHER).answers
    assert sc.etcd.attempts == tried and sc.unshared == 2


def test_a_claim_nobody_uses_expires_with_its_lease(planners):
    a, sa = planners("a", ReplicaStore("1", {"1"}), session_ttl=2.0)
    b, sb = planners("b", ReplicaStore("1", {"1"}), session_ttl=2.0)
    first = a.plan(PI)
    assert b.plan(PI).session == first.session
    # nobody asks any more: the lease (2 x session_ttl) ends the claim everywhere
    wait_for(lambda: sa.lookup(MAC) is None and sb.lookup(MAC) is None, 60, "lease expiry")
    assert b.plan(PI).session != first.session


def test_an_operator_verb_ends_the_claimed_boot_everywhere(planners):
    a, _ = planners("a", ReplicaStore("1", {"1", "2"}))
    b, sb = planners("b", ReplicaStore("1", {"1", "2"}))
    first = a.plan(PI)
    assert b.plan(PI).session == first.session
    a.images.active = b.images.active = "2"
    # `netbootd nodes reinstall` (or an install report) on a: every replica re-plans
    a.forget(MAC)
    b.forget(MAC)  # the daemon's lifecycle watch does this on every replica
    wait_for(lambda: sb.etcd.get(sb.prefix + MAC) is None, 30, "claim deleted in etcd")
    assert b.plan(PI).image.version == "2" and a.plan(PI).image.version == "2"


def test_the_claims_a_replica_remembers_are_bounded(planners):
    """Claims seen through the watch (any replica's new boots) are kept in memory up to
    boot.max_sessions, the least recently written forgotten first."""
    a, sa = planners("a", ReplicaStore("1", {"1"}), max_sessions=3, unknown="default")
    _, sb = planners("b", ReplicaStore("1", {"1"}), max_sessions=3, unknown="default")
    macs = [f"dc:a6:32:00:01:{i:02x}" for i in range(6)]
    for i, mac in enumerate(macs):
        a.plan(ClientFacts(mac=mac, serial=f"5555{i:04x}", kind=ClientKind.RPI))
    assert sa.won == 6
    assert sa.health()["claims_known"] == 3
    assert sa.lookup(macs[-1]) is not None and sa.lookup(macs[0]) is None
    wait_for(lambda: sb.lookup(macs[-1]) is not None, 30, "b hearing a's newest claim")
    assert sb.health()["claims_known"] <= 3
