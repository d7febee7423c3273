"""The activation quorum: how many live replicas must hold a version, and the setting."""

from __future__ import annotations

import pytest

from netbootd.cluster.quorum import refusal
from netbootd.settings import load_settings

LIVE = {"r1": {"versions": ["demo 3"]}, "r2": {"versions": ["demo 3"]},
        "r3": {"versions": []}}


def test_all_needs_every_live_replica_and_says_how_many_hold_it():
    why = refusal("demo", "3", LIVE, "r1", "all")
    assert why is not None and "r3 lack it" in why
    assert "2 of 3 live replicas hold it, 3 needed" in why
    assert refusal("demo", "3", {k: LIVE[k] for k in ("r1", "r2")}, "r1", "all") is None


def test_a_number_needs_that_many_holders_counting_this_replica():
    assert refusal("demo", "3", LIVE, "r1", 2) is None
    why = refusal("demo", "3", LIVE, "r1", 3)
    assert why is not None and "2 of 3 live replicas hold it, 3 needed" in why
    # this replica holds it even before its own presence record says so
    assert refusal("demo", "3", {"r3": {"versions": []}}, "r1", 1) is None
    assert "1 of 2 live replicas hold it, 2 needed" in refusal(
        "demo", "3", {"r3": {"versions": []}}, "r1", 2)


def _cluster(quorum):
    return load_settings(None, {"cluster": {"activation_quorum": quorum}},
                         use_default_path=False).cluster.activation_quorum


def test_the_setting_is_all_or_a_positive_number(monkeypatch):
    assert _cluster("all") == "all" and _cluster(2) == 2 and _cluster("3") == 3
    for bad in (0, -1, "most", True):
        with pytest.raises(Exception, match="activation_quorum"):
            _cluster(bad)
    monkeypatch.setenv("NETBOOTD_CLUSTER__ACTIVATION_QUORUM", "2")
    assert load_settings(None, {}, use_default_path=False).cluster.activation_quorum == 2


def test_the_local_backend_opens_no_cluster_and_no_leader():
    from netbootd.app import enabled_services
    from netbootd.cluster import open_cluster

    s = load_settings(None, {}, use_default_path=False)
    assert s.cluster.backend == "local" and s.cluster.activation_quorum == "all"
    assert open_cluster(s) is None and "cluster" not in enabled_services(s)
