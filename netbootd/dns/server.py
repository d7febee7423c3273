"""A tiny authoritative DNS server for inventory names (``<hostname>.<dns.domain>``).

Off by default (``dns.enabled``). Nodes and operators can then reach a node by
the name the inventory gives it, with the address netbootd learnt from DHCP (or
the inventory's ``ip``). Only addresses with evidence are published: the static ``ip``,
else the one the site DHCP server ACKed to that MAC (never what a client claimed in its
own request; docs/security.md). dnslib parses and builds the messages; only A queries
for our own domain are answered, everything else gets REFUSED/NXDOMAIN so we
never act as a resolver.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

if TYPE_CHECKING:
    from ..app import App
    from ..interfaces import Nodes
    from ..metrics import Metrics
    from ..settings import Settings

log = logging.getLogger("netbootd.dns")


class DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, service: DnsService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.service.answer(data, addr[0])
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsService:
    """Built from narrow parts: the settings in force (a callable), the inventory's
    ``Nodes`` view (names and evidenced addresses) and the metrics."""

    name = "dns"

    def __init__(self, settings: Callable[[], Settings], *, nodes: Nodes,
                 metrics: Metrics) -> None:
        self._settings = settings
        self.nodes = nodes
        self.metrics = metrics
        self.transport: asyncio.DatagramTransport | None = None

    def lookup(self, qname: str) -> str | None:
        """IPv4 of an inventory hostname under our domain, or None."""
        domain = self._settings().dns.domain.strip(".").lower()
        name = qname.rstrip(".").lower()
        if not name.endswith("." + domain):
            return None
        host = name[: -len(domain) - 1]
        for hostname, _mac, ip in self.nodes.hosts():
            if hostname.lower() == host:
                return ip
        return None

    def http_host(self, peer: str | None) -> str | None:
        """The address for ``rpi.http_boot.host_name`` (the Pis' EEPROM HTTP_HOST):
        ``network.advertise``, else ``dns.bind`` when it names one, else our address on
        the route towards the asking machine."""
        s = self._settings()
        if s.network.advertise:
            return str(s.network.advertise)
        if s.dns.bind and s.dns.bind not in ("0.0.0.0", "::"):
            return s.dns.bind
        if not peer:
            return None
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((peer, 9))  # no packet is sent: it only picks a route
                return str(probe.getsockname()[0])
        except OSError:
            return None

    def answer(self, data: bytes, peer: str | None = None) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except (DNSError, IndexError, ValueError):
            self.metrics.malformed.labels("dns").inc()
            return None
        if query.header.qr:  # a response, not a query: never answer it
            self.metrics.malformed.labels("dns").inc()
            return None
        reply = query.reply()
        q = query.q
        settings = self._settings()
        domain = settings.dns.domain.strip(".").lower()
        name = str(q.qname).rstrip(".").lower()
        host_name = (settings.rpi.http_boot.host_name or "").strip(".").lower()
        if host_name and name == host_name:
            return self._reply(reply, q, self.http_host(peer))
        if not (name == domain or name.endswith("." + domain)):
            reply.header.rcode = RCODE.REFUSED
            self.metrics.requests.labels("dns", "refused").inc()
            return reply.pack()
        return self._reply(reply, q, self.lookup(str(q.qname)))

    def _reply(self, reply: DNSRecord, q: Any, ip: str | None) -> bytes:
        if ip is None:
            reply.header.rcode = RCODE.NXDOMAIN
            self.metrics.requests.labels("dns", "nxdomain").inc()
        elif q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=60))
            self.metrics.requests.labels("dns", "ok").inc()
        else:
            self.metrics.requests.labels("dns", "nodata").inc()
        return reply.pack()

    async def start(self) -> None:
        s = self._settings()
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: DnsProtocol(self), local_addr=(s.dns.bind or "0.0.0.0", s.dns.port))
        log.info("dns: answering for *.%s on port %d", s.dns.domain, s.dns.port)

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def health(self) -> dict[str, Any]:
        return {"ok": self.transport is not None, "port": self._settings().dns.port}


def create(app: App) -> DnsService:
    """Service factory: the one place that reads the App."""
    from ..views import InventoryNodes

    return DnsService(lambda: app.settings,
                      nodes=InventoryNodes(lambda: app.inventory, app.clients,
                                           lambda: app.settings),
                      metrics=app.metrics)
