"""Refused builds: ``rejected/<name>`` plus ``<name>.reason``, kept for a person to read.

Beside ``incoming/``, not inside it, so the watcher never sees a refused build again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .layout import Layout, fsync_dir, now_iso, read_json, remove_tree, write_json_atomic

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
                        **({"version": data["version"]} if data.get("version") else {})})
        return sorted(out, key=lambda r: str(r["when"]), reverse=True)

    def keep(self, name: str, src: Path, reason: str, image: str | None,
             version: str | None) -> str:
        """Move the build ``src`` (an incoming entry) here with its reason; return the name
        it got (a second refusal of the same name gets a time suffix)."""
        dest = name
        if os.path.lexists(self.layout.rejected_entry(dest)):
            dest = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
        info: dict[str, str] = {"reason": reason, "when": now_iso(), "source": name}
        if image is not None and version is not None:
            info.update(image=image, version=version)
        write_json_atomic(self.layout.reason_file(dest), info)
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
            self.layout.reason_file(name).unlink(missing_ok=True)
        if victims:
            log.info("pruned %d old rejected build(s)", len(victims))
        return victims
