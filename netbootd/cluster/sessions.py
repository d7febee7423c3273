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
is written again on the current lease before that (:meth:`refresh_due`). When the
firmware hands over to the kernel the claim is deleted (in the background), so the
next power cycle plans afresh on any replica; the other replicas see the delete
through their watch and end their copy of the session the same way.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..model import Action, BootPlan, normalise_mac
from ..planner import ImageResolver
from .etcd import Etcd, Event, Unreachable, absent, delete_op, mod_is, put_op, range_op

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
                       replica=d.get("replica", ""), rev=rev)
        except (ValueError, KeyError, TypeError):
            return None


class SharedSessions:
    """The claims under ``<prefix>sessions/``, and this replica's lease for them."""

    #: Seconds after etcd last failed to answer during which new boots do not ask it.
    DOWN = 5.0

    def __init__(self, etcd: Etcd, prefix: str, replica: str,
                 session_ttl: Callable[[], float]) -> None:
        self.etcd = etcd
        self.prefix = prefix + "sessions/"
        self.replica = replica
        self._ttl = session_ttl
        self._lock = threading.Lock()
        #: mac -> the claim as last seen (ours or another replica's), fed by the watch.
        self._claims: dict[str, Claim] = {}
        #: mac -> when we last wrote its claim (for the refresh of sessions in use).
        self._written: dict[str, float] = {}
        self._lease = 0
        self._lease_at = 0.0
        #: Sessions planned without etcd (it was unreachable): a metric, a status line.
        self.unshared = 0
        #: Claims won and adopted here (status page, tests).
        self.won = 0
        self.adopted = 0
        #: Called (on the client's thread) with (mac, session) when another replica ended a
        #: boot (hand-over) or its claim expired: the planner ends its copy.
        self.on_ended: Callable[[str, str], None] | None = None
        self._start()

    def _start(self) -> None:
        try:
            _kvs, revision = self.etcd.range_prefix(self.prefix)
            self._renew_lease()
        except Unreachable as exc:
            log.warning("boot sessions: %s; planning locally until it answers", exc)
            revision = 0
        self.etcd.watch(self.prefix, revision, self._on_events)
        self.etcd.submit(self._maintain())

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
            except Unreachable:
                continue

    # -- claims -------------------------------------------------------------------------------
    def _key(self, mac: str) -> str:
        return self.prefix + normalise_mac(mac)

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
            ok, revision, responses = self.etcd.txn(
                [absent(key)], [put_op(key, mine.encode(), self._lease)], [range_op(key)])
        except Unreachable:
            self.unshared += 1
            return None
        if ok:
            won = Claim(**{**asdict(mine), "rev": revision})
            with self._lock:
                self._claims[mac] = won
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
            self._claims[mac] = theirs
        self.adopted += 1
        return theirs

    def agree(self, plan: BootPlan, images: ImageResolver) -> BootPlan:
        """The plan this new boot has cluster-wide: ``plan`` if this replica claimed it
        first (or etcd is away), else the winner's, rebuilt here from the same versions,
        session and token. A replica never plans a version it does not hold: it stays
        silent instead (the client's retry reaches a replica that holds it, or this one
        once the version is copied here)."""
        mine = Claim(session=plan.session, token=plan.token, action=plan.action.value,
                     image=(plan.image.name, plan.image.version) if plan.image else None,
                     disk=(plan.disk.name, plan.disk.version) if plan.disk else None,
                     pinned=bool(plan.image and plan.image.pinned), created=plan.created,
                     replica=self.replica)
        c = self.claim(plan.mac, mine)
        if c is None or c.session == plan.session:
            return plan
        refs = []
        for want in (c.image, c.disk):
            ref = images.resolve(want[0], "", want[1], mac=None) if want else None
            if want and ref is None:
                return dataclasses.replace(
                    plan, action=Action.IGNORE, image=None, disk=None,
                    reason=f"not answered: replica {c.replica} planned this boot on "
                    f"{want[0]} {want[1]}, which this replica does not hold")
            refs.append(ref)
        image, disk = refs
        if image is not None and c.pinned != image.pinned:
            image = dataclasses.replace(image, pinned=c.pinned)
        return dataclasses.replace(
            plan, action=Action(c.action), image=image, disk=disk, session=c.session,
            token=c.token, created=c.created,
            reason=f"{plan.reason}; boot planned by replica {c.replica}: "
            f"{image.name + ' ' + image.version if image else 'no image'}")

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
        """The firmware handed over (or the boot ended) here: delete the claim, so the
        next boot plans afresh on any replica. Background; etcd being away only delays it."""
        with self._lock:
            c = self._claims.get(mac)
            if c is None or c.session != session:
                return
            self._claims.pop(mac, None)
            self._written.pop(mac, None)
        key = self._key(mac)

        def drop() -> None:
            with contextlib.suppress(Unreachable):  # else the lease ends it
                self.etcd.txn([mod_is(key, c.rev)], [delete_op(key)])

        threading.Thread(target=drop, name="etcd-session-end", daemon=True).start()

    def forget(self, mac: str) -> None:
        """An operator changed this node's lifecycle: whatever boot was claimed for it
        ends everywhere, so the next request on any replica plans afresh. Background."""
        with self._lock:
            self._claims.pop(mac, None)
            self._written.pop(mac, None)
        key = self._key(mac)

        def drop() -> None:
            with contextlib.suppress(Unreachable):
                self.etcd.delete(key)

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
                    self._claims[mac] = c
        if self.on_ended is not None:
            for mac, session in ended:
                try:
                    self.on_ended(mac, session)
                except Exception:
                    log.exception("ending session %s of %s", session, mac)

    def health(self) -> dict[str, int]:
        with self._lock:
            known = len(self._claims)
        return {"claims_known": known, "won": self.won, "adopted": self.adopted,
                "planned_without_etcd": self.unshared}


def _value_rev(kv: dict) -> tuple[bytes, int]:
    from .etcd import KV

    parsed = KV.parse(kv)
    return parsed.value, parsed.mod_revision
