"""Which MAC is behind a client IP (and back), and how sure we are of it.

TFTP and HTTP see only an IP; the node is known by MAC. What netbootd knows about
an address comes in three strengths (docs/security.md, "Address binding"):

* **attribution** (:meth:`ClientAddresses.mac_for`): the best guess, for logs and for
  finding a node's files: an address learnt with evidence, else the kernel's neighbour
  table. Never enough to hand out a secret.
* **evidence** (:meth:`ClientAddresses.learn`): the site DHCP server ACKed this address
  to this MAC (``dhcp/acks.py`` watches for the ACKs), or ``nodes.yaml`` says so (static
  ``ip``, held by the inventory, not here). What a client *claims* in its own REQUEST
  (option 50) or INFORM (ciaddr) is never learnt: one forged packet would move a node.
* **ownership** (:meth:`ClientAddresses.owner_of`): evidence *and* the kernel neighbour
  table agree right now that the host at this address has this MAC. This is what a
  request that gets secrets or write access must pass.

Every table here is bounded (``network.max_addresses``): the least recently confirmed
entry is forgotten first, and each eviction is counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TypeVar

from .model import normalise_mac

T = TypeVar("T")

log = logging.getLogger("netbootd.neighbours")

#: Neighbour states (linux/neighbour.h) in which the entry names a MAC the kernel heard
#: from that address: REACHABLE, STALE, DELAY, PROBE, PERMANENT. Not INCOMPLETE/FAILED
#: (no answer) nor NOARP (no link-layer address at all).
USABLE_STATES = 0x02 | 0x04 | 0x08 | 0x10 | 0x80
#: Attribution answers from the kernel are reused this long (a netlink round trip each
#: TFTP request would cost more than the request).
KERNEL_CACHE_SECONDS = 10.0


def _count_nothing() -> None:
    return None


class _Binding:
    """An address learnt with evidence: who, since when unchanged, until when."""

    __slots__ = ("expires", "mac", "since")

    def __init__(self, mac: str, since: float, expires: float) -> None:
        self.mac = mac
        self.since = since  #: first learnt with this MAC (monotonic): stability
        self.expires = expires


def usable_ipv4(ip: str) -> bool:
    """A unicast IPv4 a host can hold (not 0.0.0.0, broadcast, multicast, loopback)."""
    try:
        a = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not (a.is_unspecified or a.is_multicast or a.is_loopback
                or a == ipaddress.IPv4Address("255.255.255.255"))


class ClientAddresses:
    """IP <-> MAC with evidence (:class:`netbootd.interfaces.Addresses`).

    ``max_entries`` bounds each table; ``evicted`` is called once per forgotten entry
    (the daemon passes a metrics counter's ``inc``). ``use_kernel=False`` turns off the
    neighbour table (tests on loopback, where there is none): then nothing is ever
    *owned*, only attributed.
    """

    def __init__(self, ttl: float = 3600.0, *, use_kernel: bool = True,
                 max_entries: int = 4096,
                 evicted: Callable[[], object] = _count_nothing) -> None:
        self._ttl = ttl
        self._use_kernel = use_kernel
        self.max_entries = max_entries
        self._evicted = evicted
        self._lock = threading.Lock()
        self._by_ip: OrderedDict[str, _Binding] = OrderedDict()
        self._by_mac: dict[str, str] = {}
        self._kernel_seen: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._subscribers: list[Callable[[], None]] = []
        self.evictions = 0
        #: Where evidence learnt here is passed on, as (ip, mac, seconds it stays valid):
        #: with replicas, the etcd publisher (``cluster/addresses.py``). Called from the
        #: learning thread for every learn() that is new, moved or refreshed, so it must
        #: not block. None (one daemon): nothing is passed on.
        self.publish: Callable[[str, str, float], None] | None = None

    # -- evidence ---------------------------------------------------------------------------
    def learn(self, ip: str, mac: str, *, lease: float | None = None,
              from_peer: bool = False) -> bool:
        """Record evidence that ``mac`` holds ``ip`` (the site server ACKed it), valid for
        ``lease`` seconds (capped at the table's ttl). A MAC's newest address is the one
        :meth:`ip_for` names (older ones stay attributable until they expire or are given
        to another MAC). True when the binding is new or moved (subscribers are told).

        ``from_peer``: another replica saw the ACK (shared through etcd). The evidence
        counts the same here, but is not handed to :attr:`publish`: passing it back would
        echo every binding between the replicas forever."""
        if not ip or not usable_ipv4(ip) and not ip.startswith("127."):
            return False
        mac = normalise_mac(mac)
        now = time.monotonic()
        seconds = min(lease, self._ttl) if lease else self._ttl
        expires = now + seconds
        publish = None if from_peer else self.publish
        with self._lock:
            old = self._by_ip.get(ip)
            if old is not None and old.mac == mac:
                old.expires = expires
                self._by_ip.move_to_end(ip)
                subscribers = None  # a refresh: nothing moved, nobody to tell
            else:
                subscribers = self._bind(ip, mac, now, expires, old)
        if subscribers is None:
            self._pass_on(publish, ip, mac, seconds)
            return False
        self._count_evictions(subscribers[1])
        self._pass_on(publish, ip, mac, seconds)
        for notify in subscribers[0]:
            try:
                notify()
            except Exception:
                log.exception("address subscriber failed")
        return True

    def _bind(self, ip: str, mac: str, now: float, expires: float, old: _Binding | None
              ) -> tuple[list[Callable[[], None]], int]:
        """A new or moved binding (under the lock): (subscribers to tell, evictions)."""
        evicted = 0
        if old is not None and self._by_mac.get(old.mac) == ip:
            del self._by_mac[old.mac]
        self._by_ip[ip] = _Binding(mac, now, expires)
        self._by_ip.move_to_end(ip)
        self._by_mac[mac] = ip
        while len(self._by_ip) > self.max_entries:
            gone_ip, gone = self._by_ip.popitem(last=False)
            if self._by_mac.get(gone.mac) == gone_ip:
                del self._by_mac[gone.mac]
            evicted += 1
        return list(self._subscribers), evicted

    @staticmethod
    def _pass_on(publish: Callable[[str, str, float], None] | None, ip: str, mac: str,
                 seconds: float) -> None:
        """Hand a learnt binding to the publisher; its failure never fails a learn."""
        if publish is None:
            return
        try:
            publish(ip, mac, seconds)
        except Exception:
            log.exception("address publisher failed")

    def _count_evictions(self, n: int) -> None:
        for _ in range(n):
            self.evictions += 1
            self._evicted()

    def _binding(self, ip: str) -> _Binding | None:
        with self._lock:
            b = self._by_ip.get(ip)
        return b if b is not None and b.expires > time.monotonic() else None

    def ip_for(self, mac: str) -> str | None:
        """The address the site server last ACKed to this MAC (evidence, not ownership)."""
        mac = normalise_mac(mac)
        with self._lock:
            ip = self._by_mac.get(mac)
        if ip is None:
            return None
        b = self._binding(ip)
        return ip if b is not None and b.mac == mac else None

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from the learning thread) when a binding is new or moved;
        returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    # -- attribution ------------------------------------------------------------------------
    def mac_for(self, ip: str) -> str | None:
        """Who is probably at ``ip``: learnt with evidence, else the kernel neighbour table
        (cached briefly). For logs and file lookup only; see :meth:`owner_of`."""
        b = self._binding(ip)
        if b is not None:
            return b.mac
        if not self._use_kernel:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._kernel_seen.get(ip)
        if hit is not None and now - hit[1] < KERNEL_CACHE_SECONDS:
            return hit[0] or None
        mac = kernel_neighbour(ip) or ""
        evicted = 0
        with self._lock:
            self._kernel_seen[ip] = (mac, now)
            self._kernel_seen.move_to_end(ip)
            while len(self._kernel_seen) > self.max_entries:
                self._kernel_seen.popitem(last=False)
                evicted += 1
        self._count_evictions(evicted)
        return mac or None

    # -- ownership --------------------------------------------------------------------------
    def owner_of(self, ip: str) -> str | None:
        """The MAC that owns ``ip`` now, or None: the kernel neighbour table, asked at
        request time, names that MAC for ``ip``, and no evidence learnt from the site
        server names another one.

        Why the neighbour table is enough when nothing contradicts it: the caller asks
        about the peer of a TCP connection that completed its handshake, and the kernel
        sent that handshake's SYN-ACK to exactly this MAC. A peer that does not receive
        the node's frames cannot have completed it (what a MAC-spoofing or sniffing
        attacker can still do is in docs/security.md). Requiring a seen ACK as well
        would refuse most nodes: on a switched LAN a proxy never sees the site server's
        unicast ACKs (iPXE and most OS clients do not ask for broadcast replies)."""
        if not self._use_kernel:
            return None
        on_link = kernel_neighbour(ip)
        if on_link is None:
            return None
        b = self._binding(ip)
        if b is not None and b.mac != on_link:
            return None  # the site server gave this address to someone else
        return on_link

    def confirmed(self, macs: Iterable[str]) -> dict[str, tuple[str, float]]:
        """For each MAC whose learnt address the kernel neighbour table confirms now:
        mac -> (ip, since), ``since`` being when that binding was first learnt (monotonic
        seconds). One neighbour-table dump for all of them (NFS asks about every node)."""
        want: dict[str, tuple[str, float]] = {}
        now = time.monotonic()
        with self._lock:
            for mac in macs:
                ip = self._by_mac.get(mac)
                b = self._by_ip.get(ip) if ip is not None else None
                if b is not None and b.expires > now and b.mac == mac:
                    want[mac] = (ip, b.since)
        if not want or not self._use_kernel:
            return {}
        table = kernel_table()
        return {mac: v for mac, v in want.items() if table.get(v[0]) == mac}

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"bindings": len(self._by_ip), "macs": len(self._by_mac),
                    "kernel_cache": len(self._kernel_seen)}


def _usable_mac(msg) -> str | None:
    if not msg.get("state", 0) & USABLE_STATES:
        return None
    mac = msg.get_attr("NDA_LLADDR")
    if not mac or mac == "00:00:00:00:00:00":
        return None
    return normalise_mac(mac)


def _plain_thread(fn: Callable[[], T]) -> T:
    """Run a netlink query where pyroute2 can do it synchronously.

    pyroute2's IPRoute turns asynchronous when it finds a running event loop in its
    thread (its setup coroutine is then never awaited and every lookup fails), so a
    caller on a loop hands the query to a short-lived thread. A new thread each time:
    it starts in the caller's network namespace (lookups are cached, so this is rare).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=5)


def kernel_neighbour(ip: str) -> str | None:
    """MAC for ``ip`` from the kernel's neighbour (ARP) table, or None (no entry, or one
    in a state that names no MAC the kernel heard from: INCOMPLETE, FAILED, NOARP)."""
    if ip.startswith("127.") or ":" in ip:
        return None

    def query() -> str | None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_neighbours(dst=ip):
                mac = _usable_mac(msg)
                if mac:
                    return mac
        return None

    try:
        return _plain_thread(query)
    except Exception as exc:  # noqa: BLE001 - netlink unavailable must not break a transfer
        log.debug("neighbour lookup for %s failed: %s", ip, exc)
    return None


def kernel_table() -> dict[str, str]:
    """Every usable IPv4 neighbour entry: ip -> MAC (one netlink dump)."""
    def dump() -> dict[str, str]:
        import socket

        from pyroute2 import IPRoute

        table: dict[str, str] = {}
        with IPRoute() as ipr:
            for msg in ipr.get_neighbours(family=socket.AF_INET):
                ip, mac = msg.get_attr("NDA_DST"), _usable_mac(msg)
                if ip and mac:
                    table[ip] = mac
        return table

    try:
        return _plain_thread(dump)
    except Exception as exc:  # noqa: BLE001
        log.debug("neighbour table dump failed: %s", exc)
    return {}
