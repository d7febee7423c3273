"""The daemon's implementations of the narrow service views in ``interfaces.py``.

Each adapter reads the live object through a getter, so a config reload (a new
``Inventory``, a new ``Renderer``) or the store coming up later is seen on the next
call without re-wiring services. Services receive these, never the ``App``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .interfaces import Addresses, Renderer
from .inventory import Inventory
from .model import ClientFacts, ClientKind, ImageRef, NodeView, normalise_mac
from .neighbours import kernel_neighbour
from .settings import Settings


class InventoryNodes:
    """:class:`interfaces.Nodes` over the inventory in force and the address evidence."""

    def __init__(self, inventory: Callable[[], Inventory], addresses: Addresses,
                 settings: Callable[[], Settings]) -> None:
        self._inventory = inventory
        self._addresses = addresses
        self._settings = settings

    def view(self, facts: ClientFacts) -> NodeView:
        return self._inventory().view(facts)

    def known(self, mac: str) -> bool:
        return mac in self._inventory().nodes

    def find(self, *, uuid: str | None = None, hostname: str | None = None,
             ip: str | None = None) -> str | None:
        return self._inventory().find(uuid=uuid, hostname=hostname, ip=ip)

    def macs(self) -> list[str]:
        return list(self._inventory().nodes)

    def loaded(self) -> bool:
        inv = self._inventory()
        return inv.source is not None or bool(inv.nodes)

    def mac_for_serial(self, serial: str) -> str | None:
        return self._inventory().mac_for_serial(serial)

    def says_pi(self, mac: str, serial: str | None) -> bool:
        """The inventory knows this MAC (or serial) as a Pi: the node has a serial, a
        ``kind``/``board`` label starting with ``rpi``, or a profile selecting kind rpi."""
        inv = self._inventory()
        found = inv.node_for(ClientFacts(mac=mac, serial=serial))
        if not found:
            return False
        node = found[1]
        if node.serial:
            return True
        if any(str(node.labels.get(k, "")).lower().startswith("rpi")
               for k in ("kind", "board")):
            return True
        prof = inv.profiles.get(node.profile) if node.profile else None
        return bool(prof and prof.selectors.kind == ClientKind.RPI.value)

    def hosts(self) -> Iterable[tuple[str, str, str | None]]:
        for mac, node in self._inventory().nodes.items():
            if node.hostname:
                yield node.hostname, mac, node.ip or self._addresses.ip_for(mac)

    def members(self) -> Iterable[tuple[str, str, str | None]]:
        """(hostname, mac, static ip) of every inventory node; a node without a hostname
        is named as its NodeView names it (``node-`` + the MAC's last six digits)."""
        for mac, node in self._inventory().nodes.items():
            yield node.hostname or "node-" + mac.replace(":", "")[6:], mac, node.ip

    def static_ip(self, mac: str) -> str | None:
        node = self._inventory().nodes.get(mac)
        return node.ip if node is not None else None

    def owns(self, mac: str, ip: str) -> bool:
        """Is the peer at ``ip`` node ``mac``? Static ``ip`` from nodes.yaml (refused only
        when the kernel neighbour table names another MAC for it: someone else holds the
        address on our link), else the address evidence (:meth:`Addresses.owner_of`)."""
        if not ip or not mac:
            return False
        mac = normalise_mac(mac)
        static = self.static_ip(mac)
        if static is not None and static == ip:
            on_link = kernel_neighbour(ip)
            return on_link is None or on_link == mac
        return self._addresses.owner_of(ip) == mac

    def facts_for(self, mac: str, ip: str | None = None) -> ClientFacts:
        node = self._inventory().nodes.get(mac)
        ouis = {o.lower() for o in self._settings().rpi.ouis}
        if (node is not None and node.serial) or mac[:8] in ouis:
            return ClientFacts(mac=mac, kind=ClientKind.RPI, ip=ip,
                               serial=node.serial if node else None)
        return ClientFacts(mac=mac, kind=ClientKind.IPXE, ip=ip)

    def generation(self) -> object:
        return self._inventory()


class StoreArtefacts:
    """:class:`interfaces.Artefacts` over the image store and the renderer in force."""

    def __init__(self, store: Callable[[], Any], renderer: Callable[[], Renderer]) -> None:
        self._store = store
        self._renderer = renderer

    def ref(self, image: str, version: str) -> ImageRef | None:
        ref = getattr(self._store(), "ref", None)
        return ref(image, version) if ref is not None else None

    def open(self, image: ImageRef, path: str) -> Path | None:
        """A manifest artefact of this version that resolves inside the version."""
        if path not in _artefact_set(image):
            return None
        try:
            root = image.root.resolve(strict=True)
            real = (image.root / path).resolve(strict=True)
        except OSError:
            return None
        return real if real.is_relative_to(root) and real.is_file() else None

    def renderer(self) -> Renderer:
        return self._renderer()


class StoreVersions:
    """:class:`interfaces.Versions` over the image store (which may come up later)."""

    def __init__(self, store: Callable[[], Any]) -> None:
        self._store = store

    def refs(self) -> list[ImageRef]:
        store = self._store()
        return list(store.all_refs()) if store is not None else []

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        store = self._store()
        if store is None:
            return _nothing
        store.on_change.append(callback)

        def unsubscribe() -> None:
            if callback in store.on_change:
                store.on_change.remove(callback)
        return unsubscribe


def hooks(registry: list[Callable[[], None]]) -> Callable[[Callable[[], None]],
                                                          Callable[[], None]]:
    """:data:`interfaces.Subscribe` over a list of callbacks (``App.on_reload``)."""
    def subscribe(callback: Callable[[], None]) -> Callable[[], None]:
        registry.append(callback)

        def unsubscribe() -> None:
            if callback in registry:
                registry.remove(callback)
        return unsubscribe
    return subscribe


def _nothing() -> None:
    return None


#: (image, version) -> (the ref's artefact tuple, the same as a set). The tuple is kept
#: and compared by identity, so a version re-created under the same name is re-read.
_SETS: dict[tuple[str, str], tuple[tuple[str, ...], frozenset[str]]] = {}


def _artefact_set(image: ImageRef) -> frozenset[str]:
    """``ImageRef.artefacts`` as a set, built once per stored version (a rootfs lists
    tens of thousands of paths, and /files asks per request)."""
    key = (image.name, image.version)
    hit = _SETS.get(key)
    if hit is None or hit[0] is not image.artefacts:
        if len(_SETS) > 256:
            _SETS.clear()
        hit = _SETS[key] = (image.artefacts, frozenset(image.artefacts))
    return hit[1]
