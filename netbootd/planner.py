"""The planner: (MAC, serial, arch, client kind) -> BootPlan, and the boot-session cache.

Every service asks this one place what a machine gets (pixiecore's Booter,
smee's backend). The decision itself (:func:`decide`) is pure; :class:`Planner`
adds the per-MAC session cache that makes the central invariant hold:

    A boot that started on version N finishes on version N.

A session lives while the machine keeps asking (sliding ``boot.session_ttl``)
and ends at the ``booted`` callback, so the *next* boot re-plans and sees a
hot-swapped version, while a boot in flight never does.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from .inventory import Inventory
from .model import Action, BootPlan, ClientFacts, ImageRef
from .settings import Settings


class ImageResolver(Protocol):
    """What the planner needs from the image store (netbootd.store implements it)."""

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        """The version a node gets: the inventory pin, else a pin the store keeps for
        ``mac`` (``netbootd images pin``), else the channel's active version."""
        ...


class NoImages:
    """A resolver with an empty store (the daemon before the store is up, unit tests)."""

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        return None


def decide(facts: ClientFacts, inventory: Inventory, settings: Settings,
           images: ImageResolver, *, now: float | None = None) -> BootPlan:
    """The pure decision for one machine, without the cache."""
    now = time.time() if now is None else now
    node = inventory.view(facts)
    session = uuid.uuid4().hex[:12]

    def plan(action: Action, reason: str, image: ImageRef | None = None) -> BootPlan:
        return BootPlan(action=action, node=node, image=image, reason=reason, session=session,
                        created=now, facts=facts)

    if not node.known and settings.policy.unknown == "ignore":
        return plan(Action.IGNORE, "unknown machine and policy.unknown is 'ignore'")
    action = node.action or Action.NETBOOT
    if action in (Action.LOCAL, Action.IGNORE):
        src = "inventory" if node.known else f"profile {node.profile!r}"
        return plan(action, f"action {action.value!r} from {src}")
    image_name = node.image or settings.boot.default_image
    channel = node.channel or settings.boot.default_channel
    ref = images.resolve(image_name, channel, node.pin, mac=node.mac)
    if ref is None:
        what = f"pinned version {node.pin!r}" if node.pin else f"channel {channel!r}"
        return plan(action, f"no version of image {image_name!r} for {what}")
    why = f"pinned to {ref.version}" if ref.pinned else f"{ref.version} active on {channel!r}"
    return plan(action, f"{action.value} {image_name} {why}", ref)


class Planner:
    """``decide`` plus the boot-session cache. Thread-safe (TFTP/HTTP threads ask too)."""

    def __init__(self, settings: Callable[[], Settings], inventory: Callable[[], Inventory],
                 images: ImageResolver, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._inventory = inventory
        self.images = images
        self._clock = clock
        self._lock = threading.Lock()
        #: mac -> [plan, last asked]: a list, so the hot path (proxy-DHCP asks per packet)
        #: slides the TTL in place instead of allocating a tuple per request.
        self._sessions: dict[str, list] = {}
        #: mac -> transfers in progress (TFTP): such a session does not expire
        self._held: dict[str, int] = {}

    def _alive(self, mac: str, hit: list | None, now: float, ttl: float) -> bool:
        return bool(hit) and (mac in self._held or now - hit[1] < ttl)

    def hold(self, mac: str) -> None:
        """A transfer for this node started: its session cannot expire until release."""
        with self._lock:
            self._held[mac] = self._held.get(mac, 0) + 1

    def release(self, mac: str) -> None:
        """The transfer ended (any outcome); the session slides from now."""
        now = self._clock()
        with self._lock:
            n = self._held.get(mac, 0) - 1
            if n > 0:
                self._held[mac] = n
                return
            self._held.pop(mac, None)
            hit = self._sessions.get(mac)
            if hit:
                hit[1] = now

    def plan(self, facts: ClientFacts) -> BootPlan:
        """The plan for this boot session; created on first ask, then fixed until it ends."""
        now = self._clock()
        ttl = self._settings().boot.session_ttl
        with self._lock:
            hit = self._sessions.get(facts.mac)
            if self._alive(facts.mac, hit, now, ttl):
                hit[1] = now
                return hit[0]
        fresh = decide(facts, self._inventory(), self._settings(), self.images, now=now)
        if not fresh.answers:
            # Nothing is in flight for a machine we stay silent for (local, ignore): don't
            # hold a session, so an inventory change reaches it on its very next request
            # instead of after the session TTL. (A plan without an image does hold one: the
            # DHCP hot path reuses its prepared reply; HTTP ends it once the "nothing to
            # boot" script is sent.)
            return fresh
        with self._lock:
            hit = self._sessions.get(facts.mac)
            if self._alive(facts.mac, hit, now, ttl):  # another thread planned first
                return hit[0]
            self._sessions[facts.mac] = [fresh, now]
            if len(self._sessions) > self.PRUNE_ABOVE:
                self._prune(now, ttl)
        return fresh

    #: Expired sessions are dropped when the table grows past this, so a flood of random
    #: MACs cannot grow memory between the GC's calls to ``sessions()``.
    PRUNE_ABOVE = 4096

    def _prune(self, now: float, ttl: float) -> None:
        for mac in [m for m, (_, t) in self._sessions.items()
                    if now - t >= ttl and m not in self._held]:
            del self._sessions[mac]

    def peek(self, facts: ClientFacts) -> BootPlan:
        """What this machine would get if it booted now (CLI ``plan``, API); not cached."""
        return decide(facts, self._inventory(), self._settings(), self.images,
                      now=self._clock())

    def current(self, mac: str) -> BootPlan | None:
        """The live session's plan for a MAC, if one is open (no new plan is made)."""
        now = self._clock()
        with self._lock:
            hit = self._sessions.get(mac)
            if self._alive(mac, hit, now, self._settings().boot.session_ttl):
                return hit[0]
        return None

    def end_session(self, mac: str) -> None:
        """The boot finished (``booted`` callback): the next boot plans afresh."""
        with self._lock:
            self._sessions.pop(mac, None)

    def reset(self) -> None:
        """Forget every session (after an inventory change an operator asked for)."""
        with self._lock:
            self._sessions.clear()

    def sessions(self) -> list[BootPlan]:
        """Open boot sessions; the store's GC and exports keep what these use."""
        now = self._clock()
        ttl = self._settings().boot.session_ttl
        with self._lock:
            self._prune(now, ttl)
            return [p for p, _ in self._sessions.values()]

    def versions_in_use(self) -> set[tuple[str, str]]:
        return {(p.image.name, p.image.version) for p in self.sessions() if p.image}
