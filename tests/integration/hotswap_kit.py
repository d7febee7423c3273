"""Shared set-up of the hot-swap acceptance tests: a real App with the store service and
one protocol service on loopback, and a way to drop a build the way CI does."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from netbootd.app import App
from netbootd.daemon import build_app
from netbootd.inventory import load_inventory
from netbootd.settings import load_settings
from netbootd.store.build import sample_build


def hotswap_app(tmp_path: Path, nodes_yaml: str, service: dict[str, Any]) -> App:
    """An App whose store activates every build on ``dev`` at once and keeps one version;
    ``service`` enables exactly one protocol, e.g. ``{"http": {"port": p, ...}}``."""
    (tmp_path / "nodes.yaml").write_text(nodes_yaml)
    off = {name: {"enabled": False} for name in ("dhcp", "tftp", "http")}
    settings = load_settings(None, {
        "paths": {"images": str(tmp_path / "images"), "state": str(tmp_path / "state"),
                  "inventory": str(tmp_path / "nodes.yaml")},
        **off, **service,
        "store": {"settle_seconds": 0.1, "keep": 1, "keep_booted_hours": 0},
    }, use_default_path=False)
    return build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))


def drop_build(app: App, work: Path, image: str, version: str, **kw: Any) -> None:
    """Write a build elsewhere, then rename it into incoming/ (the CI drop protocol)."""
    src = work / f"{image}-{version}"
    sample_build(src, image, version, **kw)
    os.rename(src, app.store.layout.incoming / f"{image}-{version}")


async def until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
