"""An etcd cluster in the lab: one member in each replica's namespace (srv, srv2, srv3).

Each member listens on its namespace's lab address (client 2379, peer 2380) with its
data in the lab's output directory, so ``netbootd lab --replicas N`` and the replica
tests run the same 3-member cluster a site would. Members are the lab's processes:
:meth:`stop` takes one away (member loss), :meth:`start` brings it back, and the lab's
teardown kills whatever is left in its namespaces.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .netns import LabError, Topology

CLIENT, PEER = 2379, 2380


class EtcdMembers:
    def __init__(self, lab: Topology, outdir: Path, roles: tuple[str, ...]) -> None:
        self.lab = lab
        self.dir = outdir / "etcd"
        self.roles = roles
        self.procs: dict[str, subprocess.Popen[bytes] | None] = {}
        self.initial = ",".join(f"{r}=http://{lab.ip(r)}:{PEER}" for r in roles)

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.lab.ip(r)}:{CLIENT}" for r in self.roles]

    def start(self, role: str | None = None) -> EtcdMembers:
        """Start every member (or one), then wait until the cluster answers."""
        for r in ([role] if role else self.roles):
            ip = self.lab.ip(r)
            argv = ["etcd", "--name", r, "--data-dir", str(self.dir / r),
                    "--listen-client-urls", f"http://{ip}:{CLIENT}",
                    "--advertise-client-urls", f"http://{ip}:{CLIENT}",
                    "--listen-peer-urls", f"http://{ip}:{PEER}",
                    "--initial-advertise-peer-urls", f"http://{ip}:{PEER}",
                    "--initial-cluster", self.initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", self.lab.name,
                    # a loaded machine: generous elections, no flapping leader
                    "--heartbeat-interval", "200", "--election-timeout", "2000",
                    "--log-level", "warn", "--logger", "zap"]
            self.procs[r] = self.lab.popen(r, argv, log_file=self.dir / f"{r}.log")
        self.wait_healthy([role] if role else list(self.roles))
        return self

    def healthy(self, role: str) -> bool:
        out = self.lab.run_in(role, ["curl", "-s", "-m", "2",
                                     f"http://{self.lab.ip(role)}:{CLIENT}/health"],
                              check=False, timeout=10)
        return '"health":"true"' in out.stdout.replace(" ", "")

    def wait_healthy(self, roles: list[str], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(r) for r in roles):
                return
            for r in roles:
                p = self.procs.get(r)
                if p is not None and p.poll() is not None:
                    raise LabError(f"etcd {r} exited; see {self.dir / (r + '.log')}")
            time.sleep(0.3)
        raise LabError(f"etcd not healthy within {timeout:.0f}s; see {self.dir}")

    def stop(self, role: str) -> None:
        p = self.procs.get(role)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs[role] = None

    def close(self) -> None:
        for r in self.roles:
            self.stop(r)
