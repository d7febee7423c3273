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

import dataclasses
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from .inventory import Inventory
from .model import Action, BootPlan, ClientFacts, ClientKind, ImageRef, NodeView
from .nodestate import NodeRecord, NodeState, Stage
from .ratelimit import RateLimiter
from .settings import Settings


class ImageResolver(Protocol):
    """What the planner needs from the image store (netbootd.store implements it)."""

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        """The version a node gets: the inventory pin, else a pin the store keeps for
        ``mac`` (``netbootd images pin``), else the channel's active version. Pure: asking
        changes nothing (``netbootd plan`` must not change what GC keeps)."""
        ...


class SharedBoots(Protocol):
    """Boot sessions shared with other replicas (``cluster/sessions.py`` over etcd).

    The planner asks it only when a *new* firmware session starts (one round trip);
    a session already open here is answered from memory, as on a single daemon. The
    plans booted OSes run with are shared too, in memory on every replica
    (:meth:`booted`), so a booted node's requests may reach any replica.
    """

    def agree(self, plan: BootPlan, images: ImageResolver) -> BootPlan:
        """The plan of this boot cluster-wide: ``plan``, or the first replica's."""
        ...

    def touch(self, mac: str) -> None:
        """A session was used here (keeps its shared claim alive; memory only)."""
        ...

    def ended(self, mac: str, session: str) -> None:
        """The firmware handed over here: the next boot plans afresh everywhere."""
        ...

    def forget(self, mac: str) -> None:
        """Drop this MAC's boot everywhere (its lifecycle changed: re-plan at once)."""
        ...

    def booted(self, mac: str, images: ImageResolver,
               base: Callable[[ClientFacts], BootPlan]) -> BootPlan | None:
        """The plan the OS on ``mac`` booted with, as the replica that saw its hand-over
        recorded it, rebuilt on ``base(facts)`` through ``images``; None when unknown or
        when this replica lacks its version. Memory only: never a round trip."""
        ...

    def touch_booted(self, mac: str) -> None:
        """The OS on ``mac`` asked here (keeps its shared record alive; memory only)."""
        ...

    def open_boot(self, mac: str, images: ImageResolver,
                  base: Callable[[ClientFacts], BootPlan]) -> BootPlan | None:
        """The still open firmware session another replica planned for ``mac``, from its
        claim, rebuilt like :meth:`booted`; None when unknown or its version is not
        held here. Memory only."""
        ...


class NoImages:
    """A resolver with an empty store (the daemon before the store is up, unit tests)."""

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        return None


#: DHCP client architectures (RFC 4578 / IANA) by the board family they boot.
_X86_ARCHES = frozenset({0, 6, 7, 9})
_ARM64_ARCHES = frozenset({11, 19, 22})
_ARM32_ARCHES = frozenset({10, 18, 21})
#: Board names an image's manifest may use for each family.
X86_BOARDS = frozenset({"x86_64", "amd64", "x86", "i386", "pc"})
ARM64_BOARDS = frozenset({"arm64", "aarch64"})
ARM32_BOARDS = frozenset({"armhf", "armv7", "arm"})


