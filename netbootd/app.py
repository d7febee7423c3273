"""The application context every service receives, and the service registry.

No global state: one ``App`` per daemon (tests run several in one process).
Services never receive the App: each service's ``create(app)`` factory builds it
from the narrow views in ``interfaces.py`` (planner, node view, artefacts,
addresses, events, metrics), so a service cannot reach past the plan.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .events import EventLog
from .inventory import Inventory
from .inventorycache import InventoryLoader
from .metrics import Metrics
from .neighbours import ClientAddresses
from .planner import Planner
from .settings import Settings

if TYPE_CHECKING:
    from .render import Renderer

log = logging.getLogger("netbootd.app")


class Service(Protocol):
    """A long-running part of the daemon (DHCP, TFTP, HTTP, store, NFS, DNS)."""

    name: str

    async def start(self) -> None:
        """Bind sockets / start tasks. Raise to report that the service cannot run."""

    async def stop(self) -> None:
        """Stop quickly (the daemon must stop within 2 s of SIGTERM)."""

    def health(self) -> dict[str, Any]:
        """A small dict for /readyz and the status page, e.g. {"ok": True, "bound": [...]}."""

    # Optional: ``warm_up(self) -> None``, work a service wants done soon after it starts
    # but that nothing before the daemon answers needs (imports for a slow path). The
    # daemon runs it in a thread once every service started.


@dataclass
class App:
    """Everything shared by the services of one daemon."""

    settings: Settings
    inventory: Inventory
    planner: Planner
    render: Renderer
    events: EventLog
    metrics: Metrics
    clients: ClientAddresses
    store: Any = None  #: netbootd.store.store.ImageStore once the store service is up
    #: The provisioning lifecycle records (nodestate.NodeState); set by build_app.
    node_state: Any = None
    #: cluster.Cluster with ``cluster.backend: etcd`` (shared state), else None.
    cluster: Any = None
    services: dict[str, Service] = field(default_factory=dict)
    config_error: str | None = None  #: last rejected reload, shown on the status page
    #: Why the config in force is not yet fully checked (``netbootd serve`` renders every
    #: node's templates once its services answer), or None; /readyz waits for it.
    config_pending: str | None = None
    #: Called after a successful reload (services that cache config-derived state).
    on_reload: list[Callable[[], None]] = field(default_factory=list)
    #: Loads nodes.yaml for reloads, reusing the entries whose text did not change.
    inventory_loader: InventoryLoader = field(default_factory=InventoryLoader)
    #: Reload config now (API, SIGHUP); returns None or the error text (old config kept).
    reload: Callable[[], str | None] = lambda: None


class AppStatus:
    """The daemon-wide facts services may show (``http.context.DaemonStatus``)."""

    def __init__(self, app: App) -> None:
        self._app = app

    def health(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, svc in list(self._app.services.items()):
            try:
                out[name] = dict(svc.health())
            except Exception as exc:  # noqa: BLE001 - a broken health() is itself a reason
                out[name] = {"ok": False, "error": f"health() failed: {exc}"}
        return out

    def config_error(self) -> str | None:
        return self._app.config_error

    def inventory_loaded(self) -> bool:
        inv = self._app.inventory
        return inv.source is not None or bool(inv.nodes)

    def config_pending(self) -> str | None:
        return self._app.config_pending

    def reload(self) -> str | None:
        return self._app.reload()


#: Service name -> "module:factory". A factory takes the App and returns a Service.
#: A module that is missing (a service not built yet) is skipped with a warning, so
#: the core runs on its own and each service plugs in by adding its line here.
SERVICE_FACTORIES: dict[str, str] = {
    "cluster": "netbootd.cluster.service:create",
    "store": "netbootd.store.service:create",
    "nfs": "netbootd.nfs.service:create",
    "dhcp": "netbootd.dhcp.proxy:create",
    "tftp": "netbootd.tftp.server:create",
    "http": "netbootd.http.app:create",
    "dns": "netbootd.dns.server:create",
}


def enabled_services(settings: Settings) -> list[str]:
    on = {
        "cluster": settings.cluster.backend == "etcd",
        "store": True,
        "nfs": True,  # with backend "none" it still computes and shows the export set
        "dhcp": settings.dhcp.enabled,
        "tftp": settings.tftp.enabled,
        "http": settings.http.enabled,
        "dns": settings.dns.enabled,
    }
    return [name for name in SERVICE_FACTORIES if on.get(name)]


def preload_services(settings: Settings) -> None:
    """Import the modules of the services these settings enable (what ``load_factory``
    would import as each starts), so they can load while something else runs beside."""
    for name in enabled_services(settings):
        # a module that fails here fails again as its service starts, reported there
        with contextlib.suppress(Exception):
            importlib.import_module(SERVICE_FACTORIES[name].partition(":")[0])


def load_factory(name: str) -> Callable[[App], Service] | None:
    target = SERVICE_FACTORIES[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            log.warning("service %s not available (%s); skipping", name, module_name)
            return None
        raise
    return getattr(module, attr)
