"""The daemon's real implementations of the narrow views in :mod:`netbootd.interfaces`.

Only ``create(app)`` factories (and the daemon) build these: a service gets the view,
never the App, the inventory or the store behind it. Each view takes *getters*, so a
config reload or the store coming up later is seen on the next call without anyone
re-wiring a service.

Minimal version written with the TFTP service (it needs ``Nodes.mac_for_serial`` and
``Artefacts``); the core's own version supersedes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .inventory import Inventory
from .model import ClientFacts, ClientKind, ImageRef, NodeView
from .render import Renderer
from .settings import Settings


class InventoryNodes:
    """:class:`netbootd.interfaces.Nodes` over the inventory in force."""

    def __init__(self, inventory: Callable[[], Inventory], addresses: Any,
                 settings: Callable[[], Settings]) -> None:
        self._inventory = inventory
        self._addresses = addresses
        self._settings = settings

    def view(self, facts: ClientFacts) -> NodeView:
        return self._inventory().view(facts)

    def known(self, mac: str) -> bool:
        return mac in self._inventory().nodes

    def mac_for_serial(self, serial: str) -> str | None:
        return self._inventory().mac_for_serial(serial)

    def says_pi(self, mac: str, serial: str | None) -> bool:
        inv = self._inventory()
        node = inv.nodes.get(mac)
        return bool((node is not None and node.serial)
                    or (serial and inv.mac_for_serial(serial)))

    def hosts(self) -> Iterable[tuple[str, str, str | None]]:
        for mac, node in self._inventory().nodes.items():
            ip = getattr(node, "ip", None)
            yield (node.hostname or mac, mac,
                   str(ip) if ip else self._addresses.ip_for(mac))

    def facts_for(self, mac: str, ip: str | None = None) -> ClientFacts:
        node = self._inventory().nodes.get(mac)
        serial = node.serial if node is not None else None
        kind = ClientKind.RPI if serial else ClientKind.IPXE
        return ClientFacts(mac=mac, kind=kind, serial=serial, ip=ip)

    def generation(self) -> object:
        return self._inventory()


class StoreArtefacts:
    """:class:`netbootd.interfaces.Artefacts` over the image store and the renderer in
    force. Works before the store is up (every lookup then answers None)."""

    def __init__(self, store: Callable[[], Any], renderer: Callable[[], Renderer]) -> None:
        self._store = store
        self._renderer = renderer

    def open(self, image: ImageRef, path: str) -> Path | None:
        return contained_file(image.root, path)

    def ref(self, image: str, version: str) -> ImageRef | None:
        store = self._store()
        return None if store is None else store.ref(image, version)

    def renderer(self) -> Renderer:
        return self._renderer()


def contained_file(root: Path, path: str) -> Path | None:
    """``root/path`` resolved (symlinks followed), if it is a regular file inside
    ``root``; else None."""
    try:
        base = root.resolve()
        target = (base / path).resolve()
        target.relative_to(base)
    except (ValueError, OSError, RuntimeError):
        return None
    return target if target.is_file() else None