def incompatibility(facts: ClientFacts, image: ImageRef) -> str | None:
    """Why ``image`` cannot boot this client, or None when it can (or we cannot tell).

    A Raspberry Pi needs a Pi boot tree; a PXE/iPXE client needs a kernel for its CPU.
    An image without ``boards`` (older tests, synthetic stores) is not judged.
    """
    boards = tuple(b.lower() for b in image.boards)
    if not boards:
        return None
    what = f"image {image.name} {image.version} (kind {image.kind}, boards {', '.join(boards)})"
    if facts.kind is ClientKind.RPI:
        if image.kind == "pi-boot+rootfs" or image.boot.get("boot_tree"):
            return None
        return f"{what} has no Raspberry Pi boot tree"
    if facts.kind is ClientKind.OTHER and facts.arch is None:
        return None
    if image.kind == "disk":
        return f"{what} is a disk image: it is installed, not netbooted"
    arch = facts.arch
    if facts.kind in (ClientKind.PXE_BIOS, ClientKind.PXE_UEFI_X64):
        arch = 7 if arch is None else arch
    if facts.kind is ClientKind.PXE_UEFI_ARM64:
        arch = 11 if arch is None else arch
    if facts.kind is ClientKind.UBOOT:
        # A U-Boot seen only over TFTP (no DHCP from it yet) is taken to be arm64:
        # the board family netbootd has U-Boot images for.
        arch = 22 if arch is None else arch
    if arch in _X86_ARCHES and not set(boards) & X86_BOARDS:
        return f"{what} does not boot x86 machines (client arch {arch})"
    if arch in _ARM64_ARCHES and not set(boards) & ARM64_BOARDS:
        return f"{what} does not boot arm64 machines (client arch {arch})"
    if arch in _ARM32_ARCHES and not set(boards) & ARM32_BOARDS:
        return f"{what} does not boot 32-bit arm machines (client arch {arch})"
    return None


def follows_channel(node: NodeView, record: NodeRecord | None) -> bool:
    """Is this an installed node whose disk follows its install channel (or pin)?

    Only for such a node does the action depend on the store (``wanted`` of
    :func:`effective_action`); callers that avoid resolving images (the node list) must
    resolve for these, or they would show ``local`` for a node whose next boot installs.
    """
    return (record is not None and record.stage in (Stage.INSTALLED, Stage.LOCAL)
            and node.install.get("upgrade") == "auto" and bool(node.install.get("image")))


def effective_action(node: NodeView, record: NodeRecord | None, *, retry_failed: bool = True,
                     wanted: ImageRef | None = None) -> tuple[Action, str]:
    """The action a node gets: nodes.yaml's, unless its lifecycle says otherwise.

    Precedence (docs/provisioning.md): an inventory ``ignore`` always wins. Otherwise a
    lifecycle record written while nodes.yaml said what it says now wins: an install
    that finished makes the node ``local`` (silence: it boots from its disk), an
    unfinished or failed one installs again (unless ``provision.retry_failed`` is off),
    an operator's ``netbootd nodes reinstall|local|netboot`` applies. An edit of the
    node's action in nodes.yaml after that record starts over from the new action.
    With ``install.upgrade: auto``, an installed node whose disk image channel (or pin)
    now names another version (``wanted``) than the one on its disk installs again:
    that is how activation and rollback reach installed nodes.
    """
    inventory = node.action or Action.NETBOOT
    if inventory is Action.IGNORE or record is None:
        return inventory, ""
    desired = node.desired.value if node.desired is not None else None
    if record.desired != desired:
        return inventory, ""
    stage = record.stage
    if stage in (Stage.INSTALL, Stage.INSTALLING):
        why = "install did not finish" if stage is Stage.INSTALLING else "install requested"
        return Action.INSTALL, f"lifecycle {stage.value}: {why}"
    if stage is Stage.FAILED:
        if retry_failed:
            return Action.INSTALL, f"lifecycle install-failed ({record.reason}): retrying"
        return Action.LOCAL, f"lifecycle install-failed ({record.reason}): not retried"
    if follows_channel(node, record) and wanted is not None and record.version and \
            (wanted.name, wanted.version) != (record.image, record.version):
        return Action.INSTALL, (f"upgrade: {record.image} {record.version} on disk, "
                                f"{wanted.name} {wanted.version} wanted")
    if stage in (Stage.INSTALLED, Stage.LOCAL):
        return Action.LOCAL, (f"lifecycle {stage.value}: {record.image or 'disk'} "
                              f"{record.version or ''}".rstrip())
    return Action.NETBOOT, "lifecycle netboot (operator)"


