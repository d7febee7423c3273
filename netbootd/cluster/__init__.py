"""Several replicas on one LAN sharing boot sessions and node state through etcd.

``cluster.backend: local`` (the default) is one daemon with its state on its own disk;
nothing here runs. With ``etcd``, :func:`open_cluster` connects the one etcd client a
daemon uses and builds the shared pieces the daemon hands to the planner and the
lifecycle in place of the local ones (``nodestate.py``'s interface, the planner's
session claims), so no protocol service knows which backend is in force.
docs/replicas.md is the user's side of this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..nodestate import LocalNodeState, NodeState
from ..settings import BootSettings, Settings

log = logging.getLogger("netbootd.cluster")


@dataclass
class Cluster:
    """What a replica shares through etcd; ``etcd`` is its one client."""

    name: str
    etcd: Any  #: cluster.etcd.Etcd
    prefix: str
    node_state: Any  #: cluster.nodestate.EtcdNodeState
    sessions: Any = None  #: cluster.sessions.SharedSessions (set by the daemon)
    #: cluster.leader.Leadership (set by the cluster service): jobs that run once per
    #: cluster ask it whether this replica leads.
    leadership: Any = None
    #: cluster.retire.SharedGc (set by the cluster service): the store's GC decision.
    gc: Any = None
    #: cluster.events.SharedEvents (set by the daemon): node events every replica sees.
    events: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def share_sessions(self, planner: Any, boot: Callable[[], BootSettings]) -> None:
        """Make ``planner``'s new boots claimed in etcd (first replica wins), end its
        copies of boots that ended on other replicas, and let it answer booted OSes with
        the plans other replicas handed over. ``boot`` reads the settings in force."""
        from .sessions import SharedSessions

        self.sessions = SharedSessions(
            self.etcd, self.prefix, self.name, lambda: boot().session_ttl,
            os_plan_ttl=lambda: boot().os_plan_ttl, max_booted=lambda: boot().max_sessions)
        self.sessions.on_ended = planner.ended_elsewhere
        self.sessions.on_booted_gone = planner.booted_gone
        planner.shared = self.sessions

    def share_events(self, log: Any, settings: Settings) -> Any:
        """Write the node events ``log`` records to etcd and merge the other replicas'
        into its timelines (cluster/events.py); returns the SharedEvents."""
        from .events import SharedEvents

        c = settings.cluster
        self.events = SharedEvents(self.etcd, self.prefix, self.name, ring=c.event_ring,
                                   ttl=c.event_ttl, queue=c.event_queue,
                                   max_nodes=settings.events.max_nodes)
        self.events.attach(log)
        return self.events

    def store_state(self) -> Any:
        """What the image store takes to keep channel pointers, pins and the activation
        history in etcd (``ImageStore(shared=...)``)."""
        if "store" not in self.extra:
            from .pointers import SharedStoreState

            self.extra["store"] = SharedStoreState(self.etcd, self.prefix, self.name)
        return self.extra["store"]

    def health(self) -> dict[str, Any]:
        """For /readyz and the status page: is etcd reachable from this replica?"""
        e = self.etcd
        out: dict[str, Any] = {"ok": bool(e.reachable), "backend": "etcd",
                               "replica": self.name, "endpoints": e.endpoints}
        if self.sessions is not None:
            out["sessions"] = self.sessions.health()
        if self.events is not None:
            out["events"] = self.events.health()
        if not e.reachable:
            out["error"] = ("etcd unreachable: open boots and known nodes are served from "
                            f"memory, activations are refused ({e.last_error})")
        return out

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        self.etcd.close()


def open_cluster(settings: Settings) -> Cluster | None:
    """The etcd side of this daemon, or None on ``cluster.backend: local``."""
    c = settings.cluster
    if c.backend != "etcd":
        return None
    from .etcd import Etcd
    from .nodestate import EtcdNodeState

    e = c.etcd
    client = Etcd(e.endpoints, timeout=e.timeout, ca_file=e.ca_file, cert_file=e.cert_file,
                  key_file=e.key_file)
    state = EtcdNodeState(client, e.key_prefix, max_nodes=settings.provision.max_nodes)
    return Cluster(name=c.replica, etcd=client, prefix=e.key_prefix, node_state=state)


def store_sharing(settings: Settings) -> Any:
    """For a CLI ``ImageStore``: the etcd channels and pins when shared, else None."""
    cluster = open_cluster(settings)
    return cluster.store_state() if cluster is not None else None


def open_node_state(settings: Settings, *, create: bool = True) -> NodeState:
    """The lifecycle records for a CLI command: etcd's when shared, else the local files."""
    cluster = open_cluster(settings)
    if cluster is not None:
        return cluster.node_state
    return LocalNodeState(settings.lifecycle_dir, max_nodes=settings.provision.max_nodes,
                          create=create)
