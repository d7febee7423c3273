"""One request in, at most one reply out: the proxy-DHCP decision, without sockets.

Kept apart from the socket code so the whole decision (parse, classify, plan,
answer, build) is testable with bytes alone and the listener stays a thin loop.
Every outcome is counted (``netbootd_dhcp_replies{kind,decision}``) and recorded
as a ``dhcp`` event; outcomes that a looping or chatty client can repeat many times
a second (rate limited, not a boot client) are recorded at most once per
``EVENT_REPEAT_SECONDS`` per MAC so they cannot flood the event log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..model import Action, ClientFacts
from ..planner import NewBoot
from ..ratelimit import RateLimiter
from ..render import ServerInfo
from . import packet as pk
from .classify import Classifier, ClientInfo
from .reply import Answer, NoAnswer, answer_for, build_reply, patch

if TYPE_CHECKING:
    from ..interfaces import Nodes, Plans, Recorder
    from ..metrics import Metrics
    from ..settings import Settings
    from .netif import Interfaces

log = logging.getLogger("netbootd.dhcp")

BROADCAST = "255.255.255.255"
EVENT_REPEAT_SECONDS = 30.0
#: The same reply to the same MAC within this many seconds is one exchange (a client
#: resending because it missed our answer): counted in metrics, recorded once. Recording
#: costs ~45 µs (JSON + file write), more than answering, so a looping client must not
#: make the event log the bottleneck.
EVENT_COALESCE_SECONDS = 1.0
#: Decisions about machines that are not boot clients at all.
_NOT_FLEET = frozenset({"not-boot-client", "unhandled-type"})
_REPLY_TYPE = {pk.DISCOVER: pk.OFFER, pk.REQUEST: pk.ACK, pk.INFORM: pk.ACK}


class Outgoing(NamedTuple):
    """A reply and where it goes: out of interface ``ifindex`` from ``source``.

    A NamedTuple, not a frozen dataclass: made once per reply, and a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) measured 1 µs against 0.2 µs."""

    payload: bytes | bytearray
    dest: tuple[str, int]
    ifindex: int
    source: str | None


#: ``tuple.__new__`` straight: a NamedTuple's generated ``__new__`` is one more Python call.
_new_outgoing = tuple.__new__


class _Prepared:
    """A reply built once for one client content + session + server address + port.

    The memo key (:meth:`Responder._client`) fixes every request byte from offset 12 on,
    ciaddr, giaddr and chaddr included, so the reply is complete but for the two fields
    that change per retransmission: xid (bytes 4-8) and flags (10-12). It is kept as the
    three pieces around them, and a reply is one ``join`` (0.17 µs; copying and patching
    a bytearray measured 0.55 µs). ``dest`` is fixed too, except for port-4011 requests,
    which are answered to wherever they came from.
    """

    __slots__ = ("answer", "dest", "head", "recorded", "secs", "tail")

    def __init__(self, reply: bytes | bytearray, answer: Answer,
                 dest: tuple[str, int] | None) -> None:
        self.head = bytes(reply[:4])
        self.secs = bytes(reply[8:10])
        self.tail = bytes(reply[12:])
        self.answer = answer
        self.dest = dest
        self.recorded = float("-inf")  #: when this reply was last recorded as an event

    def reply(self, request: bytes) -> bytes:
        return b"".join((self.head, request[4:8], self.secs, request[10:12], self.tail))


class _Client:
    """Memo entry: what one distinct request says, and the replies prepared for it."""

    __slots__ = ("facts", "info", "kind", "out_type", "prepared")

    def __init__(self, info: ClientInfo, facts: ClientFacts) -> None:
        self.info = info
        self.facts = facts
        # What the per-packet path asks of every request, worked out once per content:
        self.kind = info.kind.value  #: the metric label (an Enum's .value costs 0.1 µs)
        mtype = info.message_type
        #: OFFER or ACK; None when there is nothing to answer (not a boot client, or a
        #: message type proxy-DHCP does not answer).
        self.out_type = _REPLY_TYPE.get(mtype) if info.boot_client and mtype else None
        # A REQUEST's option 50 or an INFORM's ciaddr is only what the client *says*:
        # never learnt as its address (docs/security.md). Addresses come from the site
        # server's ACKs (acks.py) or nodes.yaml.
        self.prepared: dict[tuple, _Prepared] = {}


def available_boot_files(settings) -> frozenset[str]:
    """iPXE binaries present in ``tftp.ipxe_dir`` / ``tftp.extra_ipxe_dirs``."""
    d = settings.dhcp
    names = {d.bios_bootfile, d.uefi_x64_bootfile, d.uefi_arm64_bootfile,
             d.uefi_arm64_grub_bootfile}
    dirs = [Path(settings.tftp.ipxe_dir), *map(Path, settings.tftp.extra_ipxe_dirs)]
    return frozenset(n for n in names if any((p / n).is_file() for p in dirs))


class Responder:
    """The per-packet logic of the proxy-DHCP service.

    Built from narrow parts (``interfaces.py``): ``plans`` (the planner), ``nodes``
    (who a MAC is: Pi detection and the memo's inventory generation), ``recorder``
    (events) and ``metrics``; never the App, the inventory or the store.
    """

    def __init__(self, settings: Settings, interfaces: Interfaces, *, plans: Plans,
                 nodes: Nodes, recorder: Recorder, metrics: Metrics,
                 available: frozenset[str] | None = None) -> None:
        self.settings = settings
        self.interfaces = interfaces
        self.available = available
        self.nodes = nodes
        self._begin = plans.begin
        self._finish = plans.finish
        #: Where a new boot's agreement with the other replicas may wait off the loop
        #: (``newboots.NewBootQueue.take``; None: agreed here, as without replicas).
        self.defer: Callable[[NewBoot, tuple], bool] | None = None
        self._record = recorder.record
        self._generation = nodes.generation
        self.classifier = Classifier(settings.rpi.ouis, nodes.says_pi)
        evictions = metrics.table_evictions
        self._memo_evicted = evictions.labels("dhcp-memo").inc
        self._events_evicted = evictions.labels("dhcp-events").inc
        self.limiter = RateLimiter(settings.dhcp.rate_limit_per_mac,
                                   max_clients=settings.dhcp.max_clients,
                                   evicted=evictions.labels("dhcp-rate").inc)
        self.memo_entries = settings.dhcp.memo_entries
        self.max_clients = settings.dhcp.max_clients
        self._served = frozenset(settings.network.interfaces)
        self._advertise = (str(settings.network.advertise)
                           if settings.network.advertise else None)
        self._tally = metrics.tally(metrics.dhcp_replies).counts
        self._malformed = metrics.malformed.labels("dhcp")
        self._errors = metrics.errors.labels("dhcp")
        self._last_event: dict[tuple[str, str], float] = {}
        self._memo: dict[bytes, _Client] = {}
        self._memo_generation: object = None
        self._server_ips: dict[str | None, str] = {}
        self._last_error_log = float("-inf")
        self.built = 0  #: replies built with scapy (should stay about one per boot)
        self.replies = 0
        self.dropped = 0

    # -- bookkeeping ------------------------------------------------------------------------
    def _ignored(self, info: ClientInfo, decision: str, reason: str, *,
                 throttle: bool = False) -> None:
        self.dropped += 1
        self._tally[(info.kind.value, decision)] += 1
        if throttle:
            now = time.monotonic()
            key = (info.mac, decision)
            last = self._last_event.get(key)
            if last is not None and now - last < EVENT_REPEAT_SECONDS:
                return
            events = self._last_event
            if last is not None:
                del events[key]  # re-insert: the dict stays ordered oldest first
            while len(events) >= self.max_clients:
                del events[next(iter(events))]
                self._events_evicted()
            events[key] = now
        # Ordinary LAN devices (phones, printers) and machines the inventory does not know
        # are not part of the fleet: their event carries no node MAC, so they never appear
        # in the node table or status page (random MACs must not grow it).
        node_mac = (None if decision in _NOT_FLEET
                    or (decision == "ignore" and not self.nodes.known(info.mac))
                    else info.mac)
        self._record("dhcp", node_mac, f"no reply: {reason}", ip=info.ip,
                               arch=info.arch, client=info.kind.value, outcome="ignored",
                               reason=reason, decision=decision,
                               client_mac=info.mac if node_mac is None else None)

    def malformed(self, reason: str, data: bytes) -> None:
        self.dropped += 1
        self._malformed.inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dropped malformed DHCP packet: %s (%s)", reason, pk.explain(data))

    # -- the decision -----------------------------------------------------------------------
    def _failed(self, data: bytes, peer: tuple[str, int]) -> None:
        """A bug while handling a packet: counted, logged (rate-limited), no reply."""
        self._errors.inc()
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_error_log >= EVENT_REPEAT_SECONDS:  # a bug must not flood
            self._last_error_log = now
            log.exception("error handling DHCP packet from %s (%s)", peer, pk.explain(data))

    def _client(self, data: bytes) -> _Client:
        """The classified client for this request content, memoised.

        A booting client resends the same request (new xid, same everything else) and
        asks the same questions at every boot, so the option walk and classification
        (~10 µs) run once per distinct request content; later packets cost one dict
        lookup keyed by the bytes after xid/secs/flags. Malformed packets raise before
        anything is stored. An inventory reload (a Pi known only through the inventory)
        empties the memo: ``nodes.generation()`` changes identity. At most
        ``dhcp.memo_entries`` contents are kept; the oldest goes first (counted).

        The key holds the length, the magic cookie and every option, all of which were
        checked when the entry was stored, so a hit only needs the four bytes before the
        xid checked (op, htype, hlen, hops) instead of the whole header.
        """
        gen = self._generation()
        if gen is not self._memo_generation:
            self._memo.clear()
            self._memo_generation = gen
        key = data[12:]
        client = self._memo.get(key)
        if client is not None:
            if not data.startswith(pk.REQUEST_PREFIX) or data[3] > pk.MAX_HOPS:
                pk.check_header(data)  # raises Malformed with the precise reason
        else:
            pk.check_header(data)
            info = self.classifier.classify(pk.parse(data))
            client = _Client(info, info.facts())
            memo = self._memo
            while len(memo) >= self.memo_entries:
                del memo[next(iter(memo))]
                self._memo_evicted()
            memo[key] = client
        return client

    def handle(self, data: bytes, ifindex: int, local_ip: str | None,
               peer: tuple[str, int], pxe_port: bool, again: bool = False
               ) -> Outgoing | None:
        """Decide about one datagram. Never raises (errors are counted and logged).
        ``again``: a packet that waited while its new boot was agreed (already counted
        by the rate limit; its plan is now in the planner's memory).

        One function, not a guard calling a worker: this runs per packet, and the
        ``try`` costs nothing in CPython 3.11 while a call costs ~0.1 µs."""
        try:
            try:
                client = self._client(data)
            except pk.Malformed as exc:
                self.malformed(str(exc), data)
                return None
            if self._served and self.interfaces.name(ifindex) not in self._served:
                self.dropped += 1
                self._tally[("unknown", "interface-not-served")] += 1
                return None
            out_type = client.out_type
            if out_type is None:
                self._unanswerable(client.info)
                return None
            return self._answer(client, out_type, data, ifindex, local_ip, peer, pxe_port,
                                again)
        except Exception:  # noqa: BLE001 - _failed() logs it with the traceback
            self._failed(data, peer)
            return None

    def _unanswerable(self, info: ClientInfo) -> None:
        if not info.boot_client:
            self._ignored(info, "not-boot-client", "no PXEClient/HTTPClient vendor class",
                          throttle=True)
        else:
            mtype = info.message_type
            self._ignored(info, "unhandled-type",
                          f"message type {pk.MESSAGE_NAMES.get(mtype, mtype)}", throttle=True)

    def _answer(self, client: _Client, out_type: int, data: bytes, ifindex: int,
                local_ip: str | None, peer: tuple[str, int],
                pxe_port: bool, again: bool = False) -> Outgoing | None:
        """The plan for a boot client, and the reply it says to send (if any)."""
        info = client.info
        now = time.monotonic()
        if not again and not self.limiter.allow(info.mac, now):
            self._ignored(info, "rate-limited", "more than dhcp.rate_limit_per_mac requests/s",
                          throttle=True)
            return None
        plan = self._begin(client.facts)
        if plan.__class__ is NewBoot:  # the replicas must agree on it first
            defer = self.defer
            if not again and defer is not None and \
                    defer(plan, (data, ifindex, local_ip, peer, pxe_port)):
                return None  # answered when agreed (newboots.py)
            plan = self._finish(plan)
        if not plan.answers:
            decision = "ignore" if plan.action is Action.IGNORE else plan.action.value
            self._ignored(info, decision, plan.reason, throttle=True)
            return None
        if_ip = self.interfaces.primary.get(ifindex)
        arrival = if_ip or local_ip
        server_ip = self._server_ips.get(arrival)
        if server_ip is None:
            server_ip = self._server_ip(arrival)
        if not server_ip:
            self._ignored(info, "no-address", "arrival interface has no IPv4 address")
            return None
        # The client's content is fixed by the memo key; the rest the reply depends on.
        # A plan without an image is made afresh per request (never sticky), so it
        # shares one prepared reply instead of one per throwaway session.
        key = (plan.session if plan.image is not None else "", server_ip, pxe_port)
        prepared = client.prepared.get(key)
        if prepared is None:
            answer = answer_for(info, server_ip, self.settings, pxe_request=pxe_port,
                                available=self.available)
            if isinstance(answer, NoAnswer):
                self._ignored(info, "no-boot-file", answer.reason, throttle=True)
                return None
            reply = patch(build_reply(info, answer, out_type, server_ip), data, out_type)
            dest = None if pxe_port else self._destination(data, info, peer, pxe_port)
            prepared = _Prepared(reply, answer, dest)
            self.built += 1
            if len(client.prepared) > 8:  # sessions come and go; keep the newest few
                client.prepared.clear()
            client.prepared[key] = prepared
        payload = prepared.reply(data)
        dest = prepared.dest or self._destination(data, info, peer, pxe_port)
        self.replies += 1
        decision = "offer" if out_type == pk.OFFER else "ack"
        self._tally[(client.kind, decision)] += 1
        if now - prepared.recorded >= EVENT_COALESCE_SECONDS:
            prepared.recorded = now
            self._record_sent(info, prepared.answer, decision, server_ip, plan.image, dest)
        source = server_ip if server_ip == local_ip or server_ip == if_ip else None
        return _new_outgoing(Outgoing, (payload, dest, ifindex, source))

    def _server_ip(self, arrival: str | None) -> str:
        """The address replies name (option 54, siaddr, 66, URLs) for requests that
        arrived at ``arrival``: :meth:`ServerInfo.for_arrival`, the one place that says
        how a node reaches us; "" when there is none (no reply). Worked out once per
        arrival address (our own addresses: a handful)."""
        if not self._advertise and (not arrival or arrival == "0.0.0.0"):
            ip = ""
        else:
            ip = ServerInfo.for_arrival(self.settings, arrival or "").ip
        if len(self._server_ips) > 1024:
            self._server_ips.clear()
        self._server_ips[arrival] = ip
        return ip

    def _destination(self, data: bytes, info: ClientInfo, peer: tuple[str, int],
                     pxe_port: bool) -> tuple[str, int]:
        """RFC 2131 4.1 and PXE: relay -> giaddr:67; 4011 -> back to the asker;
        client with an address -> unicast; else broadcast (a Pi sends flags 0 and no
        address, so it gets a broadcast regardless of the flag)."""
        giaddr = data[pk.GIADDR_SLICE]
        if giaddr != b"\0\0\0\0":
            return (".".join(map(str, giaddr)), self.settings.dhcp.port)
        if pxe_port and peer[0] not in ("0.0.0.0", ""):
            return peer
        if info.ciaddr:
            return (info.ciaddr, self.settings.dhcp.client_port)
        return (BROADCAST, self.settings.dhcp.client_port)

    def _record_sent(self, info: ClientInfo, answer: Answer, decision: str, server_ip: str,
                     image, dest: tuple[str, int]) -> None:
        self._record(
            "dhcp", info.mac, f"proxy {decision} sent", ip=info.ip, arch=info.arch,
            client=info.kind.value, outcome="ok", reason=None, decision=decision,
            file=answer.bootfile, server=server_ip, to=f"{dest[0]}:{dest[1]}",
            serial=info.serial, image=image.name if image else None,
            version=image.version if image else None)

    def clear(self) -> None:
        """Forget classifications and prepared replies (config/inventory reload)."""
        self._memo.clear()

    def sizes(self) -> dict[str, int]:
        """Entries in each per-client table (health, and the flood test's bound)."""
        return {"memo": len(self._memo), "rate": len(self.limiter),
                "events": len(self._last_event)}


__all__ = ["Outgoing", "Responder", "available_boot_files"]
