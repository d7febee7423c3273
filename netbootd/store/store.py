"""The image store: versions, channel pointers, activation history, pins, resolve, GC.

State is the file system, re-read cheaply on every call (matchbox's file store):
a channel pointer is a one-line file replaced by rename, so an activation is one
atomic step and the CLI can change it while the daemon runs. ``resolve`` stats
the pointer and re-reads it only when its inode/mtime changed; a version's
manifest is cached forever because a promoted version never changes.

Thread-safe: TFTP/HTTP threads call ``resolve``, ingest runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ..model import ImageRef, normalise_mac
from ..settings import StoreSettings
from .ingest import (
    Cancelled,
    IngestResult,
    Rejected,
    copy_tree,
    detect_suffix,
    find_root,
    fsync_tree,
    unpack_archive,
    validate_build,
)
from .layout import (
    DONE_PREFIX,
    READY_SUFFIX,
    Layout,
    append_line,
    fsync_dir,
    is_ignored_name,
    locked_file,
    read_json,
    read_json_lines,
    write_atomic,
    write_json_atomic,
)
from .manifest import MANIFEST, Manifest, ManifestError, check_name, load_public_key, parse_manifest

log = logging.getLogger("netbootd.store")


#: Activation history entries per image in list_images() (history() has them all).
LIST_HISTORY = 50


class StoreError(ValueError):
    """A user mistake (unknown image/version/channel, nothing to roll back to...)."""


def _now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC) \
        .isoformat(timespec="seconds").replace("+00:00", "Z")


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ImageStore:
    """One image store on disk (see layout.py for the directory structure)."""

    def __init__(self, images_root: Path, state_dir: Path, settings: StoreSettings, *,
                 events: Any = None, metrics: Any = None) -> None:
        self.layout = Layout(Path(images_root), Path(state_dir))
        self.layout.ensure()
        self.settings = settings
        self.events = events
        self.metrics = metrics
        #: Called (no arguments, from any thread) after every change: ingest,
        #: activation, pin, GC. The NFS service re-applies exports from here.
        self.on_change: list[Callable[[], None]] = []
        #: Set to make a running ingest stop at its next chunk (daemon shutdown).
        self.cancel = threading.Event()
        self._lock = threading.RLock()
        self._ingest_lock = threading.Lock()
        self._manifests: dict[tuple[str, str], tuple[Manifest, bytes]] = {}
        self._refs: dict[tuple[str, str], ImageRef] = {}
        self._pointers: dict[Path, tuple[tuple[int, int, int] | None, str | None]] = {}
        self._pins: tuple[tuple[int, int, int] | None, dict[str, dict]] = (None, {})
        self._booted: dict[str, float] = {
            k: float(v) for k, v in read_json(self.layout.booted_file, {}).items()
            if isinstance(v, (int, float))}
        self._keys: list[Any] | None = None
        self.booted_dirty = False
        #: Versions the daemon knows are in use (boot sessions, inventory pins); every GC
        #: keeps them, whoever calls it (API, service). Set by the store service.
        self.in_use_hook: Callable[[], set[tuple[str, str]]] | None = None

    # -- reading ---------------------------------------------------------------------------
    def manifest(self, image: str, version: str) -> Manifest | None:
        """The manifest of a promoted version (cached: promoted versions never change)."""
        key = (image, version)
        with self._lock:
            hit = self._manifests.get(key)
        root = self.layout.version_dir(image, version)
        if not root.is_dir():
            if hit:
                with self._lock:
                    self._manifests.pop(key, None)
                    self._refs.pop(key, None)
            return None
        if hit:
            return hit[0]
        try:
            data = (root / MANIFEST).read_bytes()
            m = parse_manifest(data)
        except (OSError, ManifestError) as exc:
            log.error("unreadable manifest in store %s/%s: %s", image, version, exc)
            return None
        with self._lock:
            self._manifests[key] = (m, data)
        return m

    def ref(self, image: str, version: str) -> ImageRef | None:
        """ImageRef for a version in the store (no channel, not pinned), or None."""
        try:
            check_name(image), check_name(version)
        except ValueError:
            return None
        m = self.manifest(image, version)
        if m is None:
            return None
        key = (image, version)
        with self._lock:
            hit = self._refs.get(key)
        if hit is None:  # built once: a rootfs may list tens of thousands of artefacts
            hit = ImageRef(name=image, version=version,
                           root=self.layout.version_dir(image, version), kind=m.kind,
                           artefacts=tuple(a.path for a in m.artefacts), boot=m.boot_dict())
            with self._lock:
                self._refs[key] = hit
        return hit

    def images(self) -> list[str]:
        names: set[str] = set()
        for d in (self.layout.store, self.layout.channels):
            if d.is_dir():
                names.update(e.name for e in d.iterdir() if e.is_dir() and not
                             e.name.startswith("."))
        return sorted(names)

    def versions(self, image: str) -> list[str]:
        """Versions of an image, oldest first (by manifest ``created``, then name)."""
        d = self.layout.store / image
        if not d.is_dir():
            return []
        found = []
        for e in d.iterdir():
            if e.name.startswith(".") or not e.is_dir():
                continue
            m = self.manifest(image, e.name)
            if m is not None:
                found.append((m.created.timestamp(), e.name))
        return [v for _, v in sorted(found)]

    def active(self, image: str, channel: str) -> str | None:
        """The version a channel points at (pointer re-read only when it changed)."""
        p = self.layout.pointer(image, channel)
        key = _stat_key(p)
        with self._lock:
            hit = self._pointers.get(p)
            if hit and hit[0] == key:
                return hit[1]
        version: str | None = None
        if key is not None:
            try:
                version = p.read_text(encoding="utf-8").strip() or None
            except FileNotFoundError:
                version = None
        with self._lock:
            self._pointers[p] = (key, version)
        return version

    def channels(self, image: str) -> dict[str, str]:
        d = self.layout.channels / image
        out: dict[str, str] = {}
        if d.is_dir():
            for e in sorted(d.iterdir()):
                if e.name.startswith(".") or not e.is_file():
                    continue
                v = self.active(image, e.name)
                if v:
                    out[e.name] = v
        return out

    def pins(self) -> dict[str, dict]:
        """MAC -> {version, image, by, when}; re-read when pins.json changed (CLI)."""
        key = _stat_key(self.layout.pins_file)
        with self._lock:
            if self._pins[0] == key and key is not None:
                return dict(self._pins[1])
        data = read_json(self.layout.pins_file, {})
        pins = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("version")} \
            if isinstance(data, dict) else {}
        with self._lock:
            self._pins = (key, pins)
        return dict(pins)

    def history(self, image: str | None = None) -> list[dict]:
        """Activation history, oldest first: when, image, version, channel, previous, by, why."""
        rows = read_json_lines(self.layout.history_file)
        return [r for r in rows if image is None or r.get("image") == image]

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        """The planner's ImageResolver: inventory pin, else the store's pin for ``mac``,
        else the channel's active version."""
        if pin:
            ref = self.ref(image, pin)
            if ref is None:
                log.warning("pinned version %s of %s is not in the store", pin, image)
                return None
            self._mark_used(image, pin)
            return replace(ref, channel=channel, pinned=True)
        if mac:
            try:
                p = self.pins().get(normalise_mac(mac))
            except ValueError:
                p = None
            if p and p.get("image") in (None, image):
                ref = self.ref(image, str(p["version"]))
                if ref is not None:
                    self._mark_used(image, ref.version)
                    return replace(ref, channel=channel, pinned=True)
                log.warning("store pin %s -> %s/%s: version missing; using channel %s",
                            mac, image, p["version"], channel)
        version = self.active(image, channel)
        if version is None:
            return None
        ref = self.ref(image, version)
        if ref is None:
            log.error("channel %s/%s points at missing version %s", image, channel, version)
            return None
        self._mark_used(image, version)
        return replace(ref, channel=channel)

    def all_refs(self) -> list[ImageRef]:
        """Every version in the store (NFS exports one rootfs per version)."""
        return [r for img in self.images() for v in self.versions(img)
                if (r := self.ref(img, v)) is not None]

    def list_images(self) -> list[dict]:
        """JSON-able overview for the CLI, API and status page."""
        pins = self.pins()
        hist = self.history()
        out = []
        for image in self.images():
            chans = self.channels(image)
            versions = []
            for v in self.versions(image):
                m = self.manifest(image, v)
                if m is None:
                    continue
                versions.append({
                    "version": v, "created": m.created.isoformat().replace("+00:00", "Z"),
                    "kind": m.kind, "size": m.total_size, "boards": list(m.boards),
                    "active_on": sorted(c for c, av in chans.items() if av == v),
                    "pinned_by": sorted(mac for mac, p in pins.items()
                                        if p.get("version") == v
                                        and p.get("image") in (None, image)),
                })
            mine = [h for h in hist if h.get("image") == image]
            out.append({"name": image, "channels": chans, "versions": versions,
                        "history": mine[-LIST_HISTORY:]})
        return out

    def prune_rejected(self, keep: int, *, dry_run: bool = False) -> list[str]:
        """Delete all but the newest ``keep`` rejected builds (and their reason files).

        Rejected builds are kept for a person to inspect, but a CI that keeps pushing a
        broken build must not fill the disk with them.
        """
        victims = [r["name"] for r in self.rejected()[keep:]]
        if dry_run:
            return victims
        for name in victims:
            path = self.layout.rejected / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()
            (self.layout.rejected / (name + ".reason")).unlink(missing_ok=True)
        if victims:
            log.info("pruned %d old rejected build(s)", len(victims))
        return victims

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
                exists = (isinstance(version, str) and self.manifest(str(d.get("image")),
                                                                     version) is not None)
                if seen[key] <= keep or exists:
                    kept.append(line)
            dropped = len(lines) - len(kept)
            if dropped and not dry_run:
                kept.reverse()
                write_atomic(path, "".join(x + "\n" for x in kept).encode())
        if dropped and not dry_run:
            log.info("pruned %d old activation history entries", dropped)
        return dropped

    def rejected(self) -> list[dict]:
        """Builds ingest refused: {name, reason, when} (newest first)."""
        out = []
        d = self.layout.rejected
        for f in d.glob("*.reason") if d.is_dir() else []:
            data = read_json(f, {})
            if not isinstance(data, dict):
                data = {}
            out.append({"name": f.name[: -len(".reason")],
                        "reason": str(data.get("reason", "unknown")),
                        "when": data.get("when", _now_iso(f.stat().st_mtime)),
                        **({"image": data["image"]} if data.get("image") else {}),
                        **({"version": data["version"]} if data.get("version") else {})})
        return sorted(out, key=lambda r: str(r["when"]), reverse=True)

    # -- changing --------------------------------------------------------------------------
    def _need_version(self, image: str, version: str) -> None:
        try:
            check_name(image, "image name")
            check_name(version, "version")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        if self.manifest(image, version) is None:
            known = ", ".join(self.versions(image)) or "none"
            if not (self.layout.store / image).is_dir():
                raise StoreError(f"unknown image {image!r} (images: "
                                 f"{', '.join(self.images()) or 'none'})")
            raise StoreError(f"unknown version {version!r} of image {image!r} "
                             f"(versions: {known})")

    def activate(self, image: str, version: str, channel: str, *, by: str = "cli",
                 why: str = "") -> None:
        """Point ``channel`` at ``version``: one atomic rename of the pointer file."""
        try:
            check_name(channel, "channel")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        self._need_version(image, version)
        with self._lock:
            previous = self.active(image, channel)
            if previous == version:
                log.info("%s %s already active on %s", image, version, channel)
                return
            write_atomic(self.layout.pointer(image, channel), (version + "\n").encode())
            entry = {"when": _now_iso(), "image": image, "version": version,
                     "channel": channel, "previous": previous, "by": by, "why": why}
            append_line(self.layout.history_file, json.dumps(entry, sort_keys=True))
        log.info("activated %s %s on %s (was %s) by %s", image, version, channel, previous, by,
                 extra={"image": image, "version": version, "channel": channel})
        if self.metrics is not None:
            self.metrics.image_activations.labels(image, channel).inc()
        self._event(f"activated {image} {version} on {channel}", image=image, version=version,
                    channel=channel, previous=previous, by=by, outcome="activated")
        self._changed()

    def rollback(self, image: str, channel: str, *, by: str = "cli") -> str:
        """Go back to the version that was active before the current one; return it.

        Rolling back twice toggles (the rollback itself is a history entry whose
        ``previous`` is the version rolled back from).
        """
        current = self.active(image, channel)
        if current is None:
            raise StoreError(f"no version of {image!r} is active on channel {channel!r}")
        previous = None
        for h in reversed(self.history(image)):
            if h.get("channel") == channel and h.get("version") == current:
                previous = h.get("previous")
                break
        if not previous:
            raise StoreError(f"nothing to roll back to: {current} is the first version "
                             f"activated on {image}/{channel}")
        if self.manifest(image, previous) is None:
            raise StoreError(f"previous version {previous} of {image} is no longer in the store")
        self.activate(image, previous, channel, by=by, why=f"rollback from {current}")
        return previous

    def pin(self, mac: str, version: str, image: str | None = None, *, by: str = "cli") -> None:
        """Keep one machine on ``version`` whatever its channel says."""
        try:
            mac = normalise_mac(mac)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        if image is None:
            having = [i for i in self.images() if self.manifest(i, version) is not None]
            if not having:
                raise StoreError(f"no image has a version {version!r}")
            if len(having) > 1:
                raise StoreError(f"version {version!r} exists in {', '.join(having)}: "
                                 "name the image")
            image = having[0]
        self._need_version(image, version)
        with self._lock:
            pins = self.pins()
            pins[mac] = {"version": version, "image": image, "by": by, "when": _now_iso()}
            write_json_atomic(self.layout.pins_file, pins)
        self._event(f"pinned {mac} to {image} {version}", mac=mac, image=image,
                    version=version, by=by, outcome="pinned")
        self._changed()

    def unpin(self, mac: str) -> None:
        try:
            mac = normalise_mac(mac)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        with self._lock:
            pins = self.pins()
            if mac not in pins:
                raise StoreError(f"{mac} is not pinned")
            del pins[mac]
            write_json_atomic(self.layout.pins_file, pins)
        self._event(f"unpinned {mac}", mac=mac, outcome="unpinned")
        self._changed()

    # -- retention -------------------------------------------------------------------------
    def _mark_used(self, image: str, version: str) -> None:
        now = time.time()
        key = f"{image}/{version}"
        with self._lock:
            if now - self._booted.get(key, 0.0) >= 60:  # minute resolution is plenty
                self.booted_dirty = True
            self._booted[key] = now

    def mark_booted(self, image: str, version: str) -> None:
        """A node booted this version (events subscription): keep it through the window."""
        self._mark_used(image, version)

    def flush_booted(self) -> None:
        """Persist last-used times (GC after a restart still honours the window)."""
        with self._lock:
            on_disk = read_json(self.layout.booted_file, {})
            merged = {**(on_disk if isinstance(on_disk, dict) else {}), **self._booted}
            self._booted = {k: float(v) for k, v in merged.items()
                            if isinstance(v, (int, float)) and "/" in k
                            and (self.layout.store / k).is_dir()}  # GC'd versions go
            write_json_atomic(self.layout.booted_file, self._booted)
            self.booted_dirty = False

    def gc_plan(self, in_use: set[tuple[str, str]] = frozenset()) -> list[tuple[str, str]]:
        """Versions GC would delete: not among the newest ``keep``, not active, not
        pinned, not in ``in_use``, not used within ``keep_booted_hours``."""
        pins = self.pins()
        window = self.settings.keep_booted_hours * 3600
        now = time.time()
        on_disk = read_json(self.layout.booted_file, {})
        booted = {**(on_disk if isinstance(on_disk, dict) else {}), **self._booted}
        victims = []
        for image in self.images():
            versions = self.versions(image)
            active = set(self.channels(image).values())
            pinned = {str(p["version"]) for p in pins.values()
                      if p.get("image") in (None, image)}
            newest = set(versions[-self.settings.keep:])
            for v in versions:
                used = booted.get(f"{image}/{v}")
                if v in newest or v in active or v in pinned or (image, v) in in_use:
                    continue
                if isinstance(used, (int, float)) and now - used < window:
                    continue
                victims.append((image, v))
        return victims

    def gc(self, *, dry_run: bool = False, in_use: set[tuple[str, str]] = frozenset()
           ) -> list[tuple[str, str]]:
        """Delete versions not kept (see :meth:`gc_plan`); ``dry_run`` only lists them.

        A version is first renamed out of store/ (invisible at once, atomically),
        then exports are re-applied, then its files are deleted.
        """
        keep = set(in_use)
        if self.in_use_hook is not None:
            keep |= set(self.in_use_hook())
        with self._lock:
            victims = self.gc_plan(keep)
            if dry_run or not victims:
                return victims
            trash = []
            for image, version in victims:
                src = self.layout.version_dir(image, version)
                dst = Path(tempfile.mkdtemp(prefix=f"gc-{image}-{version}-",
                                            dir=self.layout.staging))
                os.rename(src, dst / "v")
                self._manifests.pop((image, version), None)
                self._refs.pop((image, version), None)
                self._booted.pop(f"{image}/{version}", None)
                trash.append(dst)
                fsync_dir(src.parent)
                log.info("gc: deleted %s %s", image, version)
        self._changed()
        for d in trash:
            shutil.rmtree(d, ignore_errors=True)
        for image, version in victims:
            self._event(f"deleted {image} {version}", image=image, version=version,
                        outcome="deleted")
        return victims

    # -- recovery --------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Start-up repair after a crash: stale staging, promoted leftovers in incoming,
        temp files, pointers to missing versions, history missing the last swap.

        Only the daemon calls this (never the CLI): staging may be in use otherwise.
        """
        done: list[str] = []
        L = self.layout
        for e in list(L.staging.iterdir()):
            _remove(e)
            done.append(f"removed stale staging {e.name}")
        for e in list(L.incoming.iterdir()):
            if e.name.startswith(DONE_PREFIX) or (e.name.startswith(".upload-")
                                                  and e.name.endswith(".partial")):
                _remove(e)
                done.append(f"removed leftover {e.name}")
        for d in [L.channels, L.state_dir, *(x for x in L.channels.iterdir() if x.is_dir())]:
            for e in list(d.iterdir()):
                if e.name.startswith(".") and e.name.endswith(".tmp"):
                    _remove(e)
        hist = self.history()
        for image in self.images():
            for channel, version in self.channels(image).items():
                last = next((h for h in reversed(hist) if h.get("image") == image
                             and h.get("channel") == channel), None)
                if self.manifest(image, version) is None:
                    back = next((h["version"] for h in reversed(hist)
                                 if h.get("image") == image and h.get("channel") == channel
                                 and self.manifest(image, str(h.get("version"))) is not None),
                                None)
                    p = L.pointer(image, channel)
                    if back:
                        write_atomic(p, (back + "\n").encode())
                    else:
                        p.unlink()
                    self._record_recovery(image, channel, back, version,
                                          f"pointer named missing version {version}")
                    done.append(f"{image}/{channel}: pointer to missing {version} -> {back}")
                elif last is None or last.get("version") != version:
                    self._record_recovery(image, channel, version,
                                          last.get("version") if last else None,
                                          "history missed this activation (crash)")
                    done.append(f"{image}/{channel}: history repaired ({version})")
        for line in done:
            log.info("recovery: %s", line)
        return done

    def _record_recovery(self, image: str, channel: str, version: str | None,
                         previous: str | None, why: str) -> None:
        entry = {"when": _now_iso(), "image": image, "version": version, "channel": channel,
                 "previous": previous, "by": "recovery", "why": why}
        append_line(self.layout.history_file, json.dumps(entry, sort_keys=True))

    # -- ingest ----------------------------------------------------------------------------
    def incoming_candidates(self) -> list[str]:
        """Names in incoming/ that are builds (not dotfiles / *.tmp / *.partial / markers)."""
        out = []
        for e in sorted(self.layout.incoming.iterdir()):
            if is_ignored_name(e.name):
                continue
            if e.name.endswith(READY_SUFFIX):
                base = e.name[: -len(READY_SUFFIX)]
                if (self.layout.incoming / base).exists() and base not in out:
                    out.append(base)
                continue
            if e.name not in out:
                out.append(e.name)
        return out

    def _trusted_keys(self) -> list[Any]:
        if self._keys is None:
            keys = []
            for p in self.settings.trusted_keys:
                try:
                    keys.append(load_public_key(p))
                except (OSError, ValueError) as exc:
                    log.error("trusted key %s unusable: %s", p, exc)
            self._keys = keys
        return self._keys

    def ingest_entry(self, name: str, *, expect: tuple[str, str] | None = None
                     ) -> IngestResult | None:
        """Ingest one complete build ``incoming/<name>`` (dir or archive); blocking.

        Returns None when there is nothing to do (already handled, or cancelled).
        Order makes kill -9 safe anywhere: unpack/verify in staging -> fsync ->
        rename into store/ -> auto-activate -> only then remove the incoming copy.
        """
        name = name.removesuffix(READY_SUFFIX)
        if not name or "/" in name or is_ignored_name(name):
            return None
        with self._ingest_lock:
            src = self.layout.incoming / name
            marker = self.layout.incoming / (name + READY_SUFFIX)
            if not os.path.lexists(src):
                return None
            t0 = time.monotonic()
            stage = Path(tempfile.mkdtemp(prefix="ingest-", dir=self.layout.staging))
            m: Manifest | None = None
            try:
                unpacked = stage / "build"
                if src.is_dir() and not src.is_symlink():
                    copy_tree(src, unpacked, allow_devices=self.settings.allow_devices,
                              cancel=self.cancel)
                elif src.is_file() and not src.is_symlink():
                    unpack_archive(src, unpacked, allow_devices=self.settings.allow_devices,
                                   cancel=self.cancel)
                else:
                    raise Rejected("not a directory or a regular file")
                root = find_root(unpacked)
                m = _peek_manifest(root)  # for the reason file, should validation fail
                m = validate_build(root, require_signature=self.settings.require_signature,
                                   keys=self._trusted_keys() if self.settings.require_signature
                                   else [], cancel=self.cancel)
                if expect and (m.image, m.version) != expect:
                    raise Rejected(f"upload names {expect[0]}/{expect[1]} but the manifest "
                                   f"says {m.image}/{m.version}")
                t_valid = time.monotonic()
                result = self._promote(name, root, m)
                result.seconds = time.monotonic() - t0
                result.verify_seconds = t_valid - t0
                result.swap_seconds = result.seconds - result.verify_seconds
            except Rejected as exc:
                result = self._reject(name, src, marker, exc.reason, m)
                result.seconds = time.monotonic() - t0
                return result
            except Cancelled:
                log.info("ingest of %s cancelled (stopping); it stays in incoming/", name)
                return None
            finally:
                shutil.rmtree(stage, ignore_errors=True)
                _make_removable(stage)
            self._consume(src, marker)
        log.info("ingested %s %s from %s (%d bytes, %.2f s)%s", result.image, result.version,
                 name, result.bytes, result.seconds,
                 f", active on {result.activated}" if result.activated else "",
                 extra={"image": result.image, "version": result.version})
        if not result.already_present:
            self._event(f"ingested {result.image} {result.version}", image=result.image,
                        version=result.version, bytes=result.bytes,
                        seconds=round(result.seconds, 3), outcome="ingested")
        self._changed()
        return result

    def _promote(self, name: str, root: Path, m: Manifest) -> IngestResult:
        dest = self.layout.version_dir(m.image, m.version)
        new_bytes = (root / MANIFEST).read_bytes()
        already = False
        if dest.exists():
            self.manifest(m.image, m.version)
            with self._lock:
                hit = self._manifests.get((m.image, m.version))
            if hit is None or hit[1] != new_bytes:
                raise Rejected(f"version exists: {m.image} {m.version} is already in the store "
                               "with different content (versions are never overwritten)")
            already = True  # a crash after promotion: finish the job
        else:
            fsync_tree(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(dest.parent.parent)
            try:
                os.rename(root, dest)
            except OSError as exc:  # a concurrent ingest of the same version won
                raise Rejected(f"version exists: {m.image} {m.version} ({exc})") from None
            fsync_dir(dest.parent)
        result = IngestResult(name=name, accepted=True, image=m.image, version=m.version,
                              bytes=m.total_size, already_present=already)
        channel = self.settings.auto_activate.get(m.image, self.settings.auto_activate.get("*"))
        if channel and not any(h.get("image") == m.image and h.get("version") == m.version
                               and h.get("channel") == channel for h in self.history(m.image)):
            self.activate(m.image, m.version, channel, by="auto",
                          why=f"auto_activate for {m.image}")
            result.activated = channel
        return result

    def _consume(self, src: Path, marker: Path) -> None:
        """Remove the incoming copy: first renamed to a dot name (atomic, ignored), then
        deleted, so a crash mid-delete never leaves half a build that looks new."""
        gone = self.layout.incoming / f"{DONE_PREFIX}{src.name}-{os.getpid()}-{time.time_ns()}"
        os.rename(src, gone)
        if marker.exists():
            marker.unlink()
        fsync_dir(self.layout.incoming)
        _remove(gone)

    def _reject(self, name: str, src: Path, marker: Path, reason: str, m: Manifest | None
                ) -> IngestResult:
        log.warning("rejected %s: %s", name, reason, extra={"build": name})
        dest_name = name
        if os.path.lexists(self.layout.rejected / dest_name):
            dest_name = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
        info = {"reason": reason, "when": _now_iso(), "source": name}
        if m is not None:
            info.update(image=m.image, version=m.version)
        write_json_atomic(self.layout.rejected / (dest_name + ".reason"), info)
        os.rename(src, self.layout.rejected / dest_name)
        if marker.exists():
            marker.unlink()
        fsync_dir(self.layout.incoming)
        if self.metrics is not None:
            self.metrics.ingest_failures.inc()
        self._event(f"rejected {name}: {reason}", file=name, reason=reason,
                    image=m.image if m else None, version=m.version if m else None,
                    outcome="rejected")
        return IngestResult(name=dest_name, accepted=False, reason=reason,
                            image=m.image if m else None, version=m.version if m else None)

    async def ingest_upload(self, name: str, version: str,
                            stream: BinaryIO | AsyncIterator[bytes] | Iterable[bytes],
                            *, max_bytes: int | None = None) -> dict[str, Any]:
        """HTTP ``PUT /api/v1/images/<name>/<version>``: store the tarball body in incoming/
        (temp dot name + rename, so a crash mid-upload leaves nothing that looks like a
        build), then ingest it now and return ``IngestResult.to_dict()``.

        ``stream``: an async iterator of bytes (aiohttp ``request.content.iter_chunked``),
        a sync iterable of bytes, or a binary file object. Raises StoreError for a bad
        name/version or an upload larger than ``max_bytes``.
        """
        try:
            check_name(name, "image name")
            check_name(version, "version")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        incoming = self.layout.incoming
        tmp = incoming / f".upload-{name}-{version}-{os.getpid()}-{time.time_ns()}.partial"
        fh = await asyncio.to_thread(open, tmp, "wb")  # closed below (also on error)
        head = b""
        total = 0
        try:
            async for chunk in _chunks(stream):
                if not chunk:
                    continue
                if len(head) < 4:
                    head += chunk[: 4 - len(head)]
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise StoreError(f"upload larger than {max_bytes} bytes")
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(_flush_sync, fh)
            fh.close()
            final = f"{name}-{version}{detect_suffix(head)}"
            if os.path.lexists(incoming / final):
                raise StoreError(f"an upload of {name} {version} is already pending")
            os.rename(tmp, incoming / final)
            fsync_dir(incoming)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        result = await asyncio.to_thread(self.ingest_entry, final, expect=(name, version))
        if result is None:
            return {"name": final, "accepted": False, "reason": "ingest was interrupted; "
                    "the upload stays in incoming/ and is retried", "image": name,
                    "version": version}
        return result.to_dict()

    # -- helpers ---------------------------------------------------------------------------
    def _event(self, message: str, mac: str | None = None, **fields: Any) -> None:
        if self.events is not None:
            self.events.record("image", mac=mac, message=message, **fields)

    def notify_changed(self) -> None:
        """Tell listeners the store changed (also for changes another process made)."""
        self._changed()

    def _changed(self) -> None:
        for fn in list(self.on_change):
            try:
                fn()
            except Exception:
                log.exception("store on_change listener failed")


def _peek_manifest(root: Path) -> Manifest | None:
    try:
        return parse_manifest((root / MANIFEST).read_bytes())
    except (OSError, ManifestError):
        return None


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    if hasattr(stream, "__aiter__"):
        async for chunk in stream:
            yield bytes(chunk)
    elif hasattr(stream, "read"):
        while True:
            chunk = await asyncio.to_thread(stream.read, 1 << 20)
            if not chunk:
                break
            yield chunk
    else:
        for chunk in stream:
            yield bytes(chunk)


def _flush_sync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _make_removable(path)
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _make_removable(path: Path) -> None:
    """A build may contain read-only directories (0555); rmtree as non-root needs u+w."""
    if not path.exists() or os.geteuid() == 0:
        return
    for cur, dirs, _files in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(cur, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