def decide(facts: ClientFacts, inventory: Inventory, settings: Settings,
           images: ImageResolver, *, now: float | None = None,
           record: NodeRecord | None = None, session: str | None = None,
           token: str | None = None) -> BootPlan:
    """The pure decision for one machine, without the cache. ``record`` is the node's
    lifecycle record (nodestate.py), read by the caller. ``session`` and ``token``: the
    boot's identity and proof, random unless given (the render check fixes them: it
    decides every node of the fleet, and two ``os.urandom`` calls a node were a
    tenth of its time)."""
    now = time.time() if now is None else now
    node = inventory.view(facts)
    if session is None:
        session = uuid.uuid4().hex[:12]
    if token is None:
        token = secrets.token_hex(12)
    stage = record.stage.value if record is not None else ""

    def plan(action: Action, reason: str, image: ImageRef | None = None,
             disk: ImageRef | None = None) -> BootPlan:
        return BootPlan(action=action, node=node, image=image, reason=reason, session=session,
                        created=now, facts=facts, disk=disk, token=token, stage=stage)

    if not node.known and settings.policy.unknown == "ignore":
        return plan(Action.IGNORE, "unknown machine and policy.unknown is 'ignore'")
    channel = node.channel or settings.boot.default_channel
    spec = node.install
    wanted = None
    if follows_channel(node, record):
        wanted = images.resolve(spec["image"], spec.get("channel") or channel, spec.get("pin"),
                                mac=None)
    action, why_action = effective_action(node, record, wanted=wanted,
                                          retry_failed=settings.provision.retry_failed)
    if action in (Action.LOCAL, Action.IGNORE):
        src = why_action or ("inventory" if node.known else f"profile {node.profile!r}")
        installed = None
        if record is not None and record.image and record.version and action is Action.LOCAL:
            installed = images.resolve(record.image, "", record.version, mac=None)
        return plan(action, f"action {action.value!r} from {src}", disk=installed)
    disk: ImageRef | None = None
    if action is Action.INSTALL:
        if not spec.get("image"):
            return plan(action, "action install but no install.image named (nodes.yaml)")
        disk_channel = spec.get("channel") or channel
        disk = images.resolve(spec["image"], disk_channel, spec.get("pin"), mac=None)
        if disk is None:
            what = f"version {spec['pin']!r}" if spec.get("pin") else f"channel {disk_channel!r}"
            return plan(action, f"no version of disk image {spec['image']!r} for {what}")
        if disk.kind != "disk" or disk.disk is None:
            return plan(Action.IGNORE, f"not answered: {disk.name} {disk.version} is kind "
                        f"{disk.kind!r}, not a disk image")
        image_name = spec.get("installer") or settings.provision.installer_image
        ref = images.resolve(image_name, channel, None, mac=None)
        pin_note = ""
    else:
        image_name = node.image or settings.boot.default_image
        ref = images.resolve(image_name, channel, node.pin, mac=node.mac)
        pin_note = f"pinned version {node.pin!r}" if node.pin else ""
    if ref is None:
        return plan(action, f"no version of image {image_name!r} for "
                    f"{pin_note or f'channel {channel!r}'}", disk=disk)
    why_not = incompatibility(facts, ref)
    if why_not is not None:
        # Silence, not a broken boot: the machine falls through to its next boot device
        # and the reason is in the log, the event timeline and ``netbootd plan``.
        return plan(Action.IGNORE, f"not answered: {why_not}")
    why = f"pinned to {ref.version}" if ref.pinned else f"{ref.version} active on {channel!r}"
    if disk is not None:
        why += f", writing {disk.name} {disk.version}"
    if why_action:
        why += f" ({why_action})"
    return plan(action, f"{action.value} {image_name} {why}", ref, disk)


def fit_warnings(inventory: Inventory, settings: Settings, images: ImageResolver) -> list[str]:
    """``netbootd check``: inventory nodes whose image cannot boot them, as far as the
    inventory tells what they are (a Pi serial, a profile's kind or arch selector).
    Warnings, not errors: the image may become fit before the node boots."""
    out = []
    for mac, node in inventory.nodes.items():
        view = inventory.view(ClientFacts(mac=mac, serial=node.serial))
        prof = inventory.profiles.get(view.profile)
        sel = prof.selectors if prof is not None else None
        kind = ClientKind.RPI if node.serial or (sel and sel.kind == "rpi") else None
        if kind is None and sel is not None and sel.kind:
            try:
                kind = ClientKind(sel.kind)
            except ValueError:
                kind = None
        arch = sel.arch if sel is not None else None
        if kind is None and arch is None:
            continue
        facts = ClientFacts(mac=mac, serial=node.serial, kind=kind or ClientKind.OTHER,
                            arch=arch)
        plan = decide(facts, inventory, settings, images)
        if plan.action is Action.IGNORE and plan.reason.startswith("not answered:"):
            out.append(f"{view.hostname} ({mac}): {plan.reason.removeprefix('not answered: ')}"
                       " -- it gets no answer")
    return out


