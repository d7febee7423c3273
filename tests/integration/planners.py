"""Planners of several replicas on one etcd, as the daemon wires them, for the tests of
shared boot sessions and booted-OS plans (the ``planners`` fixture in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from netbootd.model import ClientFacts, ClientKind, ImageRef

MAC = "dc:a6:32:00:00:11"
PI = ClientFacts(mac=MAC, serial="1234abcd", kind=ClientKind.RPI)
OTHER = ClientFacts(mac="dc:a6:32:00:00:12", serial="1234abce", kind=ClientKind.RPI)


class ReplicaStore:
    """One replica's own store: the versions it holds and its active one (a policy
    stand-in for the image store, which has its own tests; etcd is the real peer here)."""

    def __init__(self, active: str, held: set[str]) -> None:
        self.active = active
        self.held = held

    def resolve(self, image, channel, pin, *, mac=None):
        version = pin or self.active
        if version not in self.held:
            return None
        return ImageRef(name=image, version=version, root=Path("/store") / image / version,
                        channel=channel or None, pinned=bool(pin))
