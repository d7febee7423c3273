"""Which MAC is behind a client IP (and back).

TFTP and HTTP see only an IP; the node is known by MAC. Two sources, best
first: what proxy-DHCP learnt (the address a client asked for in its REQUEST,
or its ciaddr), then the kernel's neighbour table (pyroute2), which holds the
MAC of anyone who just talked to us on a local link.
"""

from __future__ import annotations

import logging
import threading
import time

from .model import normalise_mac

log = logging.getLogger("netbootd.neighbours")


class ClientAddresses:
    """IP <-> MAC table fed by DHCP, falling back to the kernel neighbour table."""

    def __init__(self, ttl: float = 3600.0, *, use_kernel: bool = True) -> None:
        self._ttl = ttl
        self._use_kernel = use_kernel
        self._lock = threading.Lock()
        self._by_ip: dict[str, tuple[str, float]] = {}
        self._by_mac: dict[str, str] = {}

    def learn(self, ip: str, mac: str) -> None:
        if not ip or ip == "0.0.0.0":
            return
        mac = normalise_mac(mac)
        with self._lock:
            self._by_ip[ip] = (mac, time.monotonic())
            self._by_mac[mac] = ip

    def mac_for(self, ip: str) -> str | None:
        with self._lock:
            hit = self._by_ip.get(ip)
        if hit and time.monotonic() - hit[1] < self._ttl:
            return hit[0]
        if self._use_kernel:
            mac = kernel_neighbour(ip)
            if mac:
                self.learn(ip, mac)
                return mac
        return None

    def ip_for(self, mac: str) -> str | None:
        with self._lock:
            return self._by_mac.get(normalise_mac(mac))


def kernel_neighbour(ip: str) -> str | None:
    """MAC for ``ip`` from the kernel's neighbour (ARP) table, or None."""
    if ip.startswith("127.") or ":" in ip:
        return None
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_neighbours(dst=ip):
                mac = msg.get_attr("NDA_LLADDR")
                if mac and mac != "00:00:00:00:00:00":
                    return normalise_mac(mac)
    except Exception as exc:  # noqa: BLE001 - netlink unavailable must not break a transfer
        log.debug("neighbour lookup for %s failed: %s", ip, exc)
    return None
