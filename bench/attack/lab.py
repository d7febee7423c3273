"""The attack run's little world: two network namespaces and a default-configured netbootd.

``nbda-<tag>-srv`` holds netbootd (10.231.X.1/24), ``nbda-<tag>-atk`` the attacker and
the honest client (10.231.X.2 and up), joined by one veth pair: nothing else is
reachable from either, so every packet an attack sends stays between the two. Teardown
(always: ``close()``, the context manager, ``atexit``, and SIGTERM/SIGINT turned into
exceptions while the world exists) ends the daemon's process group, kills what
``ip netns pids`` lists in our two namespaces, and deletes them, which deletes the veths.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]
PREFIX = "nbda-"
#: The only addresses an attack may target (inside our namespaces).
ALLOWED = (ipaddress.ip_network("10.231.0.0/16"), ipaddress.ip_network("172.31.231.0/24"))


def check_target(ip: str) -> str:
    """Refuse any target outside the namespaces' ranges (a typo must not leave the lab)."""
    addr = ipaddress.ip_address(ip)
    if not any(addr in net for net in ALLOWED):
        raise SystemExit(f"refusing target {ip}: only 10.231.x.x / 172.31.231.x are allowed")
    return ip


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _subnets_in_use() -> set[int]:
    used: set[int] = set()
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if not ns:
            continue
        out = sh("ip", "-n", ns, "-4", "-o", "addr", check=False).stdout
        used.update(int(m) for m in re.findall(r"\b10\.231\.(\d+)\.", out))
    return used


