"""When an operator's activation may go ahead: the activation quorum.

A replica never plans a version it lacks, so activating a version only some replicas
hold makes the others silent for the machines on that channel until their copy lands.
``cluster.activation_quorum`` says how much of that an operator accepts: ``all`` (every
live replica must hold the version) or N (at least N live replicas hold it, counting
this one). The decision is a pure function of the presence records, so it is the same
on every replica and testable without etcd.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def refusal(image: str, version: str, replicas: Mapping[str, Mapping[str, Any]],
            me: str, quorum: int | str) -> str | None:
    """Why activating ``image version`` is refused now, or None when it may go ahead.

    ``replicas`` is the live replicas' presence (name -> record with ``versions``);
    ``me`` is this replica, which holds the version (the store checked that first)
    whether or not its own record lists it yet."""
    key = f"{image} {version}"
    live = set(replicas) | {me}
    holders = {n for n, d in replicas.items() if key in (d.get("versions") or [])} | {me}
    lacking = sorted(live - holders)
    needed = len(live) if quorum == "all" else int(quorum)
    if len(holders) >= needed:
        return None
    where = "every live replica" if quorum == "all" else f"{needed} live replicas"
    return (f"{image} {version} is not on {where} yet: {_names(lacking)} lack it (being "
            f"copied); {len(holders)} of {len(live)} live replicas hold it, "
            f"{needed} needed (cluster.activation_quorum: {quorum}); activate again when "
            "the status page lists it on enough replicas")


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "no other replica"
