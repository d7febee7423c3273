"""A bridged LAN in test-made namespaces with a real site DHCP server and netbootd's DHCP
service on it: the common ground of the proxy-DHCP e2e tests.

``sw`` holds the bridge, ``dhcp`` runs dnsmasq (the site server: address pool only),
``srv`` runs ``python -m netbootd.dhcp`` at ``<net>.1``; every other port is described by
the test (its address, or none for a machine that asks the site server, and its MAC).
Everything this module starts or creates is removed when the context ends, also on
failure: the processes by PID, then every namespace (``remove_namespaces`` kills what is
left inside them first).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netbootd.lab.netns import remove_namespaces
from tests.conftest import wait_for


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


@dataclass(frozen=True)
class Port:
    """A machine on the bridge: its role (namespace suffix), host number in the /24 (None:
    no static address), and MAC (None: the kernel's)."""

    role: str
    host: int | None = None
    mac: str | None = None


@dataclass
class DhcpLan:
    prefix: str
    tag: str
    net: str  # "10.231.X"
    tmp: Path
    roles: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{self.tag}-{role}"

    @property
    def server(self) -> str:
        return f"{self.net}.1"

    @property
    def site(self) -> str:
        return f"{self.net}.2"

    def events(self) -> list[dict]:
        """The service's event log so far (a line still being written is left out)."""
        path = self.tmp / "state" / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def learnt(self, mac: str) -> list[str]:
        """Addresses netbootd recorded as learnt for ``mac``, oldest first."""
        return [e["fields"]["ip"] for e in self.events()
                if e.get("kind") == "address" and e.get("mac") == mac]

    def spawn(self, role: str, *cmd: str, **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *cmd], **kw)
        self.procs.append(p)
        return p


def wait_line(proc: subprocess.Popen, stream, needle: str, timeout: float) -> str:
    """Read ``stream`` until a line contains ``needle``; fail with what was read (the
    bound is generous: it only decides when a process that never says it is ready is
    taken to be broken)."""
    seen = []
    end = time.monotonic() + timeout
    os.set_blocking(stream.fileno(), False)
    while time.monotonic() < end:
        line = stream.readline()
        if line:
            seen.append(line)
            if needle in line:
                return line
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.02)
    raise AssertionError(f"no {needle!r} within {timeout}s: {''.join(seen)[-2000:]}")


def _bridge(lan: DhcpLan, ports: Sequence[Port]) -> None:
    for role in lan.roles:
        sh("ip", "netns", "add", lan.ns(role))
        sh("ip", "-n", lan.ns(role), "link", "set", "lo", "up")
    sw = lan.ns("sw")
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0",
       "forward_delay", "0")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    for port in ports:
        ns = lan.ns(port.role)
        sh("ip", "-n", sw, "link", "add", f"p-{port.role}", "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        sh("ip", "-n", sw, "link", "set", f"p-{port.role}", "master", "br0", "up")
        if port.mac:
            sh("ip", "-n", ns, "link", "set", "eth0", "address", port.mac)
        if port.host is not None:
            sh("ip", "-n", ns, "addr", "add", f"{lan.net}.{port.host}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")


@contextmanager
def dhcp_lan(tmp: Path, prefix: str, clients: Sequence[Port], nodes_yaml: str,
             subnets: range = range(100, 200)) -> Iterator[DhcpLan]:
    """The LAN with ``clients`` on it, dnsmasq serving ``<net>.100-199``, and netbootd's
    DHCP service (``policy.unknown: default``, the inventory ``nodes_yaml``) ready."""
    net = f"10.231.{subnets[secrets.randbelow(len(subnets))]}"
    ports = [Port("dhcp", 2), Port("srv", 1), *clients]
    lan = DhcpLan(prefix=prefix, tag=secrets.token_hex(3), net=net, tmp=tmp,
                  roles=["sw", *(p.role for p in ports)])
    try:
        _bridge(lan, ports)
        site_log = tmp / "dnsmasq.log"
        with open(site_log, "w") as log:  # a file, not a pipe nobody drains
            dnsmasq = lan.spawn(
                "dhcp", "dnsmasq", "-d", "--conf-file=/dev/null", "--port=0", "--no-ping",
                "--user=root", "--bind-interfaces", "--interface=eth0",
                f"--dhcp-range={net}.100,{net}.199,255.255.255.0,1h",
                f"--dhcp-leasefile={tmp / 'leases'}", f"--pid-file={tmp / 'dnsmasq.pid'}",
                stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: "DHCP, IP range" in site_log.read_text() or dnsmasq.poll() is not None,
                 30, "dnsmasq to serve")
        assert dnsmasq.poll() is None, site_log.read_text()
        (tmp / "nodes.yaml").write_text(nodes_yaml)
        (tmp / "netbootd.yaml").write_text(
            "policy: {unknown: default}\n"
            f"paths: {{state: {tmp / 'state'}, inventory: {tmp / 'nodes.yaml'}}}\n")
        with open(tmp / "srv.log", "w") as srv_log:  # the child keeps its own copy of the fd
            srv = lan.spawn("srv", sys.executable, "-m", "netbootd.dhcp", "--config",
                            str(tmp / "netbootd.yaml"), "--log-level", "INFO",
                            stdout=subprocess.PIPE, stderr=srv_log, text=True)
        wait_line(srv, srv.stdout, "ready", 60)
        yield lan
    finally:
        for p in lan.procs:
            if p.poll() is None:
                p.terminate()
        remove_namespaces([lan.ns(role) for role in lan.roles])
        for p in lan.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
