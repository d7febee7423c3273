"""Test support for the HTTP service: a small fleet, a store on disk, a running server.

Used by tests/*/test_http_*.py and bench/http_bench.py. Everything lives under a
temporary directory; the server runs on 127.0.0.1:<free port> in its own thread
and event loop, so tests can be plain functions that call curl with ``subprocess``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from ..app import App
from ..model import DiskImage, ImageRef
from ..settings import load_settings

REPO = Path(__file__).resolve().parents[2]

NODE_A = "52:54:00:00:00:0a"  # netboot, k3s join (secret k3s_token)
NODE_B = "52:54:00:00:00:0b"  # install, kubeadm join (secret kubeadm_token)
NODE_C = "52:54:00:00:00:0c"  # local
UNKNOWN = "52:54:00:00:00:ff"
SECRET_A = "k3s-secret-for-tests-AAAA"
SECRET_B = "kubeadm-secret-for-tests-BBBB"
TOKEN = "api-token-for-tests-0123456789"

NODES_YAML = f"""
profiles:
  default:
    image: demo
    channel: prod
nodes:
  {NODE_A}:
    hostname: node-a
    role: worker
    vars:
      join: k3s
      k3s_server: https://10.0.0.10:6443
  {NODE_B}:
    hostname: node-b
    action: install
    install: {{image: gold}}
    vars:
      join: kubeadm
      kubeadm_endpoint: 10.0.0.10:6443
      kubeadm_ca_hash: sha256:{'0' * 64}
  {NODE_C}:
    hostname: node-c
    action: local
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_version(images: Path, name: str, version: str, files: dict[str, bytes],
                  boot: dict[str, str] | None = None, kind: str = "kernel+initrd",
                  extra: dict[str, bytes] | None = None,
                  disk: dict[str, Any] | None = None) -> Path:
    """Lay out ``store/<name>/<version>/`` with a manifest listing ``files``.

    ``extra`` files are written but *not* listed in the manifest (must never be served).
    """
    root = images / "store" / name / version
    root.mkdir(parents=True, exist_ok=True)
    arts = []
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        arts.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    for rel, data in (extra or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    manifest = {"image": name, "version": version, "created": "2026-11-23T13:00:00Z",
                "kind": kind, "boards": ["x86_64"],
                "boot": boot or {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                                 "cmdline": "console=ttyS0", "disk": "disk.img"},
                "artefacts": arts}
    if disk is not None:
        manifest["disk"] = disk
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_disk_version(images: Path, name: str, version: str, payload: bytes) -> Path:
    """A disk image version (kind disk, uncompressed) with its ``disk`` section."""
    digest = hashlib.sha256(payload).hexdigest()
    return write_version(images, name, version, {"disk.img": payload}, kind="disk", boot={},
                         disk={"path": "disk.img", "compression": "none",
                               "size": len(payload), "sha256": digest,
                               "uncompressed_size": len(payload),
                               "uncompressed_sha256": digest})


@dataclass
class DirImages:
    """A resolver over ``store/`` with channel -> version and per-MAC pins kept in memory.

    A policy fake for tests of the HTTP service alone (the real store is tested by
    its own suite); it resolves to the same directory layout the store uses.
    """

    images: Path
    channels: dict[tuple[str, str], str] = field(default_factory=dict)
    pins: dict[str, str] = field(default_factory=dict)

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        version = pin or (self.pins.get(mac) if mac else None) or self.channels.get(
            (image, channel))
        if version is None:
            return None
        ref = self.ref(image, version)
        return replace(ref, channel=channel, pinned=bool(pin or (mac and mac in self.pins))) \
            if ref is not None else None

    def ref(self, image: str, version: str) -> ImageRef | None:
        root = self.images / "store" / image / version
        try:
            m = json.loads((root / "manifest.json").read_text())
        except OSError:
            return None
        return ImageRef(name=image, version=version, root=root, kind=m.get("kind", ""),
                        artefacts=tuple(a["path"] for a in m["artefacts"]), boot=m["boot"],
                        boards=tuple(m.get("boards", ())),
                        disk=DiskImage(**m["disk"]) if m.get("disk") else None)


def give_address(app: App, mac: str, ip: str) -> None:
    """Make ``ip`` node ``mac``'s address as nodes.yaml ``ip`` would (and nobody else's).

    Loopback has no neighbour table and no DHCP, so tests on 127.0.0.x use the static
    address, the evidence an operator gives for a node with a DHCP reservation.
    """
    inv = app.inventory
    nodes = {m: (n.model_copy(update={"ip": None}) if n.ip == ip else n)
             for m, n in inv.nodes.items()}
    nodes[mac] = nodes[mac].model_copy(update={"ip": ip})
    app.inventory = replace(inv, nodes=nodes)


def make_app(tmp: Path, *, http: dict[str, Any] | None = None, policy: str = "ignore",
             kernel_size: int = 1 << 20, real_store: bool = False) -> App:
    """A daemon App with three nodes, a ``demo`` image (1.0 on prod) and two secrets.

    ``real_store``: use netbootd.store's ImageStore (API tests), else :class:`DirImages`.
    """
    from ..daemon import build_app

    tmp.mkdir(parents=True, exist_ok=True)
    images, state = tmp / "images", tmp / "state"
    (tmp / "nodes.yaml").write_text(NODES_YAML)
    secrets = {"k3s_token": tmp / "k3s-token", "kubeadm_token": tmp / "kubeadm-token"}
    secrets["k3s_token"].write_text(SECRET_A + "\n")
    secrets["kubeadm_token"].write_text(SECRET_B + "\n")
    (tmp / "api-token").write_text(TOKEN + "\n")
    write_version(images, "demo", "1.0", {
        "boot/vmlinuz": os.urandom(kernel_size),
        "boot/initrd.img": os.urandom(4096),
        "disk.img": os.urandom(8192),
    }, extra={"boot/vmlinuz.gz": b"not the kernel", "secret.txt": b"not an artefact"})
    write_version(images, "installer", "1.0", {
        "boot/vmlinuz": os.urandom(4096), "boot/initrd.img": os.urandom(4096)},
        kind="installer", boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                                "cmdline": "console=ttyS0"})
    write_disk_version(images, "gold", "1.0", os.urandom(64 * 1024))
    http_settings = {"port": free_port(), "bind": "127.0.0.1",
                     "api_token_file": str(tmp / "api-token")}
    http_settings.update(http or {})
    settings = load_settings(None, {
        "paths": {"images": str(images), "state": str(state),
                  "inventory": str(tmp / "nodes.yaml"),
                  "templates": str(REPO / "config" / "templates")},
        "http": http_settings,
        "dhcp": {"enabled": False}, "tftp": {"enabled": False},
        "policy": {"unknown": policy},
        "secrets": {k: str(v) for k, v in secrets.items()},
    }, use_default_path=False)
    app = build_app(settings)
    if real_store:
        from ..store.store import ImageStore

        store = ImageStore(images, state, settings.store, events=app.events,
                           metrics=app.metrics)
        store.activate("demo", "1.0", "prod", by="test")
        app.store = store
        app.planner.images = store
    else:
        app.planner.images = DirImages(images, channels={
            ("demo", "prod"): "1.0", ("installer", "prod"): "1.0", ("gold", "prod"): "1.0"})
    return app


