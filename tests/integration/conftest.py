"""Fixtures shared by the socket-level tests."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from netbootd.daemon import build_app
from netbootd.dhcp.proxy import create
from netbootd.inventory import Inventory
from netbootd.settings import load_settings
from tests.conftest import free_port
from tests.etcdkit import EtcdCluster


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
