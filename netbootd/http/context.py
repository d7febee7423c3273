"""What the HTTP handlers may see: narrow views of the daemon, built once by ``create``.

The handlers never receive the daemon's ``App``, the inventory or the store module:
``create(app)`` in ``http/app.py`` is the one place that reads the App and builds
this context from it. A reload swaps settings, inventory and renderer inside the
daemon; the getters here see the new ones on the next request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..events import EventLog
from ..interfaces import Addresses, Artefacts, Nodes, Plans, Renderer, Subscribe, Versions
from ..lifecycle import Lifecycle
from ..metrics import Metrics
from ..nodestate import NodeState
from ..rpi.bootimg import BootImages
from ..settings import Settings


class DaemonStatus(Protocol):
    """The daemon-wide facts the API, /readyz and the status page show."""

    def health(self) -> dict[str, dict[str, Any]]:
        """Service name -> its health dict."""
        ...

    def config_error(self) -> str | None:
        """The last rejected reload (the old config stays in force), or None."""
        ...

    def inventory_loaded(self) -> bool:
        ...

    def config_pending(self) -> str | None:
        """Why the config in force is not fully checked yet (start-up), or None."""
        ...

    def reload(self) -> str | None:
        """Reload config now; None or the error text (the old config is kept)."""
        ...


@dataclass(frozen=True)
class HttpContext:
    """The narrow views every HTTP handler gets (``context(request)``)."""

    settings_of: Callable[[], Settings]
    plans: Plans
    nodes: Nodes
    artefacts: Artefacts
    addresses: Addresses
    events: EventLog
    metrics: Metrics
    catalogue_of: Callable[[], Any]  #: the image store (interfaces.Catalogue) or None
    daemon: DaemonStatus
    lifecycle: Lifecycle
    node_state: NodeState
    #: Raspberry Pi HTTP boot: the boot.img cache (netbootd.rpi.bootimg.BootImages).
    boot_images: BootImages | None = None
    #: The stored versions (store changes trigger building boot.img ahead of time).
    versions: Versions | None = None
    #: Register a callback for config reloads (interfaces.Subscribe).
    on_reload: Subscribe | None = None
    #: One GC pass as the daemon's own runs it (with replicas: the leader's shared
    #: decision), or None when the store service is not running (then the API asks the
    #: store directly, by this daemon's rules alone).
    gc_pass: Callable[[bool], Awaitable[list[tuple[str, str]]] | None] | None = None

    @property
    def settings(self) -> Settings:
        return self.settings_of()

    @property
    def renderer(self) -> Renderer:
        return self.artefacts.renderer()

    @property
    def catalogue(self) -> Any:
        return self.catalogue_of()
