"""Per-MAC pins (``pins.json``): keep one machine on a version whatever its channel says.

The file is re-read only when its inode/mtime/size changed (the CLI edits it from another
process); every edit is a read-modify-write under ``edits.lock`` and an atomic rewrite.
"""

from __future__ import annotations

import threading

from .catalogue import Versions
from .errors import Conflict, Invalid, NotFound, valid_mac
from .layout import Layout, flocked, now_iso, read_json, stat_key, write_json_atomic
from .signals import Signals


class Pins:
    """MAC -> {version, image, by, when}."""

    def __init__(self, layout: Layout, versions: Versions, signals: Signals,
                 lock: threading.RLock) -> None:
        self.layout = layout
        self.versions = versions
        self.signals = signals
        self._lock = lock
        self._cache: tuple[tuple[int, int, int] | None, dict[str, dict]] = (None, {})

    def pins(self) -> dict[str, dict]:
        """MAC -> {version, image, by, when} (a copy; re-read when pins.json changed)."""
        key = stat_key(self.layout.pins_file)
        with self._lock:
            if self._cache[0] == key and key is not None:
                return dict(self._cache[1])
        data = read_json(self.layout.pins_file, {})
        pins = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("version")} \
            if isinstance(data, dict) else {}
        with self._lock:
            self._cache = (key, pins)
        return dict(pins)

    def for_mac(self, mac: str, image: str) -> str | None:
        """The version ``mac`` is pinned to for ``image``, if any."""
        try:
            p = self.pins().get(valid_mac(mac))
        except Invalid:
            return None
        if p and p.get("image") in (None, image):
            return str(p["version"])
        return None

    def pinned_versions(self, image: str) -> set[str]:
        return {str(p["version"]) for p in self.pins().values()
                if p.get("image") in (None, image)}

    def image_of(self, version: str, image: str | None) -> str:
        """The image a pin to ``version`` is for: ``image`` if named, else the one image
        that has that version (:class:`Invalid` if several do, :class:`NotFound` if
        none); either way the version must exist."""
        if image is None:
            having = [i for i in self.versions.images()
                      if self.versions.manifest(i, version) is not None]
            if not having:
                raise NotFound(f"no image has a version {version!r}")
            if len(having) > 1:
                raise Invalid(f"version {version!r} exists in {', '.join(having)}: "
                              "name the image")
            image = having[0]
        self.versions.need(image, version)
        return image

    def pin(self, mac: str, version: str, image: str | None = None, *, by: str = "cli") -> None:
        """Keep one machine on ``version`` (of ``image``: :meth:`image_of`)."""
        mac = valid_mac(mac)
        image = self.image_of(version, image)
        with self._lock, flocked(self.layout.edits_lock):
            pins = self.pins()
            pins[mac] = {"version": version, "image": image, "by": by, "when": now_iso()}
            write_json_atomic(self.layout.pins_file, pins)
        self.signals.event(f"pinned {mac} to {image} {version}", mac=mac, image=image,
                           version=version, by=by, outcome="pinned")
        self.signals.changed()

    def unpin(self, mac: str) -> None:
        """Let ``mac`` follow its channel again; :class:`Conflict` if it is not pinned (the
        request clashes with the state, as a rollback with nothing to go back to does)."""
        mac = valid_mac(mac)
        with self._lock, flocked(self.layout.edits_lock):
            pins = self.pins()
            if mac not in pins:
                raise Conflict(f"{mac} is not pinned")
            del pins[mac]
            write_json_atomic(self.layout.pins_file, pins)
        self.signals.event(f"unpinned {mac}", mac=mac, outcome="unpinned")
        self.signals.changed()
