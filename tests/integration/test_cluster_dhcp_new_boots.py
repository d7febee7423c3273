"""With replicas, a new boot's agreement through etcd never holds the proxy-DHCP loop:
while etcd is stopped (SIGSTOP: a commit that takes as long as it likes), a machine in
its boot session is answered, and the new machine is answered once etcd commits."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from pathlib import Path

from scapy.layers.dhcp import BOOTP

from netbootd.daemon import build_app
from netbootd.dhcp import clients as c
from netbootd.dhcp.proxy import create
from netbootd.inventory import Inventory
from netbootd.settings import load_settings
from tests.conftest import eventually, free_port
from tests.etcdkit import EtcdCluster
from tests.integration.planners import ReplicaStore

KNOWN = "52:54:00:ab:00:01"
NEW = "52:54:00:ab:00:02"


async def ask(sock: socket.socket, mac: str, xid: int, port: int) -> None:
    await asyncio.get_running_loop().sock_sendto(
        sock, c.pxe_bootserver_request(mac, xid, "127.0.0.1"), ("127.0.0.1", port))


async def reply(sock: socket.socket) -> BOOTP:
    return BOOTP(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 60))


async def test_a_new_boot_waits_for_etcd_off_the_loop(tmp_path: Path) -> None:
    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    proc = etcd.procs[0]
    assert proc is not None
    stopped = False
    app = svc = None
    try:
        ports = {"port": free_port(socket.SOCK_DGRAM), "pxe_port": free_port(socket.SOCK_DGRAM),
                 "client_port": free_port(socket.SOCK_DGRAM), "bind": "127.0.0.1"}
        settings = load_settings(None, {
            "dhcp": ports, "policy": {"unknown": "default"},
            "paths": {"state": str(tmp_path / "state")},
            "cluster": {"backend": "etcd", "name": "r1", "etcd": {
                "endpoints": etcd.endpoints, "key_prefix": f"/t-{uuid.uuid4().hex[:8]}/",
                "timeout": 30}}}, use_default_path=False)
        app = build_app(settings, inventory=Inventory.empty())
        app.planner.images = ReplicaStore("1", {"1"})
        svc = create(app)
        await svc.start()
        shared = app.cluster.sessions
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as known, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as new:
            for s in (known, new):
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)
            await ask(known, KNOWN, 1, ports["pxe_port"])
            assert (await reply(known)).xid == 1
            assert shared.won == 1, "the known machine's boot was agreed through etcd"
            os.kill(proc.pid, signal.SIGSTOP)  # our own etcd: commits wait from now on
            stopped = True
            await ask(new, NEW, 2, ports["pxe_port"])
            await eventually(lambda: svc.new_boots.sizes()["waiting"] == 1, 60,
                           "the new boot waiting for etcd")
            await ask(new, NEW, 3, ports["pxe_port"])  # its retry waits with it
            await ask(known, KNOWN, 4, ports["pxe_port"])
            assert (await reply(known)).xid == 4, "answered while etcd holds the new boot"
            assert svc.new_boots.sizes()["waiting"] == 1 and shared.won == 1
            os.kill(proc.pid, signal.SIGCONT)
            stopped = False
            got = {(await reply(new)).xid, (await reply(new)).xid}
            assert got == {2, 3}
            assert shared.won == 2 and shared.unshared == 0, "agreed through etcd, not alone"
            assert svc.new_boots.sizes() == {"waiting": 0, "taken": 2, "overflow": 0,
                                             "dropped": 0, "failed": 0}
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        if svc is not None:
            await svc.stop()
        if app is not None and app.cluster is not None:
            app.cluster.close()
        etcd.close()
