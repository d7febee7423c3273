"""netbootd itself in the lab's ``srv`` namespace: config files, start, API calls, stop.

The daemon runs exactly as a user runs it (``netbootd serve --config FILE``) on its normal
ports (67, 4011, 69, 8080): the ``srv`` namespace is isolated, so nothing clashes with the
host. Its config and inventory are written into the lab's output directory, next to its
log, so a failed test leaves everything needed to replay it.

API calls go through ``curl`` run inside the namespace: the test process lives in the root
namespace and must not get a route into the lab.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .netns import LabError, Topology
from .tools import drop_build

REPO = Path(__file__).resolve().parents[2]


def netbootd_argv() -> list[str]:
    """``python -m netbootd`` with this interpreter: the daemon runs the same code as the
    tests that start it (with ``PYTHONPATH`` set to this checkout, see ``start``), even
    when the checkout is a separate worktree of an editable install."""
    return [sys.executable, "-m", "netbootd"]


class Netbootd:
    """One daemon in ``lab``'s srv namespace. ``nodes`` is the inventory's ``nodes:`` map."""

    def __init__(self, lab: Topology, outdir: Path, *, nodes: dict[str, dict] | None = None,
                 profiles: dict[str, dict] | None = None, unknown: str = "ignore",
                 settings: dict[str, Any] | None = None, http_port: int = 8080,
                 log_level: str = "INFO", role: str = "srv") -> None:
        self.lab = lab
        #: The namespace it runs in: ``srv``, or ``srv2``/``srv3`` for further replicas.
        self.role = role
        self.dir = outdir / ("netbootd" if role == "srv" else f"netbootd-{role}")
        self.nodes = nodes or {}
        self.profiles = profiles or {"default": {"image": "demo", "channel": "prod",
                                                 "action": "netboot"}}
        self.unknown = unknown
        self.extra = settings or {}
        self.http_port = http_port
        self.log_level = log_level
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ paths
    @property
    def config_dir(self) -> Path:
        """Only config lives here: the daemon watches this directory for reloads."""
        return self.dir / "config"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "netbootd.yaml"

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def incoming(self) -> Path:
        return self.images / "incoming"

    @property
    def log(self) -> Path:
        return self.dir.parent / ("netbootd.log" if self.role == "srv"
                                  else f"netbootd-{self.role}.log")

    @property
    def base_url(self) -> str:
        return f"http://{self.lab.ip(self.role)}:{self.http_port}"

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "network": {"interfaces": ["eth0"], "advertise": self.lab.ip(self.role)},
            "dhcp": {"enabled": True},
            "tftp": {"enabled": True},
            "http": {"enabled": True, "port": self.http_port, "api_token_file": "api-token",
                     "strict_user_data": False},
            "paths": {"images": str(self.images), "state": str(self.dir / "state"),
                      "inventory": "nodes.yaml",
                      "templates": str(REPO / "config" / "templates")},
            "policy": {"unknown": self.unknown},
            "boot": {"default_image": "demo", "default_channel": "prod"},
            "store": {"auto_activate": {"*": "prod"}},
            # The lab network, not 0.0.0.0/0: ganesha renders that as "*", a host-name
            # wildcard it matches by reverse DNS, which a lab has none of (measured: flaky
            # "requires stronger authentication" on mount).
            "nfs": {"clients": self.lab.network},
        }
        for section, values in self.extra.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        return cfg

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "api-token").write_text(self.token + "\n")
        self.config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.write_inventory()

    def write_inventory(self) -> None:
        """(Re)write nodes.yaml by temp + rename: the daemon hot-reloads it."""
        tmp = self.config_dir / ".nodes.yaml.tmp"
        tmp.write_text(yaml.safe_dump({"profiles": self.profiles, "nodes": self.nodes},
                                      sort_keys=False))
        tmp.rename(self.config_dir / "nodes.yaml")

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 20.0) -> Netbootd:
        self.write_config()
        argv = netbootd_argv() + ["--config", str(self.config_file), "--log-level", self.log_level,
                                  "serve"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NETBOOTD_CONFIG", None)
        self.proc = self.lab.popen(self.role, argv, log_file=self.log, cwd=str(self.dir),
                                   env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"netbootd exited ({self.proc.returncode}); see {self.log}")
            code, _ = self.request("GET", "/healthz", timeout=2)
            if code == 200:
                return self
            time.sleep(0.2)
        raise LabError(f"netbootd not healthy within {timeout}s; see {self.log}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM and wait; returns the exit code (the daemon must stop within 2 s)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        return self.proc.returncode

    # ------------------------------------------------------------------ API
    def request(self, method: str, path: str, body: Any = None, *, auth: bool = False,
                timeout: float = 10) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one HTTP call, made from inside the namespace."""
        argv = ["curl", "-s", "-m", str(timeout), "-X", method, "-o", "-", "-w",
                "\n%{http_code}", self.base_url + path]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        if auth:
            argv += ["-H", f"Authorization: Bearer {self.token}"]
        proc = self.lab.run_in(self.role, argv, check=False, timeout=timeout + 5)
        text, _, code = proc.stdout.rpartition("\n")
        try:
            status = int(code)
        except ValueError:
            return 0, proc.stderr
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get(self, path: str) -> Any:
        status, data = self.request("GET", path)
        if status != 200:
            raise LabError(f"GET {path}: {status} {data}")
        return data

    def node(self, mac: str) -> dict[str, Any] | None:
        status, data = self.request("GET", f"/api/v1/nodes/{mac}")
        return data if status == 200 else None

    def wait_node(self, mac: str, phase: str, timeout: float,
                  version: str | None = None) -> dict[str, Any] | None:
        """Poll the node API until ``mac`` reaches ``phase`` (and ``version``); else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.node(mac)
            if n and n.get("phase") == phase and (version is None or n.get("version") == version):
                return n
            time.sleep(0.5)
        return None

    def active_version(self, image: str, channel: str = "prod") -> str | None:
        """The version the channel pointer names (the store's on-disk contract; with
        replicas, what the API says: the pointer lives in etcd), or None."""
        if self.extra.get("cluster", {}).get("backend") == "etcd":
            status, data = self.request("GET", "/api/v1/images")
            for img in data.get("images", []) if status == 200 else []:
                if img.get("name") == image:
                    return (img.get("channels") or {}).get(channel)
            return None
        try:
            return (self.images / "channels" / image / channel).read_text().strip() or None
        except OSError:
            return None

    def publish(self, build: Path, channel: str = "prod", timeout: float = 30) -> str:
        """Drop a build into incoming/ (as CI does) and wait until it is active on
        ``channel``; its version."""
        manifest = json.loads((build / "manifest.json").read_text())
        drop_build(build, self.incoming)
        if not self.wait_active(manifest["image"], manifest["version"], channel, timeout):
            raise LabError(f"{manifest['image']} {manifest['version']} not active after "
                           f"{timeout}s; see {self.log}")
        return manifest["version"]

    def wait_active(self, image: str, version: str, channel: str = "prod",
                    timeout: float = 30, poll: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active_version(image, channel) == version:
                return True
            time.sleep(poll)
        return False
