"""Boot sessions shared by replicas: the first replica to plan a MAC's boot wins.

Every replica answers proxy-DHCP, so a Pi's DISCOVER is planned by all of them at
once, and its TFTP retries may reach any of them. The invariant "a boot that started
on version N finishes on version N" therefore needs one plan per boot across the
cluster. A replica that plans a new boot *claims* it: one etcd transaction

    if <prefix>sessions/<mac> does not exist: put our claim (with a lease)
    else: read the claim that is there

so a new session costs exactly one round trip, and every replica but the first adopts
the winner's plan (same session, token, action and versions). A session already open
on this replica never asks etcd (the DHCP memo hit stays in memory).

A claim lives on a lease. Leases are shared: the replica keeps one current lease of
``2 x boot.session_ttl`` and grants a new one every ``session_ttl / 2`` off the hot
path, so a claim made now outlives ``1.5 x session_ttl``; a session still in use here
is written again on the current lease before that (:meth:`SharedSessions.touch`).

When the firmware hands over to the kernel the claim is *moved*, in one transaction in
the background: ``<prefix>sessions/<mac>`` is deleted, so the next power cycle plans
afresh on any replica, and the same plan is written as ``<prefix>booted/<mac>``: the
plan the running OS booted with (``boot.os_plan_ttl``). Booted records have their own
prefix, so they never count as an open firmware session: the claim's compare-and-set
looks at ``sessions/`` only, and a won claim deletes the MAC's booted record in the
same transaction (the node is booting again). They live on a second shared lease of
the replica, of ``os_plan_ttl`` plus three rotation steps, granted afresh at a write
once the current one is older than a step; a record the OS keeps asking about (on any
replica) is written again once a step old. So a record ends no sooner than
``os_plan_ttl`` after the OS's last request, at most three steps later, without a
lease per node
(:meth:`SharedSessions._booted_lease_now`). Every replica loads the booted records at
start (the newest ``boot.max_sessions``) and follows them through a watch, so a
replica that saw nothing of a boot answers the booted OS from memory with the version
it runs (:meth:`SharedSessions.booted`); when a record is deleted every replica drops
its copy of that plan. The other replicas see the claim's delete through their watch
and end their copy of the session the same way.

The open claims are loaded at start too (the newest ``boot.max_sessions``) and followed
by a watch: a request of a boot another replica opened, reaching a replica that
answered none of its firmware's (a Pi's first cloud-init request), is answered with
that boot from memory (:meth:`SharedSessions.open_boot`), and a hand-over there moves
the claim as above.

When etcd is unreachable a claim is not possible: the replica keeps serving the
sessions it holds and plans new boots locally (counted in :attr:`unshared`), which is
what a single daemon would do; it converges when etcd answers again. Only the first
new boot after etcd stops answering waits out the request timeout: for the next
:attr:`SharedSessions.DOWN` seconds new boots do not ask, and the lease loop probes
etcd every second until it answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..model import Action, BootPlan, ClientFacts, ClientKind, ImageRef, normalise_mac
from ..planner import ImageResolver
from .etcd import KV, Etcd, Event, Unreachable, absent, delete_op, mod_is, put_op, range_op

log = logging.getLogger("netbootd.cluster.sessions")


@dataclass(frozen=True, slots=True)
class Claim:
    """The part of a boot plan every replica must agree on."""

    session: str
    token: str
    action: str
    image: tuple[str, str] | None  #: (name, version)
    disk: tuple[str, str] | None
    pinned: bool
    created: float
    replica: str
    rev: int = 0  #: etcd mod revision of the claim (0 = not written)
    #: What the firmware said it is (kind, arch, serial): a replica that rebuilds the plan
    #: of a booted OS it never saw finds the same inventory node and profile with them.
    kind: str = ""
    arch: int | None = None
    serial: str | None = None

    def encode(self) -> str:
        d = asdict(self)
        d.pop("rev")
        return json.dumps(d, sort_keys=True)

    @classmethod
    def decode(cls, value: bytes, rev: int) -> Claim | None:
        try:
            d = json.loads(value)
            return cls(session=d["session"], token=d.get("token", ""), action=d["action"],
                       image=tuple(d["image"]) if d.get("image") else None,
                       disk=tuple(d["disk"]) if d.get("disk") else None,
                       pinned=bool(d.get("pinned")), created=float(d.get("created", 0)),
                       replica=d.get("replica", ""), rev=rev, kind=d.get("kind") or "",
                       arch=int(d["arch"]) if d.get("arch") is not None else None,
                       serial=d.get("serial") or None)
        except (ValueError, KeyError, TypeError):
            return None

    def facts(self, mac: str) -> ClientFacts:
        """The client as the firmware described it when this boot was planned."""
        try:
            kind = ClientKind(self.kind) if self.kind else ClientKind.OTHER
        except ValueError:
            kind = ClientKind.OTHER
        return ClientFacts(mac=mac, kind=kind, arch=self.arch, serial=self.serial)

    @classmethod
    def of(cls, plan: BootPlan, replica: str) -> Claim:
        """The claim of a plan made here (not yet written)."""
        facts = plan.facts
        return cls(session=plan.session, token=plan.token, action=plan.action.value,
                   image=(plan.image.name, plan.image.version) if plan.image else None,
                   disk=(plan.disk.name, plan.disk.version) if plan.disk else None,
                   pinned=bool(plan.image and plan.image.pinned), created=plan.created,
                   replica=replica, kind=str(facts.kind) if facts else "",
                   arch=facts.arch if facts else None, serial=facts.serial if facts else None)


def resolve_claim(c: Claim, images: ImageResolver
                  ) -> tuple[ImageRef | None, ImageRef | None] | str:
    """(image, disk) of a claim through this replica's own store, or why not: the
    version (name and version) this replica does not hold. A replica never plans or
    answers for a version it lacks."""
    refs: list[ImageRef | None] = []
    for want in (c.image, c.disk):
        ref = images.resolve(want[0], "", want[1], mac=None) if want else None
        if want and ref is None:
            return f"{want[0]} {want[1]}"
        refs.append(ref)
    image, disk = refs
    if image is not None and c.pinned != image.pinned:
        image = dataclasses.replace(image, pinned=c.pinned)
    return image, disk


def rebuild(plan: BootPlan, c: Claim, image: ImageRef | None, disk: ImageRef | None,
            reason: str) -> BootPlan:
    """``plan`` (this replica's view of the node) carrying another replica's decision:
    its action, versions, session, token and creation time."""
    return dataclasses.replace(plan, action=Action(c.action), image=image, disk=disk,
                               session=c.session, token=c.token, created=c.created,
                               reason=reason)


class SharedSessions:
    """The claims under ``<prefix>sessions/``, and this replica's lease for them."""

    #: Seconds after etcd last failed to answer during which new boots do not ask it.
    DOWN = 5.0

    def __init__(self, etcd: Etcd, prefix: str, replica: str,
                 session_ttl: Callable[[], float], *,
                 os_plan_ttl: Callable[[], float] = lambda: 86400.0,
                 max_booted: Callable[[], int] = lambda: 65536) -> None:
        self.etcd = etcd
        self.prefix = prefix + "sessions/"
        #: Where the plans booted OSes run with are kept (never an open session).
        self.booted_prefix = prefix + "booted/"
        self.replica = replica
        self._ttl = session_ttl
        self._os_ttl = os_plan_ttl
        self._max_booted = max_booted
        self._lock = threading.Lock()
        #: mac -> the claim as last seen (ours or another replica's), fed by the watch;
        #: least recently written first, bounded by ``max_booted`` (boot.max_sessions): a
        #: flood of new MACs on any replica grows no table here.
        self._claims: OrderedDict[str, Claim] = OrderedDict()
        #: mac -> the plan its OS booted with, as some replica recorded at the hand-over;
        #: oldest write first, bounded by ``max_booted``; fed by the load and the watch.
        self._booted: OrderedDict[str, Claim] = OrderedDict()
        #: mac -> when this replica heard of (or wrote) its booted record, monotonic; 0 =
        #: unknown (loaded at start): the OS's next request here writes it again.
        self._booted_heard: dict[str, float] = {}
        self._booted_loaded = False
        #: The current lease of booted records, when it was granted; its own lock, so a
        #: grant (a round trip) never holds up the claims' lock.
        self._booted_lease = 0
        self._booted_lease_at = 0.0
        self._booted_lease_lock = threading.Lock()
        #: mac -> when we last wrote its claim (for the refresh of sessions in use).
        self._written: dict[str, float] = {}
        self._lease = 0
        self._lease_at = 0.0
        #: Sessions planned without etcd (it was unreachable): a metric, a status line.
        self.unshared = 0
        #: Claims won and adopted here (status page, tests).
        self.won = 0
        self.adopted = 0
        #: Booted records written here at hand-overs, and OS plans answered from another
        #: replica's record (status page, tests).
        self.booted_written = 0
        self.booted_adopted = 0
        #: Called (on the client's thread) with (mac, session) when another replica ended a
        #: boot (hand-over) or its claim expired: the planner ends its copy.
        self.on_ended: Callable[[str, str], None] | None = None
        #: Called (on the client's thread) with (mac, session) when the booted record of
        #: that plan was deleted: the planner drops its copy of the OS plan.
        self.on_booted_gone: Callable[[str, str], None] | None = None
        self._start()

    def _start(self) -> None:
        kvs: list[KV] = []
        try:
            kvs, revision = self.etcd.range_prefix(self.prefix)
            with self._lock:  # boots open now: a request of one may reach this replica
                for kv in sorted(kvs, key=lambda kv: kv.mod_revision):
                    c = Claim.decode(kv.value, kv.mod_revision)
                    if c is not None:
                        self._keep_claim(kv.key[len(self.prefix):], c)
            self._renew_lease()
        except Unreachable as exc:
            log.warning("boot sessions: %s; planning locally until it answers", exc)
            revision = 0
        self.etcd.watch(self.prefix, revision, self._on_events, known=(kv.key for kv in kvs))
        booted_revision, booted = 0, []
        with contextlib.suppress(Unreachable):  # else loaded once etcd answers
            booted_revision, booted = self._load_booted()
        self.etcd.watch(self.booted_prefix, booted_revision, self._on_booted_events,
                        known=booted)
        self.etcd.submit(self._maintain())

    def _load_booted(self) -> tuple[int, list[str]]:
        """Read the booted records into memory (the newest ``max_booted``, merged with
        what the watch brought meanwhile); returns the revision they were read at and
        the keys read."""
        kvs, revision = self.etcd.range_prefix(self.booted_prefix)
        kvs.sort(key=lambda kv: kv.mod_revision)
        with self._lock:
            for kv in kvs[-max(1, self._max_booted()):]:
                c = Claim.decode(kv.value, kv.mod_revision)
                if c is not None:
                    self._remember_booted(kv.key[len(self.booted_prefix):], c, 0.0)
            self._booted_loaded = True
        return revision, [kv.key for kv in kvs]

    def _remember_booted(self, mac: str, c: Claim, heard: float) -> None:
        """Keep a booted record unless a newer one is known (lock held); the oldest go
        beyond ``max_booted``."""
        had = self._booted.get(mac)
        if had is not None and had.rev > c.rev:
            return
        self._booted[mac] = c
        self._booted_heard[mac] = heard
        self._booted.move_to_end(mac)
        while len(self._booted) > max(1, self._max_booted()):
            gone, _ = self._booted.popitem(last=False)
            self._booted_heard.pop(gone, None)

    def _drop_booted(self, mac: str) -> Claim | None:
        """Forget this MAC's booted record here (lock held); returns what was known."""
        self._booted_heard.pop(mac, None)
        return self._booted.pop(mac, None)

    # -- lease --------------------------------------------------------------------------------
    def _renew_lease(self) -> None:
        ttl = self._ttl()
        self._lease = self.etcd.grant(2 * ttl)
        self._lease_at = time.monotonic()

    async def _maintain(self) -> None:
        """Grant the next lease and rewrite the claims of sessions still in use, every
        ``session_ttl / 4`` (bounded to 1..30 s), on the client's loop."""
        import asyncio

        while not self.etcd.closed:
            ttl = self._ttl()
            # while etcd is away, probe every second: new boots skip it until it answers
            pause = 1.0 if not self.etcd.reachable else min(30.0, max(1.0, ttl / 4))
            await asyncio.sleep(pause)
            try:
                if time.monotonic() - self._lease_at > ttl / 2 or not self._lease \
                        or not self.etcd.reachable:
                    await asyncio.to_thread(self._renew_lease)
                if not self._booted_loaded:
                    await asyncio.to_thread(self._load_booted)
            except Unreachable:
                continue

    def _booted_step(self) -> float:
        """How long one booted lease takes new records, and how often a record in use
        is written again: a tenth of ``os_plan_ttl``, 1 s to 1 h."""
        return min(3600.0, max(1.0, self._os_ttl() / 10))

    def _booted_lease_now(self) -> int:
        """The lease a booted record is written on now, ``os_plan_ttl + 3 x step`` long
        (a day's ttl: 27 h): granted afresh (one round trip, off the hot path) once the
        current one took records for a step. A record then outlives its write by
        ``os_plan_ttl + 2 x step``, and one in use is written again once a step old
        (:meth:`touch_booted`), with a step to spare for that write: it ends no sooner
        than ``os_plan_ttl`` after the OS's last request on any replica (as the
        planner's own table), at most three steps later. About ``ttl / step`` leases
        per replica, never one per node."""
        with self._booted_lease_lock:
            step = self._booted_step()
            if not self._booted_lease or time.monotonic() - self._booted_lease_at > step:
                self._booted_lease = self.etcd.grant(self._os_ttl() + 3 * step)
                self._booted_lease_at = time.monotonic()
            return self._booted_lease

    # -- claims -------------------------------------------------------------------------------
    def _key(self, mac: str) -> str:
        return self.prefix + normalise_mac(mac)

    def _booted_key(self, mac: str) -> str:
        return self.booted_prefix + normalise_mac(mac)

    def claim(self, mac: str, mine: Claim) -> Claim | None:
        """Claim this boot (one round trip): returns ``mine`` if it won, the standing claim
        if another replica planned it first, None if etcd is unreachable."""
        key = self._key(mac)
        if self.etcd.recently_down(self.DOWN):
            # etcd did not answer moments ago: a boot must not wait a timeout per new
            # machine; plan here, as a single daemon would (the lease loop probes etcd)
            self.unshared += 1
            return None
        try:
            if not self._lease:
                self._renew_lease()
            # the node boots again: whatever OS plan it had is over (same round trip)
            ok, revision, responses = self.etcd.txn(
                [absent(key)],
                [put_op(key, mine.encode(), self._lease), delete_op(self._booted_key(mac))],
                [range_op(key)])
        except Unreachable:
            self.unshared += 1
            return None
        if ok:
            won = Claim(**{**asdict(mine), "rev": revision})
            with self._lock:
                self._keep_claim(mac, won)
                self._written[mac] = time.monotonic()
            self.won += 1
            return won
        kvs = (responses[0].get("response_range", {}).get("kvs") or []) if responses else []
        if not kvs:  # deleted in between: rare; plan locally rather than loop
            return mine
        theirs = Claim.decode(*_value_rev(kvs[0]))
        if theirs is None:
            return mine
        with self._lock:
            self._keep_claim(mac, theirs)
        self.adopted += 1
        return theirs

    def agree(self, plan: BootPlan, images: ImageResolver) -> BootPlan:
        """The plan this new boot has cluster-wide: ``plan`` if this replica claimed it
        first (or etcd is away), else the winner's, rebuilt here from the same versions,
        session and token. A replica never plans a version it does not hold: it stays
        silent instead (the client's retry reaches a replica that holds it, or this one
        once the version is copied here)."""
        c = self.claim(plan.mac, Claim.of(plan, self.replica))
        if c is None or c.session == plan.session:
            return plan
        refs = resolve_claim(c, images)
        if isinstance(refs, str):
            return dataclasses.replace(
                plan, action=Action.IGNORE, image=None, disk=None,
                reason=f"not answered: replica {c.replica} planned this boot on "
                f"{refs}, which this replica does not hold")
        image, disk = refs
        return rebuild(plan, c, image, disk,
                       f"{plan.reason}; boot planned by replica {c.replica}: "
                       f"{image.name + ' ' + image.version if image else 'no image'}")

    def booted(self, mac: str, images: ImageResolver,
               base: Callable[[ClientFacts], BootPlan]) -> BootPlan | None:
        """The plan the OS running on ``mac`` booted with, from the record the replica
        that saw its hand-over left (memory only: never a round trip), rebuilt on
        ``base(facts)`` (this replica's view of the node) with that record's versions,
        session and token. None when no record is known, or when this replica lacks the
        version: it then answers as if it knew nothing (a fresh plan), as before."""
        with self._lock:
            c = self._booted.get(mac)
        plan = self._from_memory(c, mac, images, base, "booted", "the plan this node's "
                                 "OS booted with (boot planned by replica {replica})")
        if plan is not None:
            self.booted_adopted += 1
        return plan

    def open_boot(self, mac: str, images: ImageResolver,
                  base: Callable[[ClientFacts], BootPlan]) -> BootPlan | None:
        """The firmware session another replica opened for ``mac`` and that is still
        open, from its claim as this replica last heard it (memory only), rebuilt on
        ``base(facts)``: a request of that boot reached a replica that answered none of
        its firmware's (a Pi without a beacon whose first cloud-init request, its
        hand-over, reaches another replica). None when no claim is known or this replica
        lacks the claim's version."""
        with self._lock:
            c = self._claims.get(mac)
        plan = self._from_memory(c, mac, images, base, "has an open boot on",
                                 "an open boot planned by replica {replica}")
        if plan is not None:
            self.adopted += 1
        return plan

    @staticmethod
    def _from_memory(c: Claim | None, mac: str, images: ImageResolver,
                     base: Callable[[ClientFacts], BootPlan], state: str, why: str
                     ) -> BootPlan | None:
        """``c`` (a booted record or an open claim, as this replica last heard it)
        rebuilt on ``base(facts)`` with its versions, session and token; None when there
        is none or this replica lacks its version (the caller then answers as if it knew
        nothing). ``why`` names it in the plan's reason (``{replica}``: who planned it)."""
        if c is None:
            return None
        refs = resolve_claim(c, images)
        if isinstance(refs, str):
            log.debug("%s %s %s (replica %s) and this replica does not hold it: "
                      "answering from a fresh plan", mac, state, refs, c.replica)
            return None
        image, disk = refs
        what = f"{image.name} {image.version}" if image else "no image"
        return rebuild(base(c.facts(mac)), c, image, disk,
                       f"{c.action} {what}: {why.format(replica=c.replica)}")

    def booted_record(self, mac: str) -> Claim | None:
        """The booted record of this MAC as this replica last heard (memory only)."""
        with self._lock:
            return self._booted.get(mac)

    def touch_booted(self, mac: str) -> None:
        """The OS on ``mac`` asked here: once its record is a step old, write it again
        on the current booted lease (in the background), so the plan stays known
        everywhere while the OS keeps asking anywhere. Memory only on the request path."""
        now = time.monotonic()
        with self._lock:
            c = self._booted.get(mac)
            if c is None or now - self._booted_heard.get(mac, now) <= self._booted_step():
                return
            self._booted_heard[mac] = now
        self.etcd.submit(self._rewrite_booted(mac, c))

    async def _rewrite_booted(self, mac: str, c: Claim) -> None:
        import asyncio

        key = self._booted_key(mac)

        def write() -> None:
            # only if nobody changed it meanwhile (a new boot, forget, another rewrite)
            self.etcd.txn([mod_is(key, c.rev)],
                          [put_op(key, c.encode(), self._booted_lease_now())])

        with contextlib.suppress(Unreachable):
            await asyncio.to_thread(write)

    def _keep_claim(self, mac: str, claim: Claim) -> None:
        """Remember a claim (lock held); the least recently written go beyond the bound
        (only memory: etcd still holds them, and their leases end them there)."""
        self._claims[mac] = claim
        self._claims.move_to_end(mac)
        limit = max(1, self._max_booted())
        while len(self._claims) > limit:
            gone, _ = self._claims.popitem(last=False)
            self._written.pop(gone, None)

    def lookup(self, mac: str) -> Claim | None:
        """The standing claim for this MAC as this replica last heard (memory only)."""
        with self._lock:
            return self._claims.get(mac)

    def touch(self, mac: str) -> None:
        """A session of this MAC was used here: once per ``session_ttl / 2`` its claim is
        written again on the current lease (in the background), so a long boot (a slow
        transfer) outlives the lease it was claimed on. Memory only on the hot path."""
        now = time.monotonic()
        with self._lock:
            c = self._claims.get(mac)
            if c is None or now - self._written.get(mac, now) <= self._ttl() / 2:
                return
            self._written[mac] = now
        self.etcd.submit(self._rewrite(mac, c))

    async def _rewrite(self, mac: str, c: Claim) -> None:
        import asyncio

        key = self._key(mac)
        with contextlib.suppress(Unreachable):
            await asyncio.to_thread(
                self.etcd.txn, [mod_is(key, c.rev)], [put_op(key, c.encode(), self._lease)])

    def ended(self, mac: str, session: str) -> None:
        """The firmware handed over (or the boot ended) here: the claim becomes the MAC's
        booted record, so the next boot plans afresh on any replica while every replica
        answers the OS with the plan it booted. Background; etcd being away only delays
        the delete (else the lease ends the claim) and loses the record."""
        with self._lock:
            c = self._claims.get(mac)
            if c is None or c.session != session:
                return
            self._claims.pop(mac, None)
            self._written.pop(mac, None)

        def move() -> None:
            try:
                self._move_to_booted(mac, c)
            except Unreachable as exc:
                log.info("boot of %s handed over; etcd: %s (its claim ends with its lease; "
                         "only the replicas that saw the boot keep its OS plan)", mac, exc)

        threading.Thread(target=move, name="etcd-session-end", daemon=True).start()

    def _move_to_booted(self, mac: str, c: Claim) -> None:
        """Delete the claim and write the booted record in one transaction. If the claim
        was written again meanwhile (same session, another lease) it is moved at its new
        revision; if another boot of the MAC claimed it, this OS is gone: nothing is kept."""
        key, booted = self._key(mac), self._booted_key(mac)
        rev = c.rev
        for _ in range(3):
            record = put_op(booted, c.encode(), self._booted_lease_now())
            compare = mod_is(key, rev) if rev else absent(key)
            ops = [delete_op(key), record] if rev else [record]
            ok, _revision, responses = self.etcd.txn([compare], ops, [range_op(key)])
            if ok:
                self.booted_written += 1
                return
            kvs = (responses[0].get("response_range", {}).get("kvs") or []) if responses \
                else []
            standing = Claim.decode(*_value_rev(kvs[0])) if kvs else None
            if kvs and (standing is None or standing.session != c.session):
                return  # the node is booting again
            rev = standing.rev if standing is not None else 0

    def forget(self, mac: str) -> None:
        """An operator changed this node's lifecycle: whatever boot was claimed for it, and
        the plan its OS booted with, end everywhere, so the next request on any replica
        plans afresh. Background, one transaction."""
        with self._lock:
            self._claims.pop(mac, None)
            self._written.pop(mac, None)
            self._drop_booted(mac)
        ops = [delete_op(self._key(mac)), delete_op(self._booted_key(mac))]

        def drop() -> None:
            with contextlib.suppress(Unreachable):
                self.etcd.txn([], ops)

        threading.Thread(target=drop, name="etcd-session-forget", daemon=True).start()

    def _on_events(self, events: list[Event], _revision: int) -> None:
        ended = []
        with self._lock:
            for ev in events:
                mac = ev.kv.key[len(self.prefix):]
                had = self._claims.get(mac)
                if ev.deleted:
                    if had is not None and had.rev <= ev.kv.mod_revision:
                        self._claims.pop(mac, None)
                        self._written.pop(mac, None)
                        ended.append((mac, had.session))
                    continue
                c = Claim.decode(ev.kv.value, ev.kv.mod_revision)
                if c is None:
                    continue
                if had is not None and had.session != c.session:
                    ended.append((mac, had.session))
                if had is None or had.rev <= c.rev:
                    self._keep_claim(mac, c)
        _tell(self.on_ended, ended, "ending session")

    def _on_booted_events(self, events: list[Event], _revision: int) -> None:
        """Follow the booted records: a write is remembered; a delete (the node boots
        again, an operator's verb or an install report, nobody asked for
        ``os_plan_ttl``) is forgotten unless a newer write is known, and the planner
        drops its own copy of that plan (:attr:`on_booted_gone`)."""
        gone = []
        now = time.monotonic()
        with self._lock:
            for ev in events:
                mac = ev.kv.key[len(self.booted_prefix):]
                if ev.deleted:
                    had = self._booted.get(mac)
                    if had is not None and had.rev <= ev.kv.mod_revision:
                        self._drop_booted(mac)
                        gone.append((mac, had.session))
                    continue
                c = Claim.decode(ev.kv.value, ev.kv.mod_revision)
                if c is not None:
                    self._remember_booted(mac, c, now)
        _tell(self.on_booted_gone, gone, "dropping the OS plan")

    def health(self) -> dict[str, int]:
        with self._lock:
            known, booted = len(self._claims), len(self._booted)
        return {"claims_known": known, "won": self.won, "adopted": self.adopted,
                "planned_without_etcd": self.unshared, "booted_known": booted,
                "booted_written": self.booted_written, "booted_adopted": self.booted_adopted}


def _tell(callback: Callable[[str, str], None] | None, items: list[tuple[str, str]],
          what: str) -> None:
    """Call ``callback(mac, session)`` for each item; one that fails is logged, the rest
    are still told (called outside the lock, on the client's thread)."""
    if callback is None:
        return
    for mac, session in items:
        try:
            callback(mac, session)
        except Exception:
            log.exception("%s %s of %s", what, session, mac)


def _value_rev(kv: dict) -> tuple[bytes, int]:
    parsed = KV.parse(kv)
    return parsed.value, parsed.mod_revision
