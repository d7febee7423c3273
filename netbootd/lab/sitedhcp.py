"""The *site* DHCP server of the lab: dnsmasq-base handing out addresses, nothing else.

netbootd is a proxy-DHCP server: it never gives addresses, so every lab needs an ordinary
DHCP server next to it, as every real LAN has. dnsmasq runs alone in the ``dhcp`` namespace
(pitfall 4: two DHCP servers in one namespace fight over port 67) with:

* ``--no-ping`` (pitfall 3: otherwise 3 s of ICMP probing before each offer);
* router advertisements with router lifetime 0 on a ULA that exists only inside the lab
  (pitfall 2: iPXE waits ~13 s for IPv6 autoconfiguration when no router answers);
* no router and no DNS options (the lab has neither), no DNS service (``--port=0``);
  with ``dns=`` it names that server (netbootd's own DNS, which answers a Pi's
  ``HTTP_HOST`` name) in every lease, as a site points its DHCP at a resolver;
* its own lease file and log in the lab's output directory, so tests can see who got what;
* for U-Boot clients (vendor class ``U-Boot...``) only, ``next-server`` = netbootd and the
  boot script's name: a stock U-Boot (no ``CONFIG_SERVERIP_FROM_PROXYDHCP``) drops every
  offer without an address, proxy offers included, and takes its TFTP server from the
  offer it binds to. This is the site set-up docs/dhcp.md asks for; nothing else changes.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .netns import LabError, Topology


@dataclass
class Lease:
    expiry: int
    mac: str
    ip: str
    hostname: str


class SiteDhcp:
    """dnsmasq in the lab's ``dhcp`` namespace. ``start()``, then ``lease_for(mac)``."""

    def __init__(self, lab: Topology, outdir: Path, *, lease_time: str = "10m",
                 uboot_next_server: bool = True, dns: str | None = None) -> None:
        self.lab = lab
        self.dns = dns
        self.uboot_next_server = uboot_next_server
        self.outdir = outdir
        self.lease_time = lease_time
        self.leasefile = outdir / "dnsmasq.leases"
        self.logfile = outdir / "dnsmasq.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ula_prefix(self) -> str:
        return f"fd31:231:{self.lab.subnet:x}::"

    def argv(self) -> list[str]:
        lo, hi = self.lab.pool
        return [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--interface=eth0", "--bind-interfaces", "--user=root", "--group=root",
            f"--dhcp-range={lo},{hi},255.255.255.0,{self.lease_time}",
            "--dhcp-option=3",  # no router: the lab has none
            # no DNS unless asked; forced, as a board may not list option 6 in its request
            f"--dhcp-option-force=6,{self.dns}" if self.dns else "--dhcp-option=6",
            "--no-ping", "--dhcp-authoritative", "--log-dhcp",
            f"--dhcp-leasefile={self.leasefile}", f"--log-facility={self.logfile}",
            f"--pid-file={self.outdir / 'dnsmasq.pid'}",
            "--enable-ra", f"--dhcp-range={self.ula_prefix},ra-only,64",
            "--ra-param=eth0,10,0",  # RA every 10 s, router lifetime 0: "no default router"
        ] + ([
            "--dhcp-vendorclass=set:uboot,U-Boot",
            f"--dhcp-boot=tag:uboot,boot.scr.uimg,,{self.lab.ip('srv')}",
        ] if self.uboot_next_server else [])

    def start(self, timeout: float = 5.0) -> SiteDhcp:
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.leasefile.touch()
        ns = self.lab.ns("dhcp")
        # The RA needs a prefix on the interface; the ULA lives only in this namespace.
        self.lab.run_in("dhcp", ["ip", "-6", "addr", "add", f"{self.ula_prefix}2/64", "dev",
                                 "eth0", "nodad"], check=False)
        self.proc = self.lab.popen("dhcp", self.argv(), log_file=self.outdir / "dnsmasq.out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"dnsmasq in {ns} exited ({self.proc.returncode}); see "
                               f"{self.outdir / 'dnsmasq.out'} and {self.logfile}")
            if self.logfile.exists() and "DHCP, IP range" in self.logfile.read_text(
                    errors="replace"):
                return self
            time.sleep(0.05)
        raise LabError(f"dnsmasq in {ns} did not log its DHCP range within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2)

    def leases(self) -> list[Lease]:
        out = []
        try:
            text = self.leasefile.read_text()
        except OSError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].isdigit():
                out.append(Lease(int(parts[0]), parts[1].lower(), parts[2], parts[3]))
        return out

    def lease_for(self, mac: str) -> Lease | None:
        mac = mac.lower()
        return next((le for le in self.leases() if le.mac == mac), None)

    def acked(self, mac: str) -> list[str]:
        """Addresses dnsmasq logged a DHCPACK for ``mac`` (the lease file lags a little)."""
        mac = mac.lower()
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line.split("DHCPACK(eth0) ")[1].split()[0] for line in lines
                if "DHCPACK(eth0)" in line and mac in line.lower()]

    def wait_lease(self, mac: str, timeout: float) -> str | None:
        """The IPv4 address acked to ``mac`` within ``timeout`` seconds, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acked = self.acked(mac)
            if acked:
                return acked[-1]
            time.sleep(0.2)
        return None
