"""The ganesha backend against a real nfs-ganesha + rpcbind in a lab namespace, checked
with a real NFS client (libnfs ``nfs-ls``): every version's rootfs is exported, an
export stays while a boot session uses its version, and is gone after activation + GC."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from netbootd.lab.netns import Topology
from netbootd.model import ClientFacts, ClientKind
from netbootd.nfs.service import create as create_nfs
from netbootd.store.service import StoreService
from tests.storekit import ONE_VERSION, drop_build, store_app, until

pytestmark = pytest.mark.slow

MAC = "d8:3a:dd:00:00:42"


def nfs_ls(lab: Topology, path: Path, client: str = "pi") -> tuple[bool, str]:
    """List an export from a client namespace of the lab: (worked, output)."""
    p = lab.run_in(client, ["timeout", "10", "nfs-ls", f"nfs://{lab.ip('srv')}{path}"],
                   check=False, timeout=15)
    return p.returncode == 0, (p.stdout + p.stderr)


def wait_ls(lab: Topology, path: Path, want: bool, timeout: float = 15.0,
            client: str = "pi") -> str:
    deadline = time.monotonic() + timeout
    while True:
        ok, out = nfs_ls(lab, path, client)
        if ok == want:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"nfs-ls {path}: expected {'success' if want else 'failure'}"
                                 f", got: {out.strip()[:300]}")
        time.sleep(0.5)


@pytest.mark.parametrize("everyone", [False, True], ids=["lab-network", "0.0.0.0/0"])
async def test_ganesha_exports_follow_store_and_sessions(netlab, lab_nfs, lab_out: Path,
                                                         tmp_path: Path, everyone: bool
                                                         ) -> None:
    if shutil.which("nfs-ls") is None:
        pytest.fail("nfs-ls missing: apt-get install libnfs-utils", pytrace=False)
    netlab.add_address("pi", f"{netlab.ip('pi')}/24")  # the NFS client's address
    netlab.wait_ready("pi")
    include = lab_out / "netbootd-exports.conf"
    nfs_server = lab_nfs(include=include)
    app = store_app(tmp_path,
                    f"nodes:\n  {MAC}: {{hostname: pi-01, image: pi, channel: dev, "
                    f"ip: {netlab.ip('pi')}}}\n",
                    {"store": {**ONE_VERSION, "gc_interval": 3600},
                     "nfs": {"backend": "ganesha", "ganesha_config": str(include),
                             "ganesha_reload": nfs_server.reload_argv(),
                             "clients": "0.0.0.0/0" if everyone else netlab.network}})
    store_svc, nfs = StoreService(app), create_nfs(app)
    await store_svc.start()
    await nfs.start()
    try:
        store = app.store
        drop_build(app, tmp_path, "pi", "1", kind="pi-boot+rootfs")
        await until(lambda: store.active("pi", "dev") == "1")  # watcher ingested it
        # a node starts booting version 1 ...
        plan = app.planner.plan(ClientFacts(mac=MAC, kind=ClientKind.RPI))
        v1 = plan.image.root / plan.image.boot["rootfs"]
        out = await asyncio.to_thread(wait_ls, netlab, v1, True)
        assert "etc" in out and "sbin" in out, out
        # ... while version 2 arrives and becomes active
        drop_build(app, tmp_path, "pi", "2", kind="pi-boot+rootfs")
        await until(lambda: store.active("pi", "dev") == "2")  # watcher ingested it
        v2 = store.resolve("pi", "dev", None).root / "rootfs"
        assert "etc" in await asyncio.to_thread(wait_ls, netlab, v2, True)
        # GC while the session is open: version 1 and its export stay
        assert await store_svc.run_gc() == []
        await asyncio.sleep(0.5)
        assert "etc" in await asyncio.to_thread(wait_ls, netlab, v1, True)
        # the boot finished, but its OS still runs on version 1's root: both stay
        app.planner.end(MAC)
        assert await store_svc.run_gc() == []
        assert "etc" in await asyncio.to_thread(wait_ls, netlab, v1, True)
        # the node boots again (version 2 now): version 1 is retired, its export goes
        assert app.planner.plan(ClientFacts(mac=MAC, kind=ClientKind.RPI)).image.version == "2"
        app.planner.handed_over(MAC)
        assert await store_svc.run_gc() == [("pi", "1")]
        await asyncio.to_thread(wait_ls, netlab, v1, False)
        assert "etc" in await asyncio.to_thread(wait_ls, netlab, v2, True)
        # the node's writable state dir: read-write to its own address only
        state = app.settings.node_state_dir / "pi-01"
        (state / "hello").write_text("state")
        assert "hello" in await asyncio.to_thread(wait_ls, netlab, state, True)
        ok, out = await asyncio.to_thread(nfs_ls, netlab, state, "dhcp")
        assert not ok, f"another address mounted pi-01's state: {out}"
        assert nfs.health()["ok"], nfs.health()
        text = include.read_text()
        assert str(v2) in text and str(v1) not in text
    finally:
        await nfs.stop()
        await store_svc.stop()
        app.events.close()
