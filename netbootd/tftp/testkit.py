"""Scaffolding for TFTP tests and the benchmark: a small real App around one image.

Only the *policy* is simplified (:class:`FixedImages` always resolves to one
image directory, the honest fake of the store); the protocol side is the real
service, built by the daemon's own factory (``server.create``) on real sockets and
talked to by real clients. This module builds an App (it stands in for the daemon),
so it is the one module under ``tftp/`` the fence test lets do that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ..app import App
from ..events import EventLog
from ..inventory import Inventory, load_inventory
from ..metrics import Metrics
from ..model import ImageRef
from ..neighbours import ClientAddresses
from ..planner import Planner
from ..render import Renderer
from ..settings import load_settings
from .server import TftpService, create
from .vfs import VirtualTree

CMDLINE_TEMPLATE = "console=serial0 root=/dev/nfs nfsroot={{ nfs.root_spec }} " \
                   "netbootd.mac={{ node.mac }} server={{ server.ip }} version={{ version }}\n"
CONFIG_TEMPLATE = "# netbootd: {{ node.hostname }} {{ version }}\n"


class FixedImages:
    """An image resolver whose store holds exactly one version of one image. Its
    artefacts (the manifest's file list, which ``Artefacts.open`` serves from) are the
    regular files under ``root`` when a plan is made, so a test may add files."""

    def __init__(self, root: Path, *, name: str = "demo", version: str = "1",
                 boot_tree: str = "boot") -> None:
        self.root = root
        self.ref = ImageRef(name=name, version=version, root=root, kind="pi-boot+rootfs",
                            channel="prod",
                            boot={"boot_tree": boot_tree, "rootfs": "rootfs"})

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        return dataclasses.replace(self.ref, artefacts=listing(self.root))


def listing(root: Path) -> tuple[str, ...]:
    """Every file under ``root`` (symlinked directories not followed), relative."""
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return tuple(sorted(out))


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_templates(directory: Path) -> Path:
    (directory / "rpi").mkdir(parents=True, exist_ok=True)
    (directory / "rpi" / "cmdline.txt.j2").write_text(CMDLINE_TEMPLATE)
    (directory / "rpi" / "config.txt.j2").write_text(CONFIG_TEMPLATE)
    return directory


def make_app(work: Path, image_root: Path, *, tftp: dict[str, Any] | None = None,
             nodes_yaml: str | None = None, policy: str = "default",
             images: Any = None, boot: dict[str, Any] | None = None,
             clock: Callable[[], float] | None = None) -> App:
    """An App with ``image_root`` as the only image and settings for 127.0.0.1:<free port>.

    ``nodes_yaml`` (inventory text) is optional; without it the default profile
    boots every machine (``policy.unknown = default``). ``images`` replaces the one
    image (any ``ImageResolver``), ``boot`` overrides ``settings.boot`` and ``clock``
    is the planner's clock (session expiry without waiting).
    """
    work.mkdir(parents=True, exist_ok=True)
    templates = write_templates(work / "templates")
    overrides: dict[str, Any] = {
        "tftp": {"bind": "127.0.0.1", "port": free_udp_port(), **(tftp or {})},
        "paths": {"templates": str(templates), "state": str(work / "state"),
                  "images": str(work / "images")},
        "policy": {"unknown": policy},
        **({"boot": boot} if boot else {}),
    }
    settings = load_settings(None, overrides, use_default_path=False)
    if nodes_yaml is not None:
        inv_path = work / "nodes.yaml"
        inv_path.write_text(textwrap.dedent(nodes_yaml))
        inventory = load_inventory(inv_path)
    else:
        inventory = Inventory.empty()
    app_box: dict[str, App] = {}
    planner = Planner(lambda: app_box["app"].settings, lambda: app_box["app"].inventory,
                      images or FixedImages(image_root),
                      **({"clock": clock} if clock is not None else {}))
    app = App(settings=settings, inventory=inventory, planner=planner,
              render=Renderer(settings), events=EventLog(None), metrics=Metrics(),
              clients=ClientAddresses(use_kernel=False))
    app_box["app"] = app
    return app


def virtual_tree(app: App) -> VirtualTree:
    """The tree ``create(app)`` would build, for tests of name resolution alone."""
    from ..views import InventoryNodes, StoreArtefacts

    return VirtualTree(app.settings, plans=app.planner,
                       artefacts=StoreArtefacts(lambda: app.store, lambda: app.render),
                       nodes=InventoryNodes(lambda: app.inventory, app.clients,
                                            lambda: app.settings),
                       addresses=app.clients)


@asynccontextmanager
async def running(app: App, *, engine: str | None = None) -> AsyncIterator[TftpService]:
    """The TFTP service started on the app's settings; always stopped afterwards.
    ``engine``: ``workers`` (worker processes, the default) or ``inprocess``
    (``tftp.workers: 0``: the pump threads run in this process)."""
    if engine not in (None, "workers", "inprocess"):
        raise ValueError(f"unknown engine {engine!r}")
    if engine is not None:
        t = app.settings.tftp
        workers = 0 if engine == "inprocess" else (t.workers or None)
        app.settings = app.settings.model_copy(
            update={"tftp": t.model_copy(update={"workers": workers})})
    svc = create(app)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait until ``cond()`` holds (the engine runs on its own thread); fail after
    ``timeout`` seconds. Tests use it instead of a fixed sleep that a loaded CI box
    could outrun."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
