"""Build DHCP parts over a whole App, for tests and benchmarks (not a service).

:func:`netbootd.dhcp.proxy.create` is what the daemon uses; this is the same wiring for
a bare :class:`Responder`, so tests exercise exactly what the service runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..views import InventoryNodes
from .responder import Responder

if TYPE_CHECKING:
    from ..app import App
    from .netif import Interfaces


def responder_for(app: App, interfaces: Interfaces, *,
                  available: frozenset[str] | None = None) -> Responder:
    """A :class:`Responder` over ``app``'s planner, inventory, events and metrics."""
    nodes = InventoryNodes(lambda: app.inventory, app.clients, lambda: app.settings)
    return Responder(app.settings, interfaces, plans=app.planner, nodes=nodes,
                     recorder=app.events, metrics=app.metrics, available=available)
