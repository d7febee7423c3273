"""Namespaces, a bridge, veths and taps for one lab instance, with guaranteed teardown.

Topology (lab.md): a ``sw`` namespace holds the bridge (STP off, forward delay 0, so a port
forwards at once instead of after 2x15 s) and the QEMU taps; ``dhcp``, ``srv`` and ``pi``
each get one veth into the bridge; ``add_pi()`` adds more Pi namespaces (``pi2``, ``pi3``,
...: one board each, so every emulated Pi has its own MAC, address and routes, as real
boards on one switch do). One private /24 ``10.231.X.0/24`` lives only inside
these namespaces; X is chosen per instance so parallel labs never share addresses.

Teardown kills the PIDs ``ip netns pids`` lists (only the lab's own processes live in its
namespaces), then deletes the namespaces, which removes the bridge, veths and taps with
them. It runs from ``close()``, the context manager, an ``atexit`` hook and, while a lab is
open, SIGTERM/SIGINT (turned into exceptions so ``finally`` blocks run).

We drive ``ip`` (iproute2) rather than pyroute2 here: every step is one readable command
that a person can replay by hand when a lab misbehaves, and the lab is not a hot path.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

log = logging.getLogger("netbootd.lab.netns")

PREFIX = "nbd-"
#: Exactly the names Topology makes: other tools' nbd-* namespaces are never touched.
_OURS = re.compile(r"^nbd-[0-9a-f]{6}-(sw|dhcp|srv|srv2|srv3|pi[0-9]*)$")
ROLES = ("sw", "dhcp", "srv", "pi")
#: The servers of a lab with replicas (``netbootd lab --replicas N``): srv, srv2, srv3.
REPLICA_ROLES = ("srv", "srv2", "srv3")

#: Host part of each role's address in 10.231.X.0/24.
HOSTS = {"srv": 1, "dhcp": 2, "pi": 3, "srv2": 4, "srv3": 5}
POOL = (100, 199)  #: site DHCP pool host range


class LabError(RuntimeError):
    """The lab could not be built; the message names the failing command."""


def run(cmd: Sequence[str], *, check: bool = True, capture: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command; raise LabError with its stderr when it fails."""
    log.debug("run %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), check=False, capture_output=capture, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                       f"{(proc.stderr or '').strip()}")
    return proc


def namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _used_subnets() -> set[int]:
    """Third octets of 10.231.X.0/24 in use by other labs (their srv namespaces)."""
    used = set()
    for ns in namespaces():
        if not (ns.startswith(PREFIX) and ns.endswith("-srv")):
            continue
        out = run(["ip", "-n", ns, "-4", "-o", "addr"], check=False).stdout
        for word in out.split():
            if word.startswith("10.231."):
                used.add(int(word.split(".")[2]))
    return used


def random_mac(oui: str = "52:54:00") -> str:
    """A MAC under ``oui`` (default QEMU's 52:54:00) with random low bytes."""
    return oui + ":" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


@dataclass
class Topology:
    """One lab instance. Use as a context manager, or call :meth:`up` and :meth:`close`.

    ``ns("srv")`` is the namespace name, ``ip("srv")`` the address, ``exec_prefix("srv")``
    the argv prefix that runs a command inside it.
    """

    subnet: int | None = None  #: X in 10.231.X.0/24; None = pick a free one
    roles: tuple[str, ...] = ROLES
    pi_mac: str = field(default_factory=lambda: random_mac("d8:3a:dd"))
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    _created: list[str] = field(default_factory=list, init=False)
    _taps: list[str] = field(default_factory=list, init=False)
    _pi_macs: dict[str, str] = field(default_factory=dict, init=False)
    _old_handlers: dict[int, Any] = field(default_factory=dict, init=False)
    _closed: bool = field(default=False, init=False)

    # ------------------------------------------------------------------ names
    @property
    def name(self) -> str:
        return f"{PREFIX}{self.tag}"

    def ns(self, role: str) -> str:
        return f"{self.name}-{role}"

    @property
    def network(self) -> str:
        return f"10.231.{self.subnet}.0/24"

    def ip(self, role: str) -> str:
        return f"10.231.{self.subnet}.{HOSTS[role]}"

    @property
    def pool(self) -> tuple[str, str]:
        return (f"10.231.{self.subnet}.{POOL[0]}", f"10.231.{self.subnet}.{POOL[1]}")

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    # ------------------------------------------------------------------ build
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> Topology:
        """Create namespaces, bridge and veths. On any failure, tear down what exists."""
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            if self.subnet is None:
                used = _used_subnets()
                free = [x for x in range(10, 250) if x not in used]
                self.subnet = random.choice(free)
            for role in self.roles:
                run(["ip", "netns", "add", self.ns(role)])
                self._created.append(self.ns(role))
                run(["ip", "-n", self.ns(role), "link", "set", "lo", "up"])
            sw = self.ns("sw")
            run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                 "forward_delay", "0"])
            run(["ip", "-n", sw, "link", "set", "br0", "up"])
            for role in self.roles:
                if role == "sw":
                    continue
                self._veth(role)
            return self
        except BaseException:
            self.close()
            raise

    def _veth(self, role: str) -> None:
        sw, ns = self.ns("sw"), self.ns(role)
        port = f"p-{role}"
        run(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
        if role == "pi":
            run(["ip", "-n", ns, "link", "set", "eth0", "address", self.pi_mac])
        elif role in self._pi_macs:
            run(["ip", "-n", ns, "link", "set", "eth0", "address", self._pi_macs[role]])
        if role in HOSTS and role != "pi":
            run(["ip", "-n", ns, "addr", "add", f"{self.ip(role)}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def add_tap(self) -> str:
        """A new tap on the bridge for one QEMU guest; QEMU must run in the ``sw`` namespace."""
        name = f"tap{len(self._taps)}"
        sw = self.ns("sw")
        run(["ip", "-n", sw, "tuntap", "add", "dev", name, "mode", "tap"])
        run(["ip", "-n", sw, "link", "set", name, "master", "br0", "up"])
        self._taps.append(name)
        return name

    def add_pi(self, mac: str | None = None) -> str:
        """Another Pi board: a namespace of its own (``pi2``, ``pi3``, ...) with one veth
        into the bridge and a Raspberry Pi MAC. Returns its role name for ``popen`` and
        ``run_in``; ``close()`` removes it with the rest of the lab."""
        role = f"pi{len(self._pi_macs) + 2}"
        self._pi_macs[role] = mac or random_mac("d8:3a:dd")
        run(["ip", "netns", "add", self.ns(role)])
        self._created.append(self.ns(role))
        run(["ip", "-n", self.ns(role), "link", "set", "lo", "up"])
        self._veth(role)
        return role

    def pi_mac_of(self, role: str) -> str:
        """The MAC of a Pi role's eth0 (``pi`` or one made by :meth:`add_pi`)."""
        return self.pi_mac if role == "pi" else self._pi_macs[role]

    def add_address(self, role: str, cidr: str) -> None:
        """An extra address inside a namespace (e.g. the pi namespace's own /24 address)."""
        run(["ip", "-n", self.ns(role), "addr", "add", cidr, "dev", "eth0"])

    def wait_ready(self, role: str, timeout: float = 5.0) -> None:
        """Wait until the role's address is usable (IPv4 DAD does not apply, but the veth
        carrier can lag a few ms behind `link set up`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = run(["ip", "-n", self.ns(role), "link", "show", "eth0"], check=False).stdout
            if "LOWER_UP" in out:
                return
            time.sleep(0.05)
        raise LabError(f"{self.ns(role)} eth0 has no carrier after {timeout}s")

    # ------------------------------------------------------------------ processes
    def popen(self, role: str, argv: Sequence[str], *, log_file: Path | None = None,
              **kw: Any) -> subprocess.Popen[bytes]:
        """Start a process inside a namespace (``ip netns exec`` execs it: same PID)."""
        out: Any = subprocess.DEVNULL
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_file, "ab")  # noqa: SIM115 - owned by the child from here
        try:
            return subprocess.Popen(self.exec_prefix(role) + list(argv), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **kw)
        finally:
            if log_file is not None:
                out.close()

    def run_in(self, role: str, argv: Sequence[str], *, check: bool = True,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(self.exec_prefix(role) + list(argv), check=check, timeout=timeout)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill every process in the lab's namespaces, then delete them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        remove_namespaces([ns for ns in namespaces() if ns.startswith(self.name + "-")])
        self._restore_signal_handlers()
        log.info("lab %s torn down", self.name)

    def leftovers(self) -> list[str]:
        """What of this lab still exists (namespaces, processes): empty after close()."""
        mine = [ns for ns in namespaces() if ns.startswith(self.name + "-")]
        left = [f"netns {ns}" for ns in mine]
        for ns in mine:
            left += [f"pid {p} in {ns}" for p in netns_pids(ns)]
        return left

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            # Raise in the main thread so every finally/context manager runs; the lab's
            # own close() is among them.
            raise KeyboardInterrupt(f"signal {signum}")

        # SIGINT too: a process started in the background by a non-interactive shell
        # inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):  # not main thread / None handler
                pass
        self._old_handlers.clear()


def kill_namespace_pids(nss: Sequence[str], grace: float = 2.0) -> None:
    """SIGTERM every PID inside ``nss``, wait up to ``grace`` s, then SIGKILL the rest."""
    pids = {p for ns in nss for p in netns_pids(ns)}
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if _alive(p)}
        time.sleep(0.05)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    for _ in range(40):  # reap/await exit so `ip netns del` does not race a dying process
        if not any(netns_pids(ns) for ns in nss):
            break
        time.sleep(0.05)


def remove_namespaces(nss: Sequence[str], grace: float = 2.0) -> None:
    """Kill every process inside ``nss`` (only what runs there, by PID), then delete the
    namespaces, which removes their veths, bridges and taps with them."""
    kill_namespace_pids(nss, grace)
    for ns in nss:
        run(["ip", "netns", "del", ns], check=False)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own children so they do not linger as zombies
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def missing_tools(tools: Sequence[str]) -> list[str]:
    """Executables from ``tools`` that are not on PATH (or an absolute path that is absent)."""
    out = []
    for t in tools:
        if os.path.isabs(t):
            if not os.path.exists(t):
                out.append(t)
        elif shutil.which(t) is None:
            out.append(t)
    return out


def cleanup_stale(max_age: float = 3600.0) -> list[str]:
    """Delete nbd-* namespaces older than ``max_age`` s with no live process: leftovers of a
    run killed by SIGKILL. The age check keeps a lab that is being built right now safe."""
    removed = []
    now = time.time()
    for ns in namespaces():
        try:
            age = now - os.stat(f"/run/netns/{ns}").st_mtime
        except OSError:
            continue
        if _OURS.match(ns) and age > max_age and not netns_pids(ns):
            run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    return removed
