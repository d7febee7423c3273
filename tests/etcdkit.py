"""Real etcd members for tests: loopback ports, their own data directories, stopped by PID.

``EtcdCluster(tmp_path, members=3)`` starts a cluster whose members listen on
127.0.0.1 (or on the addresses given, for namespaces); ``stop(i)`` / ``start(i)``
take one member away and bring it back (the failure tests); ``close()`` stops every
member this object started and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from netbootd.lab.forward import pump
from tests.conftest import (
    free_port,
    wait_for,  # noqa: F401  (the cluster tests take it from here)
)

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdCluster:
    def __init__(self, base: Path, members: int = 1, host: str = "127.0.0.1",
                 netns: list[str] | None = None) -> None:
        self.base = base
        self.names = [f"m{i}" for i in range(members)]
        self.hosts = [host] * members
        self.client_ports = [free_port() for _ in range(members)]
        self.peer_ports = [free_port() for _ in range(members)]
        self.netns = netns
        self.procs: list[subprocess.Popen | None] = [None] * members
        self.initial = ",".join(f"{n}=http://{h}:{p}" for n, h, p in
                                zip(self.names, self.hosts, self.peer_ports))
        for i in range(members):
            self.start(i, new=True)
        self.wait_healthy()

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{h}:{p}" for h, p in zip(self.hosts, self.client_ports)]

    def start(self, i: int, *, new: bool = False) -> None:
        url = self.endpoints[i]
        peer = f"http://{self.hosts[i]}:{self.peer_ports[i]}"
        data = self.base / f"etcd-{self.names[i]}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [ETCD, "--name", self.names[i], "--data-dir", str(data),
               "--listen-client-urls", url, "--advertise-client-urls", url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", self.initial, "--initial-cluster-token",
               f"t{os.getpid()}-{self.client_ports[0]}",
               "--initial-cluster-state", "new",
               # a loaded 2-core machine: generous election timing, no flapping leader
               "--heartbeat-interval", "200", "--election-timeout", "2000",
               "--log-level", "warn", "--logger", "zap"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns[i], *cmd]
        with open(self.base / f"etcd-{self.names[i]}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log,
                                             start_new_session=True)

    def stop(self, i: int) -> None:
        p = self.procs[i]
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs[i] = None

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(self.endpoints[i] + "/health", timeout=2) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def wait_healthy(self, members: list[int] | None = None, bound: float = 90.0) -> None:
        deadline = time.monotonic() + bound
        want = members if members is not None else [i for i, p in enumerate(self.procs) if p]
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i in want):
                return
            for i in want:
                p = self.procs[i]
                if p is not None and p.poll() is not None:
                    log = (self.base / f"etcd-{self.names[i]}.log").read_text()[-2000:]
                    raise RuntimeError(f"etcd {self.names[i]} exited: {log}")
            time.sleep(0.2)
        raise TimeoutError(f"etcd not healthy within {bound} s")

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.stop(i)


class Gate:
    """A TCP forwarder on loopback in front of one etcd member, that a test can shut and
    open again on the same port: a replica cut off from etcd while the others go on
    (the partition tests), with the member itself untouched. Real sockets both ways."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.open()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def shut(self) -> None:
        """Refuse new connections and cut every open one (a watch stream ends now)."""
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # shut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()