class _Session:
    """One open boot session: the plan, when it was last asked about, open transfers."""

    __slots__ = ("holds", "last", "plan")

    def __init__(self, plan: BootPlan, now: float) -> None:
        self.plan = plan
        self.last = now
        self.holds = 0


def _nothing() -> None:
    return None


class NewBoot:
    """A boot this replica decided but has not yet agreed with the other replicas
    (:meth:`Planner.begin`); :meth:`Planner.finish` agrees it."""

    __slots__ = ("mac", "now", "plan")

    def __init__(self, mac: str, plan: BootPlan, now: float) -> None:
        self.mac = mac  #: as asked (the session table's key)
        self.plan = plan
        self.now = now


class Planner:
    """``decide`` plus the boot-session table. Thread-safe (TFTP/HTTP threads ask too).

    What starts a new boot, in one place:

    - A *firmware* request (proxy-DHCP, TFTP, ``/ipxe``: :meth:`plan`) continues the
      node's open firmware session, or starts one. Each request of the boot (also
      ``/files``, the beacon, cloud-init, events: :meth:`current`) slides the session by
      ``boot.session_ttl``; a transfer in progress (:meth:`hold`) keeps it open however
      long it takes. The plan never changes inside a session.
    - When the firmware hands over to the kernel (iPXE's beacon, or the booted OS's
      first request), or the node reports a lifecycle event with proof, the firmware
      session ends (:meth:`handed_over`, :meth:`end`): the next firmware request, e.g.
      after a power cycle, plans afresh and gets a hot-swapped version. The plan the OS
      booted with is kept (``boot.os_plan_ttl``), so its cloud-init and events see the
      version it runs. With replicas (:attr:`shared`) that plan is shared: a replica
      that saw nothing of the boot answers the OS from the record the replica that saw
      the hand-over left (:meth:`current`, from memory), unless it lacks that version.
    - Plans that boot nothing (no image, ``local``, ``ignore``) are never held: the
      node's next request decides again, so a Pi that asked before its image was active
      boots as soon as it is.
    """

    def __init__(self, settings: Callable[[], Settings], inventory: Callable[[], Inventory],
                 images: ImageResolver, *, clock: Callable[[], float] = time.time,
                 state: NodeState | None = None) -> None:
        self._settings = settings
        self._inventory = inventory
        self.images = images
        #: The lifecycle records (nodestate.py); None = no provisioning state (tests).
        self.state = state
        self._clock = clock
        self._lock = threading.Lock()
        #: mac -> firmware session, least recently asked first (eviction and expiry are
        #: O(1) from the front: a flood of new MACs never rescans the table).
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        #: mac -> the plan its running OS booted with, oldest first.
        self._booted: OrderedDict[str, _Session] = OrderedDict()
        #: mac -> (a plan that boots nothing, when made): reused for BRIEF seconds only, so
        #: a machine retrying many times a second (or a DHCP flood) does not run the whole
        #: decision per packet, while an image that goes live is seen within a second.
        self._brief: OrderedDict[str, tuple[BootPlan, float]] = OrderedDict()
        #: Sessions dropped because the table was full (a metric; a flood of MACs).
        self.evicted = 0
        #: New boots of unknown machines held back by ``cluster.unknown_boot_rate``, and
        #: the metric told of each (replicas only: :meth:`_admit_unknown`).
        self.unknown_deferred = 0
        self.count_deferred: Callable[[], object] = _nothing
        self._unknown_gate: RateLimiter | None = None
        #: Boots shared with other replicas (cluster.backend: etcd); None = this daemon alone.
        self.shared: SharedBoots | None = None
        #: A plan's boot token when it must not be random (a Pi on HTTP boot, whose
        #: boot.img is built ahead of time: netbootd/rpi/bootimg.py); None = random.
        self.token_for: Callable[[BootPlan], str | None] | None = None

    # -- firmware requests -------------------------------------------------------------------
    def plan(self, facts: ClientFacts) -> BootPlan:
        """The plan for this boot session; created on first ask, then fixed until it ends."""
        first = self.begin(facts)
        return self.finish(first) if isinstance(first, NewBoot) else first

    def begin(self, facts: ClientFacts) -> BootPlan | NewBoot:
        """:meth:`plan` without waiting for anyone: the plan when it is known here (an
        open session, a recent plan that boots nothing) or needs no other replica; else
        the :class:`NewBoot` still to be agreed with the other replicas, which
        :meth:`finish` does (one etcd round trip: call it where waiting is harmless)."""
        now = self._clock()
        boot = self._settings().boot
        with self._lock:
            hit = self._sessions.get(facts.mac)
            if hit is not None and (hit.holds or now - hit.last < boot.session_ttl):
                hit.last = now
                self._sessions.move_to_end(facts.mac)
                if self.shared is not None:
                    self.shared.touch(facts.mac)
                return hit.plan
            brief = self._brief.get(facts.mac)
            if brief is not None and 0 <= now - brief[1] < self.BRIEF and \
                    brief[0].facts == facts:
                return brief[0]
        fresh = self._decide(facts, now)
        if self.shared is not None and fresh.answers and fresh.image is not None:
            if fresh.node.known or self._admit_unknown(now):
                return NewBoot(facts.mac, fresh, now)
            # held back, never sticky: a plan that boots nothing, reused BRIEF seconds
            fresh = dataclasses.replace(
                fresh, action=Action.IGNORE, image=None, disk=None,
                reason="not answered yet: new boots of machines not in the inventory "
                "came faster than cluster.unknown_boot_rate; a later retry is answered")
        return self._settle(facts.mac, fresh, now)

    def _admit_unknown(self, now: float) -> bool:
        """May a machine not in the inventory start a boot shared through etcd now?

        Every new boot is a claim written to etcd that lives a session; a flood of
        random MACs (``policy.unknown: default``) would otherwise write them as fast as
        etcd commits and fill its keyspace. One bucket for all unknown machines, at
        ``cluster.unknown_boot_rate``: inventory nodes never pass through it."""
        rate = self._settings().cluster.unknown_boot_rate
        with self._lock:
            gate = self._unknown_gate
            if gate is None or gate.rate != rate:
                gate = self._unknown_gate = RateLimiter(rate, max_clients=1)
            if gate.allow("", now):
                return True
        self.unknown_deferred += 1
        self.count_deferred()
        return False

    def finish(self, new: NewBoot) -> BootPlan:
        """The plan of a new boot once the replicas agree on it (the first replica to
        plan it wins, the others adopt its plan): one round trip."""
        assert self.shared is not None
        # One round trip: the first replica to plan this boot wins, the others adopt.
        return self._settle(new.mac, self.shared.agree(new.plan, self.images), new.now)

    def _settle(self, mac: str, fresh: BootPlan, now: float) -> BootPlan:
        """Keep a new plan: as the MAC's session when it boots an image, else briefly."""
        boot = self._settings().boot
        if not fresh.answers or fresh.image is None:
            # Never sticky: no session is held, and this answer is reused only briefly.
            with self._lock:
                self._brief[mac] = (fresh, now)
                self._brief.move_to_end(mac)
                while len(self._brief) > boot.max_sessions:
                    self._brief.popitem(last=False)
            return fresh
        with self._lock:
            hit = self._sessions.get(mac)
            if hit is not None and (hit.holds or now - hit.last < boot.session_ttl):
                return hit.plan  # another thread planned first: theirs stands
            self._open_locked(mac, fresh, now, boot)
        self._mark_used(fresh)
        return fresh

    def _open_locked(self, mac: str, plan: BootPlan, now: float, boot: Any) -> None:
        """Keep ``plan`` as the MAC's firmware session (lock held)."""
        self._sessions[mac] = _Session(plan, now)
        self._sessions.move_to_end(mac)
        self._expire(self._sessions, now, boot.session_ttl, boot.max_sessions)

    #: Seconds a plan that boots nothing is reused for the same question (at most: any
    #: change of images or inventory drops it at once, see :meth:`changed`).
    BRIEF = 1.0

    def changed(self) -> None:
        """Images or inventory changed: plans that boot nothing are decided again."""
        with self._lock:
            self._brief.clear()

    def _decide(self, facts: ClientFacts, now: float) -> BootPlan:
        record = None
        if self.state is not None:
            inventory = self._inventory()
            found = inventory.node_for(facts)
            record = self.state.get(found[0] if found else facts.mac)
        plan = decide(facts, self._inventory(), self._settings(), self.images, now=now,
                      record=record)
        if self.token_for is not None:
            token = self.token_for(plan)
            if token:
                plan = dataclasses.replace(plan, token=token)
        return plan

    def forget(self, mac: str) -> None:
        """Drop every session of this MAC (an operator changed its lifecycle)."""
        with self._lock:
            self._sessions.pop(mac, None)
            self._booted.pop(mac, None)
            self._brief.pop(mac, None)
        if self.shared is not None:
            self.shared.forget(mac)

    def _mark_used(self, plan: BootPlan) -> None:
        """Retention is recorded where a session starts, never when someone only asks."""
        mark = getattr(self.images, "mark_used", None)
        if mark is not None:
            for ref in (plan.image, plan.disk):
                if ref is not None:
                    mark(ref.name, ref.version)

    def _expire(self, table: OrderedDict[str, _Session], now: float, ttl: float,
                limit: int) -> None:
        """Drop expired entries from the front, then the oldest beyond ``limit``."""
        while table:
            mac, s = next(iter(table.items()))
            if s.holds or now - s.last < ttl:
                break
            del table[mac]
        while len(table) > limit:
            table.popitem(last=False)
            self.evicted += 1

    # -- requests of a boot already planned ----------------------------------------------------
    def current(self, mac: str) -> BootPlan | None:
        """The plan of the boot this MAC is in: its firmware session, else the plan its
        OS booted with (here, or as another replica recorded it). Refreshes it. None
        when the MAC is in no boot."""
        now = self._clock()
        boot = self._settings().boot
        with self._lock:
            hit = self._current_locked(mac, now, boot)
        if hit is not None or self.shared is None:
            return hit
        return self._adopt(self.shared, mac, now, boot)

    def _current_locked(self, mac: str, now: float, boot: Any) -> BootPlan | None:
        """This replica's own session or booted plan of ``mac``, refreshed (lock held)."""
        for table, ttl in ((self._sessions, boot.session_ttl),
                           (self._booted, boot.os_plan_ttl)):
            hit = table.get(mac)
            if hit is not None and (hit.holds or now - hit.last < ttl):
                hit.last = now
                table.move_to_end(mac)
                if self.shared is not None:
                    if table is self._sessions:
                        self.shared.touch(mac)
                    else:
                        self.shared.touch_booted(mac)
                return hit.plan
        return None

    def _adopt(self, shared: SharedBoots, mac: str, now: float, boot: Any
               ) -> BootPlan | None:
        """A request reaches a replica that has no plan of this MAC; take the one another
        replica left in the shared records (memory, never a round trip):

        - the plan its OS booted with (a booted OS asking a replica that saw nothing of
          its boot), kept here like a plan this replica handed over itself;
        - else its still open boot (a Pi's first cloud-init request, its hand-over,
          reaching a replica that answered none of its firmware's), kept as a session,
          as a firmware retry here would adopt it, so a hand-over here ends the boot
          for every replica.

        Later requests are plain hits; GC keeps the version."""
        base = lambda facts: self._decide(facts, now)
        plan = shared.booted(mac, self.images, base)
        still_open = plan is None
        if still_open:
            plan = shared.open_boot(mac, self.images, base)
            if plan is None:
                return None
        with self._lock:
            hit = self._current_locked(mac, now, boot)
            if hit is not None:
                return hit  # planned or adopted here meanwhile: that one stands
            if still_open:
                self._open_locked(mac, plan, now, boot)
            else:
                self._booted_locked(mac, _Session(plan, now), now, boot)
        if still_open:
            self._mark_used(plan)
        return plan

    def hold(self, mac: str) -> None:
        """A transfer for this node started: the session stays open until release."""
        with self._lock:
            hit = self._sessions.get(mac) or self._booted.get(mac)
            if hit is not None:
                hit.holds += 1

    def release(self, mac: str) -> None:
        """A transfer ended; the session slides from now."""
        now = self._clock()
        with self._lock:
            for table in (self._sessions, self._booted):
                hit = table.get(mac)
                if hit is not None and hit.holds:
                    hit.holds -= 1
                    hit.last = now
                    return

    def handed_over(self, mac: str) -> None:
        """The firmware started the kernel: end the firmware session, keep its plan for
        the OS that is now running."""
        now = self._clock()
        boot = self._settings().boot
        with self._lock:
            hit = self._sessions.pop(mac, None)
            if hit is None:
                return
            self._booted_locked(mac, hit, now, boot)
        if self.shared is not None:
            self.shared.ended(mac, hit.plan.session)

    def ended_elsewhere(self, mac: str, session: str) -> None:
        """Another replica ended this boot (its firmware handed over there) or its shared
        claim expired: this replica's copy of the session ends the same way."""
        now = self._clock()
        boot = self._settings().boot
        with self._lock:
            hit = self._sessions.get(mac)
            if hit is None or hit.plan.session != session or hit.holds:
                return  # a transfer of it runs here: this replica finishes that boot
            del self._sessions[mac]
            self._booted_locked(mac, hit, now, boot)

    def booted_gone(self, mac: str, session: str) -> None:
        """The shared record of the plan this MAC's OS booted with was deleted (the node
        boots again, its lifecycle changed, or no replica heard of it for
        ``os_plan_ttl``): this replica's copy goes too, as on the replica that saw it."""
        with self._lock:
            hit = self._booted.get(mac)
            if hit is not None and hit.plan.session == session and not hit.holds:
                del self._booted[mac]

    def _booted_locked(self, mac: str, hit: _Session, now: float, boot: Any) -> None:
        """Keep an ended firmware session's plan for the OS it booted (lock held)."""
        hit.last = now
        self._booted[mac] = hit
        self._booted.move_to_end(mac)
        self._expire(self._booted, now, boot.os_plan_ttl, boot.max_sessions)

    def end(self, mac: str) -> None:
        """The boot is over (``booted``/``installed`` with proof): the next boot plans
        afresh; the OS keeps seeing the plan it booted with."""
        self.handed_over(mac)

    end_session = end

    # -- no side effects -------------------------------------------------------------------------
    def peek(self, facts: ClientFacts) -> BootPlan:
        """What this machine would get if it booted now (CLI ``plan``, API); changes nothing."""
        return self._decide(facts, self._clock())

    def reset(self) -> None:
        """Forget every session (after an inventory change an operator asked for)."""
        with self._lock:
            self._sessions.clear()
            self._booted.clear()
            self._brief.clear()

    def sessions(self) -> list[BootPlan]:
        """Open boot sessions and the plans running OSes booted with; the store's GC and
        the NFS exports keep what these use."""
        now = self._clock()
        boot = self._settings().boot
        with self._lock:
            self._expire(self._sessions, now, boot.session_ttl, boot.max_sessions)
            self._expire(self._booted, now, boot.os_plan_ttl, boot.max_sessions)
            return [s.plan for s in (*self._sessions.values(), *self._booted.values())]

    def versions_in_use(self) -> set[tuple[str, str]]:
        return {(r.name, r.version) for p in self.sessions() for r in (p.image, p.disk) if r}
