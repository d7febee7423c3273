"""A real App around the image store for tests, and the CI drop protocol.

The store, NFS and hot-swap tests all need the same thing: settings pointing into a
temp dir, an inventory, and builds that arrive in incoming/ by rename. Protocol
services are started by each test itself, so only what they need is running.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path
from typing import Any

from netbootd.app import App
from netbootd.daemon import build_app
from netbootd.inventory import load_inventory
from netbootd.settings import load_settings
from netbootd.store.build import sample_build

#: Store settings for swap tests: ingest at once, keep one version (GC has work to do).
ONE_VERSION = {"settle_seconds": 0.1, "keep": 1, "keep_booted_hours": 0}


def store_app(tmp_path: Path, nodes_yaml: str, overrides: dict[str, Any] | None = None) -> App:
    """An App with images/, state/ and nodes.yaml under ``tmp_path``; ``overrides`` are
    settings sections merged over that (``{"store": ONE_VERSION, "http": {...}}``)."""
    (tmp_path / "nodes.yaml").write_text(nodes_yaml)
    sections: dict[str, dict[str, Any]] = {
        "paths": {"images": str(tmp_path / "images"), "state": str(tmp_path / "state"),
                  "inventory": str(tmp_path / "nodes.yaml")}}
    for name, values in (overrides or {}).items():
        sections[name] = {**sections.get(name, {}), **values}
    settings = load_settings(None, sections, use_default_path=False)
    return build_app(settings, inventory=load_inventory(tmp_path / "nodes.yaml"))


def drop_build(app: App, work: Path, image: str, version: str, **kw: Any) -> None:
    """Write a build elsewhere, then rename it into incoming/ (the CI drop protocol)."""
    src = work / f"{image}-{version}"
    sample_build(src, image, version, **kw)
    os.rename(src, app.store.layout.incoming / f"{image}-{version}")


async def until(pred, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def flip(path: Path, offset: int) -> None:
    """Flip one byte of a file in place (as a disk error or an intruder would)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
