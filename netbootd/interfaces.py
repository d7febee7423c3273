"""The narrow views a protocol service gets instead of the whole daemon ("one door").

A service (dhcp/, tftp/, http/, nfs/, dns/) is constructed with exactly the views it
needs, never the ``App``, the inventory or the store. A service that cannot reach past
the plan cannot disagree with it: pixiecore's ``Booter``, smee's ``BackendReader`` and
matchbox's ``storage.Store`` draw the same fence. ``tests/unit/test_fence.py`` keeps it.

All views are ``typing.Protocol``: the daemon passes its real objects, tests may pass
their own real objects with the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .model import BootPlan, ClientFacts, ImageRef, NodeView
from .render import ServerInfo

if TYPE_CHECKING:
    from .planner import NewBoot


class Plans(Protocol):
    """The boot-session door (implemented by :class:`netbootd.planner.Planner`).

    A *firmware* request (proxy-DHCP, TFTP, ``/ipxe``) calls :meth:`plan`; a request
    that belongs to a boot already planned (``/files``, the beacon, cloud-init, events)
    calls :meth:`current`. Both refresh the node's session; the plan never changes
    inside a session.
    """

    def plan(self, facts: ClientFacts) -> BootPlan:
        """The plan of this boot: the open firmware session's, or a new one."""
        ...

    def begin(self, facts: ClientFacts) -> BootPlan | NewBoot:
        """:meth:`plan` without waiting: the plan, or a new boot the replicas must still
        agree on (then :meth:`finish` it where a round trip to etcd may wait)."""
        ...

    def finish(self, new: NewBoot) -> BootPlan:
        """The agreed plan of a new boot (one etcd round trip)."""
        ...

    def current(self, mac: str) -> BootPlan | None:
        """The plan of the boot this MAC is in (firmware session, else the plan its OS
        booted with), refreshed; None when it is in no boot."""
        ...

    def peek(self, facts: ClientFacts) -> BootPlan:
        """What the machine would get if it booted now. No side effects at all."""
        ...

    def hold(self, mac: str) -> None:
        """A transfer for this node started: its session cannot expire until release."""
        ...

    def release(self, mac: str) -> None:
        """The transfer ended (any outcome); the session slides from now."""
        ...

    def handed_over(self, mac: str) -> None:
        """The firmware started the kernel: the firmware session ends (the next
        DISCOVER plans afresh) while the booted OS keeps seeing this plan."""
        ...

    def end(self, mac: str) -> None:
        """The boot is over (a lifecycle event with proof): the next boot re-plans."""
        ...

    def forget(self, mac: str) -> None:
        """Drop every session of this MAC (its lifecycle changed: re-plan at once)."""
        ...

    def versions_in_use(self) -> set[tuple[str, str]]:
        """(image, version) of every open session and running OS: GC keeps these."""
        ...


class Renderer(Protocol):
    """Per-node text for a plan (implemented by :class:`netbootd.render.Renderer`)."""

    def render(self, artefact: str, plan: BootPlan, server: ServerInfo) -> str:
        ...

    def has_secrets(self, plan: BootPlan) -> bool:
        ...


class Artefacts(Protocol):
    """The files of a planned version, and per-node rendered text."""

    def open(self, image: ImageRef, path: str) -> Path | None:
        """The file ``path`` of this version: a manifest artefact that resolves inside the
        version directory, else None. The caller opens it (versions are immutable)."""
        ...

    def ref(self, image: str, version: str) -> ImageRef | None:
        """A stored version by name (``/files/<image>/<version>/…`` URLs), else None."""
        ...

    def renderer(self) -> Renderer:
        """The renderer in force (a config reload swaps it; identity marks a generation)."""
        ...


class Nodes(Protocol):
    """A read-only view of who a machine is, with evidence."""

    def view(self, facts: ClientFacts) -> NodeView:
        """The inventory's answer (node entry or profile) for these facts."""
        ...

    def known(self, mac: str) -> bool:
        """Is this MAC an inventory node?"""
        ...

    def macs(self) -> list[str]:
        """Every inventory node's MAC, in file order."""
        ...

    def find(self, *, uuid: str | None = None, hostname: str | None = None,
             ip: str | None = None) -> str | None:
        """The MAC of the inventory node with this SMBIOS UUID, hostname or static ip."""
        ...

    def static_ip(self, mac: str) -> str | None:
        """The node's configured address (nodes.yaml ``ip``), if any."""
        ...

    def mac_for_serial(self, serial: str) -> str | None:
        ...

    def says_pi(self, mac: str, serial: str | None) -> bool:
        """Does the inventory know this MAC (or serial) as a Raspberry Pi?"""
        ...

    def hosts(self) -> Iterable[tuple[str, str, str | None]]:
        """(hostname, mac, address) of every inventory node; the address is the static
        one, else the one learnt with evidence, else None."""
        ...

    def facts_for(self, mac: str, ip: str | None = None) -> ClientFacts:
        """Facts for a machine known only by MAC (cloud-init, API): a Pi is asked about
        as a Pi, anything else as iPXE."""
        ...

    def generation(self) -> object:
        """Changes (by identity) whenever the inventory is reloaded: memo invalidation."""
        ...

    def members(self) -> Iterable[tuple[str, str, str | None]]:
        """(hostname, mac, static ip or None) of every inventory node."""
        ...

    def owns(self, mac: str, ip: str) -> bool:
        """Does the machine at ``ip`` (a TCP peer) own node ``mac``'s identity? The gate
        for secrets (cloud-init user-data) and write access (docs/security.md): the
        node's static ``ip`` (unless the kernel neighbour table names another MAC for
        it), else :meth:`Addresses.owner_of` (site server ACK + neighbour table agree)."""
        ...


