"""What ClientAddresses hands to a publisher (the replicas' shared addresses): every
learn() that is new, moved or refreshed, never one learnt from a peer, and a failing
publisher never fails the learn; without one (a single daemon) nothing changes."""

from __future__ import annotations

import pytest

from netbootd.cluster.addresses import Shared, lease_slot
from netbootd.neighbours import ClientAddresses

MAC = "dc:a6:32:00:00:01"
OTHER = "dc:a6:32:00:00:02"


def test_new_moved_and_refreshed_are_published_with_their_lease():
    a = ClientAddresses(ttl=100, use_kernel=False)
    seen: list[tuple[str, str, float]] = []
    a.publish = lambda ip, mac, seconds: seen.append((ip, mac, seconds))
    assert a.learn("10.231.2.1", MAC, lease=30)
    assert not a.learn("10.231.2.1", MAC, lease=30)  # a renewal: published, not "new"
    assert a.learn("10.231.2.1", OTHER)  # moved; no lease: the table's ttl
    a.learn("10.231.2.2", MAC, lease=500)  # capped at the ttl
    assert seen == [("10.231.2.1", MAC, 30), ("10.231.2.1", MAC, 30),
                    ("10.231.2.1", OTHER, 100), ("10.231.2.2", MAC, 100)]


def test_evidence_from_a_peer_is_learnt_but_never_published_again():
    a = ClientAddresses(use_kernel=False)
    seen: list[str] = []
    a.publish = lambda ip, mac, seconds: seen.append(ip)
    assert a.learn("10.231.2.1", MAC, lease=30, from_peer=True)
    a.learn("10.231.2.1", MAC, lease=30, from_peer=True)
    assert seen == [] and a.mac_for("10.231.2.1") == MAC
    assert a.owner_of("10.231.2.1") is None  # evidence, not ownership


def test_a_failing_publisher_never_fails_learning():
    a = ClientAddresses(use_kernel=False)

    def broken(ip: str, mac: str, seconds: float) -> None:
        raise RuntimeError("etcd queue broken")

    a.publish = broken
    assert a.learn("10.231.2.1", MAC) and a.ip_for(MAC) == "10.231.2.1"


def test_without_a_publisher_nothing_is_passed_on():
    a = ClientAddresses(use_kernel=False)
    assert a.publish is None and a.learn("10.231.2.1", MAC)


@pytest.mark.parametrize("value", [
    b"not json", b"{}", b'{"mac": "zz", "expires": 1}', b'{"mac": "' + MAC.encode() + b'"}',
    b'{"mac": "' + MAC.encode() + b'", "expires": "nan"}', b"[" * 2000,
])
def test_a_malformed_shared_value_is_ignored(value):
    assert Shared.decode(value) is None


def test_a_shared_value_round_trips_and_knows_when_it_is_due():
    s = Shared(mac=MAC, expires=1600.0, written=1000.0, replica="a")
    assert Shared.decode(s.encode().encode()) == s
    assert not s.due(1299.0) and s.due(1301.0)


def test_bindings_ending_close_together_share_a_lease_slot():
    now = 1_000_000.0
    assert lease_slot(now + 3600, now) == lease_slot(now + 3590, now)  # 60 s slots for long leases
    assert now + 3 <= lease_slot(now + 3, now) <= now + 4  # 1 s slots for short ones
    assert all(lease_slot(now + r, now) >= now + r for r in (1, 7, 99, 3600))
