"""A Pi storm across two replicas sharing a real etcd, over real TFTP: every Pi starts its
boot on replica r1, r1 stops mid-boot, version 2 is activated, and every Pi finishes on
r2 with version 1's files (r2 adopts the boots r1 planned); a Pi that starts afterwards
gets version 2."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from netbootd.store.service import StoreService
from netbootd.tftp.piclient import PI5_FILES, pi5_boot
from netbootd.tftp.server import create as create_tftp
from tests.conftest import REPO, free_port
from tests.etcdkit import EtcdCluster
from tests.storekit import drop_build, store_app, until

PIS = 10
SERIALS = [f"00c1{i:04x}" for i in range(PIS + 1)]
NODES = "nodes:\n" + "".join(
    f"  d8:3a:dd:00:01:{i:02x}: {{hostname: pi{i}, serial: {s}, image: pi, channel: prod}}\n"
    for i, s in enumerate(SERIALS))
FIRST, REST = PI5_FILES[:5], PI5_FILES[5:]  # config.txt .. initramfs | the rest


@pytest.fixture
def etcd(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        yield cluster
    finally:
        cluster.close()


async def test_pis_finish_on_another_replica_on_the_version_they_started(etcd, tmp_path):
    prefix = f"/storm-{uuid.uuid4().hex[:8]}/"
    replicas = []
    for name in ("r1", "r2"):
        port = free_port(socket.SOCK_DGRAM)
        (tmp_path / name).mkdir()
        app = store_app(tmp_path / name, NODES, {
            "paths": {"templates": str(REPO / "config" / "templates")},
            "store": {"settle_seconds": 0.1, "auto_activate": {}},
            "tftp": {"port": port, "bind": "127.0.0.1"},
            "cluster": {"backend": "etcd", "name": name,
                        "etcd": {"endpoints": etcd.endpoints, "key_prefix": prefix}}})
        replicas.append((app, StoreService(app), create_tftp(app), port))
    try:
        for app, store_svc, tftp, _ in replicas:
            await store_svc.start()
            await tftp.start()
            for v in ("1", "2"):
                drop_build(app, tmp_path / app.settings.cluster.name, "pi", v,
                           kind="pi-boot+rootfs", payload=1 << 20)
            await until(lambda app=app: app.store.versions("pi") == ["1", "2"], timeout=120)
        (a, _, tftp_a, port_a), (b, _, _, port_b) = replicas
        await asyncio.to_thread(a.store.activate, "pi", "1", "prod", by="test")
        await until(lambda: b.store.active("pi", "prod") == "1", timeout=60)
        kernel = {v: (a.store.layout.store / "pi" / v / "boot" / "kernel_2712.img").read_bytes()
                  for v in ("1", "2")}

        # the storm starts on r1 ...
        firsts = await asyncio.gather(*(pi5_boot(("127.0.0.1", port_a), s, files=FIRST)
                                        for s in SERIALS[:PIS]))
        assert all(log.files["config.txt"] for log in firsts)
        # ... r1 goes away mid-boot, and version 2 is activated through r2
        await tftp_a.stop()
        await asyncio.to_thread(b.store.activate, "pi", "2", "prod", by="test")
        # every Pi's retries land on r2 and finish on version 1
        rests = await asyncio.gather(*(pi5_boot(("127.0.0.1", port_b), s, files=REST)
                                       for s in SERIALS[:PIS]))
        for i, log in enumerate(rests):
            assert log.files["kernel_2712.img"] == kernel["1"]
            cmdline = log.files["cmdline.txt"].decode()
            token = a.planner.current(f"d8:3a:dd:00:01:{i:02x}").token
            assert "netbootd.version=1" in cmdline.split() and f"netbootd.token={token}" in \
                cmdline.split(), \
                "the same boot: r1's version and r1's token for its reports"
        assert b.cluster.sessions.adopted >= PIS
        # a Pi that starts its boot now gets version 2
        late = await pi5_boot(("127.0.0.1", port_b), SERIALS[PIS], files=("kernel_2712.img",))
        assert late.files["kernel_2712.img"] == kernel["2"]
    finally:
        for app, store_svc, tftp, _ in replicas:
            await tftp.stop()
            await store_svc.stop()
            app.events.close()
            app.cluster.close()
