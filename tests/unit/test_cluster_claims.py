"""The boot record replicas share (cluster/sessions.py's Claim): what a replica that never
saw a boot needs to rebuild its plan. The etcd side is tested with a real etcd in
tests/integration/test_cluster_sessions.py and test_cluster_booted.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from netbootd.cluster.sessions import Claim, resolve_claim
from netbootd.inventory import load_inventory
from netbootd.model import ClientFacts, ClientKind, ImageRef
from netbootd.planner import decide
from netbootd.settings import load_settings

MAC = "dc:a6:32:00:00:21"


class Held:
    """A replica's store as a set of held versions (a policy stand-in, not a peer)."""

    def __init__(self, *versions: str) -> None:
        self.versions = set(versions)

    def resolve(self, image, channel, pin, *, mac=None):
        version = pin or max(self.versions)
        if version not in self.versions:
            return None
        return ImageRef(name=image, version=version, root=Path("/store") / image / version,
                        channel=channel or None, pinned=bool(pin))


def a_plan(tmp_path, images):
    (tmp_path / "nodes.yaml").write_text(f"nodes:\n  {MAC}: {{hostname: pi1, serial: 'ab12'}}\n")
    settings = load_settings(None, {"paths": {"inventory": str(tmp_path / "nodes.yaml")}},
                             use_default_path=False)
    facts = ClientFacts(mac=MAC, kind=ClientKind.RPI, serial="ab12", arch=None)
    return decide(facts, load_inventory(settings.paths.inventory), settings, images)


def test_a_claim_carries_what_the_firmware_said_so_another_replica_finds_the_node(tmp_path):
    plan = a_plan(tmp_path, Held("1"))
    c = Claim.of(plan, "a")
    back = Claim.decode(c.encode().encode(), 7)
    assert back == dataclasses.replace(c, rev=7), "every field survives etcd"
    assert (back.session, back.token, back.image, back.replica) == \
        (plan.session, plan.token, ("demo", "1"), "a")
    assert back.facts(MAC) == ClientFacts(mac=MAC, kind=ClientKind.RPI, serial="ab12")


def test_a_claim_written_without_facts_reads_as_an_unknown_client():
    old = b'{"session": "s1", "token": "t", "action": "netboot", "image": ["demo", "1"], ' \
          b'"disk": null, "pinned": false, "created": 1.0, "replica": "a"}'
    c = Claim.decode(old, 3)
    assert c is not None and c.facts(MAC) == ClientFacts(mac=MAC, kind=ClientKind.OTHER)
    assert Claim.decode(b"not json", 3) is None


def test_a_replica_resolves_a_claim_only_through_versions_it_holds(tmp_path):
    plan = a_plan(tmp_path, Held("1"))
    c = Claim.of(plan, "a")
    assert resolve_claim(c, Held("2")) == "demo 1", "lacking the version says which"
    image, disk = resolve_claim(c, Held("1", "2"))
    assert (image.name, image.version, disk) == ("demo", "1", None)
