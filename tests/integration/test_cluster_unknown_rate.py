"""A flood of random MACs cannot fill etcd: with replicas, new boots of machines not in
the inventory pass one bucket (``cluster.unknown_boot_rate``) before they are written to
etcd; the held-back ones get no answer until a later retry, and inventory nodes are never
held back. A real etcd; the planner's clock is the test's, so the bucket is exact."""

from __future__ import annotations

from netbootd.model import Action, ClientFacts, ClientKind
from tests.integration.planners import MAC, PI, ReplicaStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def stranger(i: int) -> ClientFacts:
    return ClientFacts(mac=f"02:00:00:00:{i >> 8:02x}:{i & 0xff:02x}", kind=ClientKind.PXE_BIOS)


def claims(shared) -> int:
    return len(shared.etcd.range_prefix(shared.prefix)[0])


def test_unknown_machines_are_held_to_the_rate_and_known_nodes_never(planners):
    clock = Clock()
    a, sa = planners("a", ReplicaStore("1", {"1"}), unknown="default",
                     cluster={"unknown_boot_rate": 5}, clock=clock)
    plans = [a.plan(stranger(i)) for i in range(40)]  # one instant: a burst of 5 passes
    assert sum(p.answers for p in plans) == 5 and a.unknown_deferred == 35
    held = plans[-1]
    assert held.action is Action.IGNORE and "cluster.unknown_boot_rate" in held.reason
    assert claims(sa) == 5, "only admitted boots were written to etcd"

    # the inventory's nodes are not in that bucket
    assert a.plan(PI).answers and MAC in a._sessions and claims(sa) == 6

    # a held-back machine's retry in the same second gets the same brief answer
    assert a.plan(stranger(39)).action is Action.IGNORE and a.unknown_deferred == 35
    # a later retry, once the bucket refilled, is answered
    clock.now += 2.0
    assert a.plan(stranger(39)).answers and claims(sa) == 7
