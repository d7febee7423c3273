"""Fixtures shared by the socket-level tests."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from netbootd.cluster.sessions import SharedSessions
from netbootd.daemon import build_app
from netbootd.dhcp.proxy import create
from netbootd.inventory import Inventory, load_inventory
from netbootd.planner import Planner
from netbootd.settings import load_settings
from tests.conftest import free_port
from tests.etcdkit import EtcdCluster
from tests.integration.planners import MAC, OTHER, PI


@pytest.fixture
async def dhcp_service(tmp_path: Path):
    """The proxy-DHCP service alone on 127.0.0.1 high ports; unknown machines boot
    (policy default). Yields (app, service, ports). (How fast start and stop are is the
    daemon's stop contract, tested by test_serve and measured in bench/, not here.)"""
    ports = {"port": free_port(socket.SOCK_DGRAM), "pxe_port": free_port(socket.SOCK_DGRAM),
             "client_port": free_port(socket.SOCK_DGRAM), "bind": "127.0.0.1"}
    settings = load_settings(None, {"dhcp": ports, "policy": {"unknown": "default"},
                                    "paths": {"state": str(tmp_path / "state")}},
                             use_default_path=False)
    app = build_app(settings, inventory=Inventory.empty())
    svc = create(app)
    await svc.start()
    try:
        yield app, svc, ports
    finally:
        await svc.stop()


@pytest.fixture(scope="module")
def etcd_one(tmp_path_factory):
    """A one-member etcd on loopback for a test module (tests/etcdkit.py)."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def clients(etcd_one):
    """clients(endpoints=None, timeout=2.0) -> an etcd client of the module's etcd (or of
    ``endpoints``), closed when the test ends."""
    from netbootd.cluster.etcd import Etcd

    made: list[Etcd] = []

    def make(endpoints: list[str] | None = None, timeout: float = 2.0) -> Etcd:
        c = Etcd(endpoints or etcd_one.endpoints, timeout=timeout)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own in the module's shared etcd."""
    return f"/t-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def planners(clients, tmp_path):
    """make(name, store, *, endpoints=None, session_ttl=60, timeout=2, os_plan_ttl=86400,
    max_sessions=65536, unknown="ignore", cluster=None, clock=time.time) -> (planner,
    shared): replicas of one fleet (one key prefix) on the module's etcd, wired as the
    daemon wires them (``cluster``: settings of that section, e.g. unknown_boot_rate)."""
    (tmp_path / "nodes.yaml").write_text(
        f"nodes:\n  {MAC}: {{hostname: pi1, serial: '{PI.serial}'}}\n"
        f"  {OTHER.mac}: {{hostname: pi2, serial: '{OTHER.serial}'}}\n")
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"

    def make(name, store, *, endpoints=None, session_ttl=60.0, timeout=2.0,
             os_plan_ttl=86400.0, max_sessions=65536, unknown="ignore", cluster=None,
             clock=time.time):
        settings = load_settings(None, {"paths": {"inventory": str(tmp_path / "nodes.yaml")},
                                        "boot": {"session_ttl": 60, "os_plan_ttl": os_plan_ttl},
                                        "policy": {"unknown": unknown},
                                        "cluster": cluster or {}}, use_default_path=False)
        settings = settings.model_copy(update={"boot": settings.boot.model_copy(
            update={"session_ttl": session_ttl})})
        inv = load_inventory(settings.paths.inventory)
        planner = Planner(lambda: settings, lambda: inv, store, clock=clock)
        shared = SharedSessions(clients(endpoints, timeout), prefix, name,
                                lambda: settings.boot.session_ttl,
                                os_plan_ttl=lambda: settings.boot.os_plan_ttl,
                                max_booted=lambda: max_sessions)
        shared.on_ended = planner.ended_elsewhere
        shared.on_booted_gone = planner.booted_gone
        planner.shared = shared
        return planner, shared

    return make
