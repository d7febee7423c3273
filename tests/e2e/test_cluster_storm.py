"""Replicas in network namespaces: three netbootd replicas on a 3-member etcd (one member
in each replica's namespace), a storm of 20 emulated Pi 5s over TFTP, the first replica
killed (SIGKILL) at about a third of the storm while version 2 is activated through
another: every Pi finishes, each on one version. Then etcd member loss (no effect), etcd
fully down (open boots finish, activation refused), etcd back (converge)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from netbootd.lab.demo import _holds
from netbootd.lab.etcd import EtcdMembers
from netbootd.lab.netns import REPLICA_ROLES, Topology
from netbootd.lab.server import Netbootd
from netbootd.lab.tools import LAB_TOOLS, REPO, drop_build
from netbootd.store.build import sample_build
from tests.e2e.conftest import require

pytestmark = pytest.mark.slow

PIS = 20
SERIALS = [f"5eed{i:04x}" for i in range(PIS)]
MACS = [f"d8:3a:dd:20:00:{i:02x}" for i in range(PIS)]


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def prod(r: Netbootd) -> str | None:
    return r.active_version("pi")


def test_pi_storm_across_replicas_survives_a_replica_and_etcd_failures(lab_out: Path,
                                                                       tmp_path: Path):
    require(LAB_TOOLS + ["etcd"])
    lab = Topology(roles=("sw", *REPLICA_ROLES, "pi")).up()
    members: EtcdMembers | None = None
    replicas: list[Netbootd] = []
    try:
        lab.add_address("pi", f"{lab.ip('pi')}/24")
        members = EtcdMembers(lab, lab_out, REPLICA_ROLES).start()
        nodes = {m: {"hostname": f"pi{i}", "serial": s, "image": "pi", "channel": "prod"}
                 for i, (m, s) in enumerate(zip(MACS, SERIALS))}
        for role in REPLICA_ROLES:
            replicas.append(Netbootd(lab, lab_out, nodes=nodes, role=role, settings={
                "dhcp": {"enabled": False},
                "store": {"auto_activate": {}},
                "nfs": {"backend": "none"},
                "cluster": {"backend": "etcd", "name": role,
                            "etcd": {"endpoints": members.endpoints}}}).start(timeout=60))
        r1, r2, r3 = replicas
        builds = {}
        for v in ("1", "2"):
            builds[v] = tmp_path / f"pi-{v}"
            sample_build(builds[v], "pi", v, kind="pi-boot+rootfs", payload=2 << 20)
            drop_build(builds[v], r1.incoming)  # dropped on r1 only: copied to r2, r3
        for r in replicas:
            for v in ("1", "2"):
                assert _holds(r, "pi", v, 240), f"{r.role} lacks pi {v}; see {r.log}"
        def all_hold(r: Netbootd) -> bool:
            _, body = r.request("GET", "/readyz")
            seen = body.get("services", {}).get("cluster", {}).get("replicas", {}) \
                if isinstance(body, dict) else {}
            # both versions: a replica announces each copy when it lands, and activating v1
            # while one replica's announcement of it is still on its way is refused (409)
            return len(seen) == 3 and all("pi 1" in d["versions"] and "pi 2" in d["versions"]
                                          for d in seen.values())

        wait(lambda: all(all_hold(r) for r in replicas), 60,
             "every replica sees every replica holding both versions")
        status, body = r2.request("POST", "/api/v1/images/pi/activate",
                                  {"version": "1", "channel": "prod"}, auth=True)
        assert status == 200, body
        wait(lambda: all(prod(r) == "1" for r in replicas), 30, "v1 active everywhere")
        kernel = {v: json.loads((builds[v] / "manifest.json").read_text()) for v in builds}
        kernel = {v: next(a["sha256"] for a in m["artefacts"]
                          if a["path"] == "boot/kernel_2712.img") for v, m in kernel.items()}

        # the storm: every Pi starts on r1; r1 is killed at about a third of it, and v2 is
        # activated through r2 at the same moment
        out, progress = lab_out / "storm.json", lab_out / "storm.progress"
        servers = ",".join(lab.ip(r) for r in REPLICA_ROLES)
        storm = lab.popen("pi", [sys.executable, "-m", "netbootd.lab.pistorm", "--servers",
                                 servers, "--serials", ",".join(SERIALS), "--out", str(out),
                                 "--progress", str(progress), "--bind", lab.ip("pi")],
                          log_file=lab_out / "storm.log", cwd=str(REPO))
        third = PIS * 12 // 3
        wait(lambda: progress.exists() and progress.read_text().strip().isdigit()
             and int(progress.read_text()) >= third, 300, "a third of the storm")
        r1.proc.send_signal(signal.SIGKILL)
        r1.proc.wait(10)
        status, body = r2.request("POST", "/api/v1/images/pi/activate",
                                  {"version": "2", "channel": "prod"}, auth=True)
        assert status == 200, body
        assert storm.wait(600) == 0, (lab_out / "storm.log").read_text()[-3000:]
        result = json.loads(out.read_text())
        moved = 0
        for pi in result:
            files = pi["files"]
            assert all(f is None or "sha256" in f for f in files.values()), pi
            version = next(w.split("=", 1)[1] for w in pi["text"]["cmdline.txt"].split()
                           if w.startswith("netbootd.version="))
            assert files["kernel_2712.img"]["sha256"] == kernel[version], \
                f"{pi['serial']}: cmdline names {version}, the kernel is another version's"
            assert version == "1", "every Pi started before the swap: it finishes on v1"
            moved += any(f and f["server"] != lab.ip("srv") for f in files.values())
        assert moved, "the kill landed mid-storm: some Pis finished on another replica"

        # etcd member loss (1 of 3): no effect
        members.stop("srv3")
        status, body = r3.request("POST", "/api/v1/images/pi/activate",
                                  {"version": "1", "channel": "prod"}, auth=True)
        assert status == 200, body
        wait(lambda: prod(r2) == "1", 30, "r2 follows with 2 of 3 etcd members")
        # etcd fully down: activation refused clearly, /readyz says so
        members.stop("srv")
        members.stop("srv2")
        wait(lambda: r2.request("GET", "/readyz")[0] == 503, 60, "r2 unready without etcd")
        status, body = r2.request("POST", "/api/v1/images/pi/activate",
                                  {"version": "2", "channel": "prod"}, auth=True)
        assert status == 409 and "etcd is unreachable" in json.dumps(body), body
        # a known Pi still boots (planned locally from what the replica knows)
        again = lab.run_in("pi", [sys.executable, "-m", "netbootd.lab.pistorm", "--servers",
                                  lab.ip("srv2"), "--serials", SERIALS[0], "--out",
                                  str(lab_out / "again.json"), "--bind", lab.ip("pi")],
                           check=False, timeout=300)
        assert again.returncode == 0, again.stderr
        assert json.loads((lab_out / "again.json").read_text())[0]["files"][
            "kernel_2712.img"]["sha256"] == kernel["1"]
        # etcd back: converge without anyone touching the replicas
        members.start()
        for r in (r2, r3):
            wait(lambda r=r: r.request("GET", "/readyz")[0] == 200, 120, f"{r.role} ready")
        status, body = r2.request("POST", "/api/v1/images/pi/activate",
                                  {"version": "2", "channel": "prod"}, auth=True)
        assert status == 200, body
        wait(lambda: prod(r3) == "2", 30, "r3 follows r2 again")
    finally:
        for r in replicas:
            r.stop()
        if members is not None:
            members.close()
        lab.close()
