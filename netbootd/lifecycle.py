"""The provisioning lifecycle: what a node's reports and an operator's verbs change.

    install -> installing (progress) -> installed -> local
                    \\-> install-failed (reason; retried at the next boot by default)

A report changes anything only with proof: the token of the node's current boot
(rendered only into that boot's own files) *and* a request from the node's own
address. Anything else is refused (403), counted and recorded as a daemon event, and
changes nothing. Operator verbs (``netbootd nodes reinstall|local|netboot``, the
API) need the API token, checked by the caller.

State lives behind :class:`nodestate.NodeState`; sessions behind the planner. This
module is the only writer of lifecycle records besides the CLI's operator verbs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar

from .errors import Conflict, Invalid, NotFound
from .interfaces import Plans, Recorder
from .model import Action, BootPlan, NodeView
from .nodestate import NodeRecord, NodeState, Stage

log = logging.getLogger("netbootd.lifecycle")

#: Phases a node reports that change its session or lifecycle: they need proof.
GUARDED = frozenset({"installing", "installed", "booted", "failed"})


class Verdict(StrEnum):
    OK = "ok"
    FORBIDDEN = "forbidden"
    IGNORED = "ignored"  #: valid, but nothing to change (e.g. progress after installed)


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    message: str
    record: NodeRecord | None = None


class Lifecycle:
    """Applies node reports and operator verbs to the lifecycle records."""

    def __init__(self, state: NodeState, plans: Plans, events: Recorder, *,
                 node: Callable[[str], NodeView], owns: Callable[[str, str], bool],
                 refused: Callable[[], None] = lambda: None) -> None:
        self.state = state
        self.plans = plans
        self.events = events
        self._node = node
        self._owns = owns
        self._refused = refused

    # -- reports from nodes ----------------------------------------------------------------
    def report(self, mac: str, phase: str, *, token: str, ip: str, progress: int | None = None,
               reason: str = "", message: str = "") -> Outcome:
        """A node says where it is. Guarded phases need the boot's token and address."""
        plan = self.plans.current(mac)
        if phase in GUARDED and not self._proven(plan, mac, token, ip):
            self._refused()
            self.events.record("api", None, f"{phase} for {mac} refused: no proof",
                               node=mac, client=ip, outcome="error")
            log.warning("lifecycle %s for %s from %s refused: wrong token or address",
                        phase, mac, ip)
            return Outcome(Verdict.FORBIDDEN, "the boot's token and the node's own address "
                           "are required")
        if plan is None and not self._node(mac).known:
            # Informational phases too: a machine in no boot and not in the inventory
            # must not grow the node table (a flood of random MACs).
            self._refused()
            return Outcome(Verdict.FORBIDDEN, f"{mac} is in no boot and not in the inventory")
        fields: dict[str, Any] = {"ip": ip, "outcome": "ok"}
        if plan is not None and plan.image is not None:
            fields.update(image=plan.image.name, version=plan.image.version)
        if phase == "installing":
            return self._installing(mac, plan, progress, fields)
        if phase == "installed":
            return self._installed(mac, plan, message, fields)
        if phase == "failed":
            return self._failed(mac, plan, reason or message, fields)
        self.events.record(phase, mac, message, **fields)
        if phase == "booted":
            # The boot finished: the next boot of this machine plans afresh (hot swap).
            self.plans.end(mac)
        return Outcome(Verdict.OK, f"{phase} recorded for {mac}")

    def owns(self, mac: str, ip: str) -> bool:
        """Is ``ip`` this node's address (the evidence check secrets use too)?"""
        return self._owns(mac, ip)

    def _proven(self, plan: BootPlan | None, mac: str, token: str, ip: str) -> bool:
        return bool(plan is not None and plan.token and token
                    and hmac.compare_digest(plan.token, token) and self._owns(mac, ip))

    def _installing(self, mac: str, plan: BootPlan | None, progress: int | None,
                    fields: dict[str, Any]) -> Outcome:
        if plan is None or plan.action is not Action.INSTALL or plan.disk is None:
            return Outcome(Verdict.IGNORED, f"{mac} is not installing")
        pct = None if progress is None else max(0, min(100, int(progress)))
        current = self.state.get(mac)
        if current is not None and current.stage is Stage.INSTALLING and \
                current.version == plan.disk.version and current.progress == pct:
            return Outcome(Verdict.OK, "no change", current)
        rec = self._write(mac, Stage.INSTALLING, plan, progress=pct)
        self.events.record("installing", mac, f"installing {plan.disk.name} "
                           f"{plan.disk.version}: {pct if pct is not None else '?'} %",
                           progress=pct, disk=plan.disk.name, disk_version=plan.disk.version,
                           **fields)
        return Outcome(Verdict.OK, "progress recorded", rec)

    def _installed(self, mac: str, plan: BootPlan | None, message: str,
                   fields: dict[str, Any]) -> Outcome:
        if plan is None or plan.action is not Action.INSTALL or plan.disk is None:
            return Outcome(Verdict.IGNORED, f"{mac} was not installing")
        rec = self._write(mac, Stage.INSTALLED, plan, progress=100)
        self.events.record("installed", mac, message or f"installed {plan.disk.name} "
                           f"{plan.disk.version}", disk=plan.disk.name,
                           disk_version=plan.disk.version, **fields)
        # The installer reboots into the disk: nothing of its boot is needed any more, and
        # the installed OS's cloud-init must see the node as installed, not the installer.
        self.plans.forget(mac)
        return Outcome(Verdict.OK, f"{mac} installed {plan.disk.name} {plan.disk.version}",
                       rec)

    def _failed(self, mac: str, plan: BootPlan | None, reason: str,
                fields: dict[str, Any]) -> Outcome:
        reason = (reason or "no reason given")[:500]
        rec = None
        if plan is not None and plan.action is Action.INSTALL and plan.disk is not None:
            rec = self._write(mac, Stage.FAILED, plan, reason=reason)
        self.events.record("failed", mac, reason, **fields)
        self.plans.forget(mac)
        return Outcome(Verdict.OK, f"failure recorded for {mac}", rec)

    def _write(self, mac: str, stage: Stage, plan: BootPlan, *, progress: int | None = None,
               reason: str = "") -> NodeRecord:
        """Compare-and-set against the record we read, retried once on a race."""
        disk = plan.disk
        desired = plan.node.desired.value if plan.node.desired is not None else None
        for _ in range(3):
            current = self.state.get(mac)
            since = current.since if current is not None and current.stage is stage else 0.0
            record = NodeRecord(mac=mac, stage=stage, image=disk.name if disk else None,
                                version=disk.version if disk else None, progress=progress,
                                reason=reason, since=since, by="node", desired=desired)
            try:
                written = self.state.compare_and_set(
                    mac, current.rev if current else None, record)
            except Conflict:
                continue
            assert written is not None
            return written
        raise Conflict(f"node {mac}: lifecycle record keeps changing")

    def seen_on_disk(self, mac: str) -> None:
        """The installed OS asked for its identity: ``installed`` becomes ``local``."""
        current = self.state.get(mac)
        if current is None or current.stage is not Stage.INSTALLED:
            return
        try:
            self.state.compare_and_set(mac, current.rev, replace(current, stage=Stage.LOCAL,
                                                                 since=0.0))
        except Conflict:
            return
        self.events.record("local", mac, f"booted from disk ({current.image} "
                           f"{current.version})", outcome="ok", image=current.image,
                           version=current.version)

    # -- operator verbs --------------------------------------------------------------------
    VERBS: ClassVar[dict[str, Stage]] = {"reinstall": Stage.INSTALL, "local": Stage.LOCAL,
                                         "netboot": Stage.NETBOOT}

    def operator(self, mac: str, verb: str, *, by: str) -> NodeRecord:
        """``reinstall`` | ``local`` | ``netboot`` for an inventory node."""
        stage = self.VERBS.get(verb)
        if stage is None:
            raise Invalid(f"unknown action {verb!r} (reinstall, local, netboot)")
        view = self._node(mac)
        if not view.known:
            raise NotFound(f"no node {mac} in the inventory")
        desired = view.desired.value if view.desired is not None else None
        current = self.state.get(mac)
        record = NodeRecord(mac=mac, stage=stage, by=by, desired=desired,
                            image=current.image if current else None,
                            version=current.version if current else None)
        written = self.state.put(record)
        self.plans.forget(mac)  # the next boot plans from the new state at once
        self.events.record("api", mac, f"operator: {verb} ({by})", outcome="ok")
        return written
