"""The host's interfaces and their IPv4 addresses, kept current from netlink.

A proxy-DHCP reply must name the server address *on the interface the request came
in on* (the Pi and PXE ROMs fetch from option 54/siaddr), and an address change must
not need a restart. The table is filled from a pyroute2 dump and refreshed whenever
netlink reports a link or address change (AsyncIPRoute subscribed to the groups),
so a lookup on the hot path is a dict access. If netlink is unavailable the table
falls back to interface names only and callers use the kernel's IP_PKTINFO
``ipi_spec_dst`` (the local address the packet was delivered to).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

log = logging.getLogger("netbootd.dhcp.netif")


@dataclass(slots=True)
class Interface:
    index: int
    name: str
    addresses: list[tuple[str, int]] = field(default_factory=list)  #: (ip, prefixlen)

    @property
    def primary(self) -> str | None:
        return self.addresses[0][0] if self.addresses else None


class Interfaces:
    """ifindex -> :class:`Interface`, refreshed live."""

    def __init__(self) -> None:
        self._by_index: dict[int, Interface] = {}
        #: ifindex -> primary IPv4 address, kept beside the table for the per-packet
        #: lookup (one dict get instead of two calls and a property).
        self.primary: dict[int, str | None] = {}
        self._task: asyncio.Task | None = None
        self._ipr = None
        self.live = False  #: True while netlink change notifications are flowing

    @property
    def by_index(self) -> dict[int, Interface]:
        return self._by_index

    @by_index.setter
    def by_index(self, table: dict[int, Interface]) -> None:
        """Replaced whole, never edited in place, so ``primary`` always matches it."""
        self._by_index = table
        self.primary = {i: iface.primary for i, iface in table.items()}

    def name(self, index: int) -> str | None:
        iface = self.by_index.get(index)
        return iface.name if iface else None

    def local_addresses(self) -> set[str]:
        return {ip for i in self.by_index.values() for ip, _ in i.addresses}

    def snapshot(self) -> dict[str, list[str]]:
        return {i.name: [f"{ip}/{p}" for ip, p in i.addresses] for i in self.by_index.values()}

    async def start(self) -> None:
        try:
            from pyroute2 import AsyncIPRoute

            self._ipr = AsyncIPRoute()
            await self._ipr.bind()  # link + IPv4 address change notifications
            await self._refresh()
            self._task = asyncio.create_task(self._watch(), name="dhcp-netif")
            self.live = True
        except Exception as exc:  # noqa: BLE001 - no netlink: degrade, do not fail
            log.warning("netlink unavailable (%s); using interface names and the "
                        "kernel's per-packet local address instead", exc)
            self._close_ipr()
            self.by_index = {i: Interface(i, n) for i, n in socket.if_nameindex()}

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception) as exc:  # noqa: BLE001
                log.debug("netlink watch ended: %r", exc)
            self._task = None
        self._close_ipr()
        self.live = False

    def _close_ipr(self) -> None:
        if self._ipr is not None:
            try:
                self._ipr.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing netlink socket: %s", exc)
            self._ipr = None

    async def _refresh(self) -> None:
        """Full dump on a separate netlink socket, so it never mixes with notifications."""
        from pyroute2 import AsyncIPRoute

        table: dict[int, Interface] = {}
        async with AsyncIPRoute() as ipr:
            async for link in await ipr.get_links():
                table[link["index"]] = Interface(link["index"], link.get("IFLA_IFNAME") or "?")
            async for msg in await ipr.get_addr(family=socket.AF_INET):
                iface = table.get(msg["index"])
                addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                if iface is not None and addr:
                    iface.addresses.append((addr, msg["prefixlen"]))
        self.by_index = table
        log.debug("interfaces: %s", self.snapshot())

    async def _watch(self) -> None:
        """Re-dump after any link/address notification (batched: one dump per burst)."""
        while True:
            try:
                changed = False
                async for msg in self._ipr.get():
                    if msg.get("event") in ("RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWLINK",
                                            "RTM_DELLINK"):
                        changed = True
                if changed:
                    await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching after a netlink hiccup
                log.warning("netlink watch error: %s", exc)
                await asyncio.sleep(1.0)
