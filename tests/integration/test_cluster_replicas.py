"""Two `netbootd serve` replicas sharing a real 3-member etcd, as a user runs them:
an activation through either API is seen by both; losing one etcd member changes
nothing; with etcd gone, activations are refused with a clear error and /readyz says
why, while the plans keep answering; when etcd is back, both converge unattended."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from netbootd.store.build import sample_build
from tests.conftest import REPO, free_port
from tests.etcdkit import EtcdCluster, wait_for

TOKEN = "replica-test-token"


class Replica:
    def __init__(self, base: Path, name: str, endpoints: list[str], prefix: str,
                 versions: tuple[str, ...] = ("1", "2"), replicate: bool = True,
                 quorum: int | str = "all") -> None:
        self.name = name
        self.dir = base / name
        self.port = free_port()
        (self.dir / "images" / "incoming").mkdir(parents=True)
        for v in versions:  # the same builds dropped on every replica
            src = self.dir / f"build-{v}"
            sample_build(src, "demo", v)
            os.rename(src, self.dir / "images" / "incoming" / f"demo-{v}")
        (self.dir / "token").write_text(TOKEN)
        (self.dir / "nodes.yaml").write_text("nodes:\n  02:00:00:00:00:01: {hostname: n1}\n")
        cfg = {
            "http": {"api_token_file": str(self.dir / "token")},
            "paths": {"images": str(self.dir / "images"), "state": str(self.dir / "state"),
                      "inventory": str(self.dir / "nodes.yaml"),
                      "templates": str(REPO / "config" / "templates")},
            "store": {"settle_seconds": 0.1, "auto_activate": {}},
            "nfs": {"backend": "none"},
            "cluster": {"backend": "etcd", "name": name, "replicate": replicate,
                        "activation_quorum": quorum,
                        "peer_url": f"http://127.0.0.1:{self.port}",
                        "etcd": {"endpoints": endpoints, "key_prefix": prefix,
                                 "timeout": 1.0}},
        }
        (self.dir / "netbootd.yaml").write_text(json.dumps(cfg))
        self.log = open(self.dir / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netbootd", "--config", str(self.dir / "netbootd.yaml"),
             "serve", "--no-dhcp", "--no-tftp", "--bind", "127.0.0.1",
             "--http-port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def prod(self, channel: str = "prod") -> str | None:
        status, body = self.call("GET", "/api/v1/images")
        if status != 200:
            return None
        for img in body.get("images", []):
            if img.get("name") == "demo":
                return (img.get("channels") or {}).get(channel)
        return None

    def versions(self) -> list[str]:
        status, body = self.call("GET", "/api/v1/images")
        for img in body.get("images", []) if status == 200 else []:
            if img.get("name") == "demo":
                return [v if isinstance(v, str) else v.get("version")
                        for v in img.get("versions", [])]
        return []

    def ready(self) -> tuple[int, dict]:
        return self.call("GET", "/readyz")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def tail(self) -> str:
        return (self.dir / "daemon.log").read_text()[-3000:]


@pytest.fixture
def cluster(tmp_path):
    etcd = EtcdCluster(tmp_path / "etcd", members=3)
    replicas: list[Replica] = []
    try:
        prefix = f"/replicas-{os.getpid()}/"
        replicas = [Replica(tmp_path, n, etcd.endpoints, prefix) for n in ("r1", "r2")]
        yield etcd, replicas
    finally:
        for r in replicas:
            r.stop()
        etcd.close()


def test_replicas_share_activation_and_survive_etcd_failures(cluster):
    etcd, (r1, r2) = cluster
    for r in (r1, r2):
        wait_for(lambda r=r: r.ready()[0] == 200 and len(
            r.ready()[1]["services"]["cluster"]["replicas"]) == 2
            and r.call("GET", "/api/v1/images")[1].get("images"), 120,
            f"{r.name} ready with both replicas listed\n{r.tail()}")
    # the status shows which versions each replica holds (once both have ingested)
    for me, other in ((r1, "r2"), (r2, "r1")):
        wait_for(lambda me=me, other=other: me.ready()[1]["services"]["cluster"][
            "replicas"].get(other, {}).get("versions") == ["demo 1", "demo 2"], 60,
            f"{me.name} lists the versions {other} holds")

    # the status page shows the cluster: both replicas, etcd reachable
    with urllib.request.urlopen(f"http://127.0.0.1:{r1.port}/", timeout=30) as page:
        html = page.read().decode()
    assert 'id="cluster"' in html and "r2" in html and "reachable" in html

    # an activation through r1's API is seen by r2
    status, body = r1.call("POST", "/api/v1/images/demo/activate",
                           {"version": "1", "channel": "prod"})
    assert status == 200, body
    t0 = time.monotonic()
    wait_for(lambda: r2.prod() == "1", 30, "r2 sees r1's activation")
    print(f"\nactivation via r1 seen on r2's API after {time.monotonic() - t0:.3f} s")

    # one etcd member of three lost: no effect
    etcd.stop(2)
    status, body = r2.call("POST", "/api/v1/images/demo/activate",
                           {"version": "2", "channel": "prod"})
    assert status == 200, body
    wait_for(lambda: r1.prod() == "2", 30, "r1 sees r2's activation with 2 of 3 members")
    assert r1.ready()[0] == 200 and r2.ready()[0] == 200

    # etcd fully down: refused with a clear error, /readyz says why, plans still answer
    etcd.stop(0)
    etcd.stop(1)
    wait_for(lambda: r1.ready()[0] == 503, 60, "r1 unready without etcd")
    reasons = " ".join(r1.ready()[1]["reasons"])
    assert "etcd unreachable" in reasons and "activations are refused" in reasons
    with urllib.request.urlopen(f"http://127.0.0.1:{r1.port}/", timeout=30) as page:
        assert "<strong>unreachable</strong>" in page.read().decode()
    status, body = r1.call("POST", "/api/v1/images/demo/activate",
                           {"version": "1", "channel": "prod"})
    assert status == 409, body
    assert "refused: the cluster's etcd is unreachable from replica r1" in json.dumps(body)
    assert r1.prod() == "2" and r2.prod() == "2", "what the replicas knew keeps serving"
    status, plan = r1.call("GET", "/api/v1/plan?mac=02:00:00:00:00:01")
    assert status == 200 and (plan["action"], plan["version"]) == ("netboot", "2"), plan

    # etcd back: both converge without anyone touching them
    for i in range(3):
        etcd.start(i)
    etcd.wait_healthy()
    for r in (r1, r2):
        wait_for(lambda r=r: r.ready()[0] == 200, 120, f"{r.name} ready again\n{r.tail()}")
    status, body = r1.call("POST", "/api/v1/images/demo/activate",
                           {"version": "1", "channel": "prod"})
    assert status == 200, body
    wait_for(lambda: r2.prod() == "1", 60, "r2 follows again after etcd came back")


def test_a_build_dropped_on_one_replica_is_copied_and_activation_waits_for_all(tmp_path):
    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    replicas: list[Replica] = []
    try:
        prefix = f"/copy-{os.getpid()}/"
        replicas = [Replica(tmp_path, "r1", etcd.endpoints, prefix, versions=("1",),
                            quorum=2),
                    Replica(tmp_path, "r2", etcd.endpoints, prefix, versions=("1",)),
                    Replica(tmp_path, "r3", etcd.endpoints, prefix, versions=("1",),
                            replicate=False)]
        r1, r2, r3 = replicas
        for r in replicas:
            wait_for(lambda r=r: r.ready()[0] == 200 and len(
                r.ready()[1]["services"]["cluster"]["replicas"]) == 3, 120,
                f"{r.name} ready with three replicas\n{r.tail()}")
        # one leader, the same for every replica, shown on /readyz and the status page
        def leaders() -> list[tuple]:
            c = [r.ready()[1]["services"]["cluster"] for r in replicas]
            return [(h.get("leader"), h.get("is_leader")) for h in c]
        wait_for(lambda: len({lead for lead, _ in leaders()}) == 1 and leaders()[0][0]
                 and [m for _, m in leaders()].count(True) == 1, 60, "one leader")
        leader = leaders()[0][0]
        assert [r.name for r, (_, m) in zip(replicas, leaders()) if m] == [leader]
        with urllib.request.urlopen(f"http://127.0.0.1:{r1.port}/", timeout=30) as page:
            assert f"leader <strong>{leader}</strong>" in page.read().decode()
        # a CI drop on r1 only ...
        build = tmp_path / "demo-3"
        sample_build(build, "demo", "3", kind="pi-boot+rootfs", payload=3 << 20)
        shutil.copytree(build, tmp_path / "r1-copy", symlinks=True)
        os.rename(tmp_path / "r1-copy", r1.dir / "images" / "incoming" / "demo-3")
        # ... reaches r2 by content hash over HTTP, verified by r2's ingest
        wait_for(lambda: "3" in r2.versions() and r2.ready()[1]["services"]["cluster"][
            "replication"]["copied"] >= 1, 180, f"r2 copies demo 3\n{r2.tail()}")
        rep = r2.ready()[1]["services"]["cluster"]["replication"]
        assert not rep["failed"], rep
        same = (r1.dir / "images" / "store" / "demo" / "3" / "boot" / "kernel_2712.img")
        assert (r2.dir / "images" / "store" / "demo" / "3" / "boot" / "kernel_2712.img"
                ).read_bytes() == same.read_bytes()
        # r3 does not copy: activation through any API is refused, naming it
        wait_for(lambda: "demo 3" in r1.ready()[1]["services"]["cluster"]["replicas"].get(
            "r2", {}).get("versions", []), 60, "r2's presence lists demo 3")
        status, body = r2.call("POST", "/api/v1/images/demo/activate",
                               {"version": "3", "channel": "prod"})
        assert status == 409 and "r3 lack it" in json.dumps(body), body
        assert "2 of 3 live replicas hold it, 3 needed" in json.dumps(body), body
        # r1 is configured with activation_quorum 2: two of three hold it, that is enough
        status, body = r1.call("POST", "/api/v1/images/demo/activate",
                               {"version": "3", "channel": "staging"})
        assert status == 200, body
        wait_for(lambda: r2.prod("staging") == "3", 30, "r2 follows r1's activation")
        # the build dropped on r3 too: now every live replica holds it, activation works
        shutil.copytree(build, tmp_path / "r3-copy", symlinks=True)
        os.rename(tmp_path / "r3-copy", r3.dir / "images" / "incoming" / "demo-3")
        wait_for(lambda: "demo 3" in r2.ready()[1]["services"]["cluster"]["replicas"].get(
            "r3", {}).get("versions", []), 120, "r3 holds demo 3")
        status, body = r2.call("POST", "/api/v1/images/demo/activate",
                               {"version": "3", "channel": "prod"})
        assert status == 200, body
        for r in replicas:
            wait_for(lambda r=r: r.prod() == "3", 30, f"{r.name} follows")
    finally:
        for r in replicas:
            r.stop()
        etcd.close()
