"""Channel pointers and the activation history: activate, rollback, recovery entries, prune.

A pointer is a one-line file replaced by rename, so an activation is one atomic step
and the CLI can make it while the daemon runs. Reads stat the pointer and re-read it only
when its inode/mtime/size changed (the planner asks on every boot). Edits take
``edits.lock`` so two processes activating at once each record the right ``previous``.
"""

from __future__ import annotations

import json
import logging
import threading

from .catalogue import Versions
from .errors import Conflict, NotFound, valid_name
from .layout import (
    Layout,
    append_line,
    flocked,
    locked_file,
    now_iso,
    read_json_lines,
    stat_key,
    write_atomic,
)
from .signals import Signals

log = logging.getLogger("netbootd.store")


class Channels:
    """Which version each channel points at, and how it came to."""

    def __init__(self, layout: Layout, versions: Versions, signals: Signals,
                 lock: threading.RLock) -> None:
        self.layout = layout
        self.versions = versions
        self.signals = signals
        self._lock = lock
        self._pointers: dict[str, tuple[tuple[int, int, int] | None, str | None]] = {}

    # -- reading ---------------------------------------------------------------------------
    def active(self, image: str, channel: str) -> str | None:
        """The version a channel points at (pointer re-read only when it changed)."""
        p = self.layout.pointer(image, channel)
        key = stat_key(p)
        with self._lock:
            hit = self._pointers.get(str(p))
            if hit and hit[0] == key:
                return hit[1]
        version: str | None = None
        if key is not None:
            try:
                version = p.read_text(encoding="utf-8").strip() or None
            except FileNotFoundError:
                version = None
        with self._lock:
            self._pointers[str(p)] = (key, version)
        return version

    def channels(self, image: str) -> dict[str, str]:
        """channel -> active version, for every pointer of ``image``."""
        d = self.layout.channel_dir(image)
        out: dict[str, str] = {}
        if d.is_dir():
            for e in sorted(d.iterdir()):
                if e.name.startswith(".") or not e.is_file():
                    continue
                v = self.active(image, e.name)
                if v:
                    out[e.name] = v
        return out

    def history(self, image: str | None = None) -> list[dict]:
        """Activation history, oldest first: when, image, version, channel, previous, by, why."""
        rows = read_json_lines(self.layout.history_file)
        return [r for r in rows if image is None or r.get("image") == image]

    def ever_active(self, image: str, version: str, channel: str) -> bool:
        """Was ``version`` ever activated on ``channel``? (auto-activate asks: a build
        dropped again after a rollback must not come back on its own)."""
        return any(h.get("version") == version and h.get("channel") == channel
                   for h in self.history(image))

    # -- changing --------------------------------------------------------------------------
    def activate(self, image: str, version: str, channel: str, *, by: str = "cli",
                 why: str = "") -> None:
        """Point ``channel`` at ``version``: one atomic rename of the pointer file.

        :class:`Invalid` for a bad name, :class:`NotFound` for a version not in the store.
        """
        valid_name(channel, "channel")
        self.versions.need(image, version)
        with self._lock, flocked(self.layout.edits_lock):
            previous = self.active(image, channel)
            if previous == version:
                log.info("%s %s already active on %s", image, version, channel)
                return
            write_atomic(self.layout.pointer(image, channel), (version + "\n").encode())
            self._append(image, channel, version, previous, by, why)
        log.info("activated %s %s on %s (was %s) by %s", image, version, channel, previous, by,
                 extra={"image": image, "version": version, "channel": channel})
        self.signals.activation(image, channel)
        self.signals.event(f"activated {image} {version} on {channel}", image=image,
                           version=version, channel=channel, previous=previous, by=by,
                           outcome="activated")
        self.signals.changed()

    def rollback(self, image: str, channel: str, *, by: str = "cli") -> str:
        """Go back to the version that was active before the current one; return it.

        Rolling back twice toggles (the rollback itself is a history entry whose
        ``previous`` is the version rolled back from). :class:`Conflict` when there is
        nothing to roll back to, :class:`NotFound` when that version was deleted.
        """
        valid_name(image, "image name")
        valid_name(channel, "channel")
        current = self.active(image, channel)
        if current is None:
            raise Conflict(f"no version of {image!r} is active on channel {channel!r}")
        previous = None
        for h in reversed(self.history(image)):
            if h.get("channel") == channel and h.get("version") == current:
                previous = h.get("previous")
                break
        if not previous:
            raise Conflict(f"nothing to roll back to: {current} is the first version "
                           f"activated on {image}/{channel}")
        if self.versions.manifest(image, previous) is None:
            raise NotFound(f"previous version {previous} of {image} is no longer in the store")
        self.activate(image, previous, channel, by=by, why=f"rollback from {current}")
        return previous

    def record_recovery(self, image: str, channel: str, version: str | None,
                        previous: str | None, why: str) -> None:
        """A history entry by ``recovery`` (start-up repair changed or confirmed a pointer)."""
        self._append(image, channel, version, previous, "recovery", why)

    def _append(self, image: str, channel: str, version: str | None, previous: str | None,
                by: str, why: str) -> None:
        entry = {"when": now_iso(), "image": image, "version": version, "channel": channel,
                 "previous": previous, "by": by, "why": why}
        append_line(self.layout.history_file, json.dumps(entry, sort_keys=True))

    def prune_history(self, keep: int, *, dry_run: bool = False) -> int:
        """Drop old activation history; return how many entries went (or would go).

        Kept: per image and channel the newest ``keep`` entries, plus every entry that
        names a version still in the store. Why both: recovery reads each channel's last
        entry, rollback reads the entry of the active version, and ingest's auto-activate
        asks whether a version was *ever* activated on its channel (so a build dropped
        again after a rollback is not re-activated) -- all of which the two rules keep.
        Entries of deleted versions beyond the newest ``keep`` answer nothing any more,
        and without pruning the file grows by ~200 bytes per activation forever.
        """
        path = self.layout.history_file
        if not path.exists():
            return 0
        with self._lock, locked_file(path) as fh:
            fh.seek(0)
            lines = fh.read().decode("utf-8", "replace").splitlines()
            entries = []
            for line in lines:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a torn line: dropped with the rewrite
                if isinstance(d, dict):
                    entries.append((line, d))
            seen: dict[tuple[str, str], int] = {}
            kept: list[str] = []
            for line, d in reversed(entries):
                key = (str(d.get("image")), str(d.get("channel")))
                seen[key] = seen.get(key, 0) + 1
                version = d.get("version")
                exists = (isinstance(version, str) and self.versions.manifest(
                    str(d.get("image")), version) is not None)
                if seen[key] <= keep or exists:
                    kept.append(line)
            dropped = len(lines) - len(kept)
            if dropped and not dry_run:
                kept.reverse()
                write_atomic(path, "".join(x + "\n" for x in kept).encode())
        if dropped and not dry_run:
            log.info("pruned %d old activation history entries", dropped)
        return dropped