class World:
    """The two namespaces. ``ip(n)``: 10.231.X.n; ``exec_in("atk", argv)``: argv inside."""

    def __init__(self, extra_atk_hosts: Sequence[int] = ()) -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = 0
        self.extra = list(extra_atk_hosts)
        self._made: list[str] = []
        self._groups: list[int] = []
        self._old: dict[int, Any] = {}
        self._closed = False

    def ns(self, role: str) -> str:
        return f"{PREFIX}{self.tag}-{role}"

    def ip(self, host: int) -> str:
        return f"10.231.{self.subnet}.{host}"

    def prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> World:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, _raise)
        atexit.register(self.close)
        try:
            used = _subnets_in_use()
            self.subnet = next(x for x in range(240, 10, -1) if x not in used)
            for role in ("srv", "atk"):
                sh("ip", "netns", "add", self.ns(role))
                self._made.append(self.ns(role))
                sh("ip", "-n", self.ns(role), "link", "set", "lo", "up")
            sh("ip", "-n", self.ns("srv"), "link", "add", "eth0", "type", "veth", "peer",
               "name", "eth0", "netns", self.ns("atk"))
            sh("ip", "-n", self.ns("srv"), "addr", "add", f"{self.ip(1)}/24", "dev", "eth0")
            sh("ip", "-n", self.ns("atk"), "addr", "add", f"{self.ip(2)}/24", "dev", "eth0")
            for host in self.extra:
                sh("ip", "-n", self.ns("atk"), "addr", "add", f"{self.ip(host)}/24", "dev",
                   "eth0")
            for role in ("srv", "atk"):
                sh("ip", "-n", self.ns(role), "link", "set", "eth0", "up")
            return self
        except BaseException:
            self.close()
            raise

    def track_group(self, pgid: int) -> None:
        self._groups.append(pgid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pgid in self._groups:  # groups we created (start_new_session)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for ns in self._made:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 5
        for ns in self._made:
            while sh("ip", "netns", "pids", ns, check=False).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            sh("ip", "netns", "del", ns, check=False)
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def leftovers(self) -> list[str]:
        listed = sh("ip", "netns", "list", check=False).stdout
        return [ns for ns in self._made if ns in listed]


def _raise(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def default_config(out: Path) -> Path:
    """The shipped config/ copied to ``out`` with its store and state inside ``out``: the
    daemon runs with the defaults the repository ships, nothing tuned for the attacks."""
    cfg = out / "config"
    shutil.copytree(REPO / "config", cfg)
    text = (cfg / "netbootd.yaml").read_text()
    text = text.replace("images: ../images", f"images: {out / 'images'}")
    text = text.replace("state: ../images/state", f"state: {out / 'state'}")
    (cfg / "netbootd.yaml").write_text(text)
    return cfg / "netbootd.yaml"


def demo_image(config: Path) -> None:
    """The demo image in the store and active on prod (as after ``./setup.sh serve``), so
    the example nodes are planned and their cloud-init exists."""
    sys.path.insert(0, str(REPO))
    from netbootd.settings import load_settings
    from netbootd.store.build import sample_build
    from netbootd.store.store import ImageStore

    settings = load_settings(config)
    store = ImageStore(settings.paths.images, settings.paths.state, settings.store)
    sample_build(store.layout.incoming / "demo-1", "demo", "2026.12.05-1")
    result = store.ingest_entry("demo-1")
    if result is None or not result.accepted:
        raise RuntimeError(f"demo image not ingested: {result}")
    if store.active("demo", "prod") != "2026.12.05-1":
        store.activate("demo", "2026.12.05-1", "prod", by="attack-run")


class Daemon:
    """``python -m netbootd serve`` in the srv namespace, in a process group of its own
    (as under a terminal or systemd), open-file limit as the unit sets it (LimitNOFILE)."""

    NOFILE = 16384

    def __init__(self, world: World, config: Path, log: Path) -> None:
        self.world, self.config, self.log_path = world, config, log
        self.proc: subprocess.Popen | None = None
        self.workers: list[int] = []

    def start(self, timeout: float = 60) -> Daemon:
        log = open(self.log_path, "w")  # noqa: SIM115 - the child keeps it
        env = dict(os.environ, PYTHONPATH=str(REPO))
        # inherited by the child (no preexec_fn: this harness has threads)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < self.NOFILE:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.NOFILE, max(hard, self.NOFILE)))
        # ip netns exec execs the command: the PID we get is the daemon's own
        self.proc = subprocess.Popen(
            [*self.world.prefix("srv"), sys.executable, "-m", "netbootd",
             "--config", str(self.config), "serve"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            start_new_session=True)
        log.close()
        self.world.track_group(self.proc.pid)
        end = time.monotonic() + timeout
        while "netbootd serving" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"netbootd did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        while len(self.children()) < 1 and time.monotonic() < end:
            time.sleep(0.05)  # the TFTP workers (one per CPU by default)
        self.workers = self.children()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        out: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
        return out

    def rss_mb(self) -> tuple[float, float]:
        """(daemon, daemon + workers) resident set, MiB."""
        own = _rss(self.pid)
        return own, own + sum(_rss(p) for p in self.children())

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        """SIGTERM to the whole process group (what a Ctrl-C or systemd's default
        KillMode does; the harder case): seconds until the daemon exited, its exit status,
        whether every worker is gone, and the ERROR lines of its log."""
        assert self.proc is not None
        workers = self.children() or self.workers
        t0 = time.monotonic()
        os.killpg(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - t0
        gone_by = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < gone_by:
            time.sleep(0.02)
        left = [p for p in workers if Path(f"/proc/{p}").exists()]
        errors = [line for line in self.log_path.read_text().splitlines()
                  if " ERROR " in line or "died" in line or "Traceback" in line]
        return {"stop_s": round(seconds, 3), "exit": code, "workers_left": left,
                "error_lines": errors}


def _rss(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def in_ns(world: World, role: str, argv: Sequence[str], *, timeout: float = 300
          ) -> subprocess.CompletedProcess:
    return subprocess.run([*world.prefix(role), *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def script(name: str) -> list[str]:
    """argv of one of this directory's attack scripts."""
    return [sys.executable, str(Path(__file__).with_name(name))]
