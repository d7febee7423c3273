"""The desired export set (pure), its rendering per backend, and the service following
store changes (none backend)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from netbootd.model import ImageRef
from netbootd.nfs.backends import ExportfsBackend, GaneshaBackend, NfsError
from netbootd.nfs.exports import (
    Export,
    assign_ids,
    desired_exports,
    render_exportfs,
    render_ganesha,
)
from netbootd.nfs.service import create as create_nfs
from netbootd.store.build import sample_build
from netbootd.store.service import StoreService
from tests.storekit import ONE_VERSION, store_app


def ref(name: str, version: str, rootfs: str | None = "rootfs") -> ImageRef:
    boot = {"rootfs": rootfs} if rootfs else {"kernel": "boot/vmlinuz"}
    return ImageRef(name=name, version=version, root=Path(f"/srv/store/{name}/{version}"),
                    boot=boot)


def test_desired_set() -> None:
    ex = desired_exports(
        [ref("pi", "1"), ref("pi", "2"), ref("demo", "1", rootfs=None)],
        [("pi-01", "10.231.0.11"), ("pi-02", None)],
        clients="10.231.0.0/24", node_state_dir=Path("/var/lib/netbootd/nodes"))
    assert [e.to_dict() for e in ex] == [
        {"path": "/srv/store/pi/1/rootfs", "clients": "10.231.0.0/24", "access": "ro",
         "what": "rootfs pi/1"},
        {"path": "/srv/store/pi/2/rootfs", "clients": "10.231.0.0/24", "access": "ro",
         "what": "rootfs pi/2"},
        {"path": "/var/lib/netbootd/nodes/pi-01", "clients": "10.231.0.11", "access": "rw",
         "what": "state pi-01"},
    ]
    assert desired_exports([ref("a", "1")], [], clients="0.0.0.0/0",
                           node_state_dir=Path("/x"))[0].clients == "*"


def test_render_exportfs() -> None:
    text = render_exportfs([Export(Path("/srv/a b/rootfs"), "10.0.0.0/24", False, "rootfs x/1"),
                            Export(Path("/nodes/n1"), "10.0.0.5", True, "state n1")])
    lines = text.splitlines()
    assert lines[1].startswith("/srv/a\\040b/rootfs 10.0.0.0/24(ro,no_subtree_check,"
                               "no_root_squash,sync,fsid=")
    assert lines[2].startswith("/nodes/n1 10.0.0.5(rw,")
    assert render_exportfs([Export(Path("/n"), "*", False, "x")]) == \
        render_exportfs([Export(Path("/n"), "*", False, "x")]), "fsid is stable"


def test_ganesha_ids_are_stable_per_path() -> None:
    a, b, c = (Export(Path(p), "*", False, p) for p in ("/a", "/b", "/c"))
    ids = assign_ids([a, b], {})
    assert ids == {"/a": 100, "/b": 101}
    ids2 = assign_ids([b, c], ids)
    assert ids2 == {"/b": 101, "/c": 102}, "b keeps its id, c never reuses a's"
    text = render_ganesha([b, c], ids2)
    assert "Export_Id = 101;" in text and 'Path = "/c";' in text
    # everyone: export-level access, no CLIENT block (ganesha's "*" needs reverse DNS)
    assert "Access_Type = RO;" in text and "CLIENT" not in text
    net = render_ganesha([Export(Path("/n"), "10.0.0.5", True, "state n")], {"/n": 7})
    assert "Access_Type = None;" in net
    assert "CLIENT { Clients = 10.0.0.5; Access_Type = RW; }" in net


def test_ganesha_backend_writes_only_changes_and_reloads(tmp_path) -> None:
    marker = tmp_path / "reloads"
    be = GaneshaBackend(tmp_path / "exports.conf",
                        reload=["sh", "-c", f"echo x >> {marker}"], pidfile=None,
                        ids_file=tmp_path / "ids.json")
    ex = [Export(Path("/srv/a"), "*", False, "a")]
    assert be.apply(ex) is True
    assert be.apply(ex) is False, "unchanged: no rewrite, no reload"
    assert be.apply([]) is True
    assert marker.read_text().count("x") == 2
    assert json.loads((tmp_path / "ids.json").read_text()) == {"/srv/a": 100}
    failing = GaneshaBackend(tmp_path / "e2.conf", reload=["false"], pidfile=None,
                             ids_file=tmp_path / "ids2.json")
    with pytest.raises(NfsError, match="exited 1"):
        failing.apply(ex)


def test_ganesha_backend_sighup_via_pidfile(tmp_path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "g.pid").write_text(f"{proc.pid}\n")
        be = GaneshaBackend(tmp_path / "e.conf", reload=[], pidfile=tmp_path / "g.pid",
                            ids_file=tmp_path / "ids.json")
        be.apply([Export(Path("/srv/a"), "*", False, "a")])
        assert proc.wait(5) == -1  # SIGHUP delivered (sleep's default action: exit)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(NfsError, match="needs nfs.ganesha_reload"):
        GaneshaBackend(tmp_path / "e3.conf", reload=[], pidfile=None,
                       ids_file=tmp_path / "i3.json").apply([])


def test_exportfs_backend_reports_a_missing_tool(tmp_path) -> None:
    be = ExportfsBackend(tmp_path / "netbootd.exports", ["/nonexistent/exportfs"])
    with pytest.raises(NfsError, match="not found"):
        be.apply([Export(Path("/srv/a"), "*", False, "a")])
    assert (tmp_path / "netbootd.exports").read_text().count("/srv/a") == 1


async def test_service_follows_the_store(tmp_path) -> None:
    app = store_app(tmp_path,
                    "nodes:\n  d8:3a:dd:00:00:01: {hostname: pi-01, ip: 10.231.0.11}\n"
                    "  d8:3a:dd:00:00:02: {hostname: pi-02}\n",
                    {"store": ONE_VERSION, "nfs": {"backend": "none", "clients": "10.231.0.0/24"}})
    store_svc, nfs = StoreService(app), create_nfs(app)
    await store_svc.start()
    await nfs.start()
    try:
        assert nfs.health()["ok"]
        assert [e.what for e in nfs.exports] == ["state pi-01"]
        assert (app.settings.node_state_dir / "pi-01").is_dir()
        # The site server's ACK for pi-02 was seen, but no host at that address has
        # pi-02's MAC in the kernel neighbour table: a read-write export never follows
        # an unconfirmed address (tests/e2e/test_dhcp_evidence.py has the confirmed one).
        app.clients.learn("10.231.0.12", "d8:3a:dd:00:00:02")
        for v in ("1", "2"):
            sample_build(app.store.layout.incoming / f"pi-{v}", "pi", v, "pi-boot+rootfs")
            assert app.store.ingest_entry(f"pi-{v}").accepted

        async def wait(pred) -> None:
            t0 = time.monotonic()
            while not pred():
                assert time.monotonic() - t0 < 5, [e.what for e in nfs.exports]
                await asyncio.sleep(0.05)

        await wait(lambda: [e.what for e in nfs.exports] ==
                   ["rootfs pi/1", "rootfs pi/2", "state pi-01"])
        await store_svc.run_gc()
        await wait(lambda: [e.what for e in nfs.exports] == ["rootfs pi/2", "state pi-01"])
    finally:
        await nfs.stop()
        await store_svc.stop()
        app.events.close()