class ServerThread:
    """The HTTP service of ``app`` running in a background thread (context manager)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="http-test-server")
        self.service: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.settings.http.port}"

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> Self:
        from .app import create

        self._thread.start()
        self.service = create(self.app)
        self.call(self.service.start())
        self.app.services["http"] = self.service
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.service.stop())
        finally:
            self.app.services.pop("http", None)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()
            self.app.events.close()


def populate(app: App) -> None:
    """A fleet mid-life for the status page: boots in several phases, three versions on
    two channels, a pin, a rejected build, an unknown machine (needs ``real_store``)."""
    images = app.settings.paths.images
    small = {"boot/vmlinuz": b"k" * 4096, "boot/initrd.img": b"i" * 4096, "disk.img": b"d"}
    write_version(images, "demo", "1.1", small)
    write_version(images, "demo", "2.0", {**small, "boot/vmlinuz": os.urandom(3 << 20)})
    write_version(images, "pi-os", "2026.11.20-1", {"boot/kernel_2712.img": b"p" * 8192,
                                                      "rootfs/etc/hostname": b"pi\n"},
                  boot={"boot_tree": "boot", "rootfs": "rootfs"}, kind="pi-boot+rootfs")
    store = app.store
    if store is not None:
        store.activate("demo", "1.1", "prod", by="test")
        store.activate("demo", "2.0", "dev", by="test")
        store.activate("pi-os", "2026.11.20-1", "prod", by="test")
        store.pin(NODE_C, "1.0", "demo", by="test")
        bad = images / "incoming" / "demo-2.1"
        bad.mkdir(parents=True, exist_ok=True)
        (bad / "manifest.json").write_text('{"image": "demo", "version": "2.1"}')
        store.ingest_entry("demo-2.1")
    ev = app.events
    for kind, extra in (("dhcp", {}), ("tftp", {"file": "ipxe.efi"}),
                        ("http", {"file": "/ipxe"}), ("kernel", {}), ("booted", {}),
                        ("joined", {})):
        ev.record(kind, NODE_A, f"{kind} ok", ip="10.231.0.10", image="demo",
                  version="1.1", outcome="ok", **extra)
    for kind in ("dhcp", "tftp", "http", "kernel"):
        ev.record(kind, NODE_B, f"{kind} ok", ip="10.231.0.11", image="demo", version="1.1",
                  outcome="ok")
    ev.record("failed", NODE_B, "installer: sha256 mismatch writing /dev/nvme0n1",
              ip="10.231.0.11", outcome="ok")
    ev.record("dhcp", NODE_C, "local boot", ip="10.231.0.12", outcome="ok")
    ev.record("dhcp", UNKNOWN, "unknown machine asked", ip="10.231.0.99", outcome="ok")
