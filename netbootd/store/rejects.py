"""Refused builds: ``rejected/<name>`` plus ``<name>.reason``, kept for a person to read.

Beside ``incoming/``, not inside it, so the watcher never sees a refused build again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .layout import (
    Layout,
    entry_size,
    fsync_dir,
    now_iso,
    read_json,
    remove_tree,
    write_atomic,
    write_json_atomic,
)

log = logging.getLogger("netbootd.store")


class Rejects:
    """The rejected/ directory of one store."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def list(self) -> list[dict]:
        """Builds ingest refused: {name, reason, when, image?, version?} (newest first)."""
        out = []
        d = self.layout.rejected
        for f in d.glob("*.reason") if d.is_dir() else []:
            data = read_json(f, {})
            if not isinstance(data, dict):
                data = {}
            out.append({"name": f.name[: -len(".reason")],
                        "reason": str(data.get("reason", "unknown")),
                        "when": data.get("when", now_iso(f.stat().st_mtime)),
                        **({"image": data["image"]} if data.get("image") else {}),
                        **({"version": data["version"]} if data.get("version") else {}),
                        **({"payload": data["payload"]} if data.get("payload") else {})})
        return sorted(out, key=lambda r: str(r["when"]), reverse=True)

    def keep(self, name: str, src: Path, reason: str, image: str | None,
             version: str | None, *, manifest: bytes | None = None,
             max_bytes: int | None = None) -> str:
        """Move the build ``src`` (an incoming entry) here with its reason; return the name
        it got (a second refusal of the same name gets a time suffix).

        A build larger than ``max_bytes`` (``store.keep_rejected_max_bytes``) is not
        kept: its reason says so, its manifest (if it had one) is kept beside it as
        ``<name>.manifest.json``, and the payload is deleted. Order for kill -9: reason
        (and manifest) first, then the payload leaves incoming/ by one rename to a
        ``.done-`` name that recovery deletes; a crash before that rename re-ingests and
        re-rejects the build (a second reason file), never loses the reason.
        """
        dest = name
        if os.path.lexists(self.layout.rejected_entry(dest)) or \
                self.layout.reason_file(dest).exists():
            dest = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
        info: dict[str, Any] = {"reason": reason, "when": now_iso(), "source": name}
        if image is not None and version is not None:
            info.update(image=image, version=version)
        size = entry_size(src)
        discard = max_bytes is not None and size > max_bytes
        if discard:
            info["payload"] = (f"deleted: {size} bytes, more than "
                               f"store.keep_rejected_max_bytes ({max_bytes})")
            if manifest is not None:
                write_atomic(self.layout.rejected_manifest(dest), manifest)
        write_json_atomic(self.layout.reason_file(dest), info)
        if discard:
            gone = self.layout.done_entry(src.name)
            os.rename(src, gone)
            fsync_dir(self.layout.incoming)
            remove_tree(gone)
        else:
            os.rename(src, self.layout.rejected_entry(dest))
        fsync_dir(self.layout.rejected)
        return dest

    def prune(self, keep: int, *, dry_run: bool = False) -> list[str]:
        """Delete all but the newest ``keep`` rejected builds (and their reason files).

        Rejected builds are kept for a person to inspect, but a CI that keeps pushing a
        broken build must not fill the disk with them.
        """
        victims = [r["name"] for r in self.list()[keep:]]
        if dry_run:
            return victims
        for name in victims:
            remove_tree(self.layout.rejected_entry(name))
            self.layout.rejected_manifest(name).unlink(missing_ok=True)
            self.layout.reason_file(name).unlink(missing_ok=True)
        if victims:
            log.info("pruned %d old rejected build(s)", len(victims))
        return victims