class Addresses(Protocol):
    """IP <-> MAC with evidence (implemented by :class:`netbootd.neighbours.ClientAddresses`)."""

    def learn(self, ip: str, mac: str, *, lease: float | None = None) -> bool:
        """Evidence: the site DHCP server ACKed ``ip`` to ``mac`` (never a client's claim)."""
        ...

    def mac_for(self, ip: str) -> str | None:
        """Attribution (logs, file lookup): learnt, else the kernel neighbour table."""
        ...

    def ip_for(self, mac: str) -> str | None:
        """The address learnt with evidence for this MAC (not confirmed by the kernel)."""
        ...

    def owner_of(self, ip: str) -> str | None:
        """The MAC owning ``ip`` now: learnt evidence AND the kernel neighbour table agree."""
        ...

    def confirmed(self, macs: Iterable[str]) -> dict[str, tuple[str, float]]:
        """mac -> (ip, since) for the MACs whose learnt address the kernel confirms now."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Be told when a binding is new or moved; returns the unsubscribe function."""
        ...


class Recorder(Protocol):
    """Where services say what they saw (implemented by :class:`netbootd.events.EventLog`)."""

    def record(self, kind: str, mac: str | None = None, message: str = "",
               **fields: Any) -> Any:
        ...


class Versions(Protocol):
    """The stored versions, read-only (NFS exports every version's rootfs)."""

    def refs(self) -> list[ImageRef]:
        """Every stored version (none while the store is not up)."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) whenever the store changes; returns the
        unsubscribe function."""
        ...


#: A callable the daemon gives a service so it hears about config reloads.
OnReload = Callable[[Callable[[], None]], None]
#: Register a callback; returns the function that unregisters it (reload hooks, store
#: changes, address changes: a service that stops must leave nothing behind).
Subscribe = Callable[[Callable[[], None]], Callable[[], None]]


class Catalogue(Protocol):
    """The image store as the API, the CLI, the status page and NFS see it (implemented by
    :class:`netbootd.store.store.ImageStore`).

    Mistakes are typed (:mod:`netbootd.errors`): ``NotFound`` (unknown image or version,
    404), ``Conflict`` (nothing to roll back to, not pinned, upload pending, another
    process is the store's writer: 409), ``Invalid`` (bad name or MAC, ambiguous pin,
    upload too large: 400; ``TooLarge`` is the 413 case). ``resolve`` records nothing;
    ``mark_used`` is how a started boot session keeps its version from GC.
    """

    @property
    def on_change(self) -> list[Callable[[], None]]:
        """Listeners called after every change (any thread); append to register."""
        ...

    def images(self) -> list[str]:
        ...

    def versions(self, image: str) -> list[str]:
        """Oldest first (manifest ``created``)."""
        ...

    def ref(self, image: str, version: str) -> ImageRef | None:
        ...

    def all_refs(self) -> list[ImageRef]:
        """Every stored version (NFS exports each rootfs)."""
        ...

    def channels(self, image: str) -> dict[str, str]:
        """channel -> active version."""
        ...

    def active(self, image: str, channel: str) -> str | None:
        ...

    def history(self, image: str | None = None) -> list[dict]:
        ...

    def pins(self) -> dict[str, dict]:
        """MAC -> {version, image, by, when}."""
        ...

    def rejected(self) -> list[dict]:
        """Refused builds, newest first: {name, reason, when, image?, version?}."""
        ...

    def list_images(self) -> list[dict]:
        """JSON-able overview: channels, versions, where active, pins, recent history."""
        ...

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        """Inventory pin, else store pin for ``mac``, else the channel. No side effects."""
        ...

    def mark_used(self, image: str, version: str) -> None:
        """A boot session on this version started: retention keeps it for a while."""
        ...

    def activate(self, image: str, version: str, channel: str, *, by: str = "cli",
                 why: str = "") -> None:
        ...

    def rollback(self, image: str, channel: str, *, by: str = "cli") -> str:
        """Back to the previously active version; returns it."""
        ...

    def pin(self, mac: str, version: str, image: str | None = None, *, by: str = "cli"
            ) -> None:
        ...

    def unpin(self, mac: str) -> None:
        ...

    def gc(self, *, dry_run: bool = False, in_use: set[tuple[str, str]] = frozenset()
           ) -> list[tuple[str, str]]:
        """Delete (or with ``dry_run`` list) the versions retention does not keep."""
        ...

    def prune_rejected(self, keep: int, *, dry_run: bool = False) -> list[str]:
        ...

    def prune_history(self, keep: int, *, dry_run: bool = False) -> int:
        ...

    async def ingest_upload(self, name: str, version: str, stream: Any, *,
                            max_bytes: int | None = None) -> dict[str, Any]:
        """``PUT /api/v1/images/<name>/<version>``: store the body, ingest it, return the
        ingest result as a dict (``accepted``, ``reason``, ``activated``...)."""
        ...
