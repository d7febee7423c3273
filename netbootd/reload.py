"""Hot reload of the inventory and templates: validate first, swap only if valid.

Why the *directory* is watched: editors and ``mv`` replace a file by renaming
a new one over it; a watch on the old inode would miss that (style.md). A
change is debounced, fully validated (YAML, schema, selectors, every template
for every node), and only then swapped in. A bad edit leaves the running
inventory in force and the error visible (log, event, status page, /readyz
stays ready: the old config still serves).

Only complete files are loaded. ``: > nodes.yaml`` followed by a rewrite, an
editor saving in two writes, or a copy still running would otherwise be read
half-way (0 nodes: DHCP silent for the fleet; one node of two; a hostname cut to
``x86-w``). So the sources are read as a snapshot that must come out the same
(size, mtime, inode and bytes of every file) twice, ``reload.settle_seconds``
apart, and what is validated and served is that snapshot, never a second read.
On top, a reload that would drop all nodes, or more than ``reload.max_node_loss``
of them, is refused unless the new file says ``allow_shrink: true``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from .app import App
from .gilshare import sharing_gil
from .inventory import Inventory
from .render import Renderer, is_source_name, scrub, template_sources
from .rendercheck import CheckCache
from .yamlfile import ConfigError, Problem

log = logging.getLogger("netbootd.reload")

#: A file that never stops changing is given up on after this many settle windows (the
#: watcher reloads again on its next change).
SETTLE_ROUNDS = 120


@dataclass(frozen=True)
class Sources:
    """The inventory text and every template source, read together."""

    inventory: str | None  #: None: the file is missing
    templates: dict[str, str]
    stamps: tuple = field(default=(), compare=True)  #: (path, size, mtime_ns, inode) each


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def read_sources(app: App) -> Sources:
    """One read of nodes.yaml and the template directory, with each file's stat."""
    inv = app.settings.paths.inventory
    tdir = app.settings.paths.templates
    stamps = [_stamp(inv)]
    if tdir.is_dir():
        for root, dirs, names in os.walk(tdir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            stamps.extend(_stamp(Path(root) / n) for n in sorted(names) if is_source_name(n))
    try:
        text: str | None = inv.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        text = None
    except OSError as exc:
        raise ConfigError.single(inv, 0, "", f"cannot read: {exc.strerror or exc}") from exc
    return Sources(inventory=text, templates=template_sources(tdir), stamps=tuple(stamps))


@dataclass
class SettleProbe:
    """What the settling step is doing, for tests that finish a write while the daemon
    waits for it (``waiting_on``: the nodes.yaml text being settled on)."""

    waiting_on: str | None = None
    changed: threading.Event = field(default_factory=threading.Event)


def settled_sources(app: App, *, probe: SettleProbe | None = None) -> Sources:
    """Sources that stayed identical over ``reload.settle_seconds``."""
    window = app.settings.reload.settle_seconds
    first = read_sources(app)
    if window <= 0:
        return first
    for _ in range(SETTLE_ROUNDS):
        if probe is not None:
            probe.waiting_on = first.inventory
        time.sleep(window)
        again = read_sources(app)
        if again == first:
            if probe is not None:
                probe.waiting_on = None
            return again
        if probe is not None:
            probe.changed.set()
        first = again
    raise ConfigError.single(app.settings.paths.inventory, 0, "",
                             f"still changing after {SETTLE_ROUNDS * window:.0f} s; "
                             "not loaded (write it elsewhere and rename it into place)")


def validate_config(app: App, sources: Sources | None = None) -> tuple[Inventory, Renderer]:
    """Load the inventory and check every template against it; raise ``ConfigError``.

    ``sources``: what to validate (a settled snapshot); default: read the files now."""
    inventory, renderer = load_config(app, sources)
    check_config(app, inventory, renderer)
    return inventory, renderer


def load_config(app: App, sources: Sources | None = None) -> tuple[Inventory, Renderer]:
    """The inventory (parsed and validated; ``ConfigError`` names file, line and field)
    and a renderer of the template sources, not yet checked against each other."""
    if sources is None:
        sources = read_sources(app)
    path = app.settings.paths.inventory
    if sources.inventory is None:
        raise ConfigError.single(path, 0, "", "cannot read: No such file or directory")
    inventory = app.inventory_loader.load(path, sources.inventory)
    renderer = Renderer(app.settings, sources.templates, check_cache=app.render.check_cache,
                        previous=app.render)
    return inventory, renderer


def check_config(app: App, inventory: Inventory, renderer: Renderer) -> None:
    """Render every template for every node of ``inventory``; raise ``ConfigError``.

    What earlier checks found per node carries over: a node whose content, templates
    and settings are unchanged is not rendered again (docs/configuration.md). A fresh
    daemon starts from what the last one saved."""
    cache = renderer.check_cache
    saved = check_cache_file(app)
    if cache.generation is None:
        cache.load(saved)
    before = cache.generation, len(cache.results)
    problems = renderer.check(inventory, app.planner.images, cache=cache)
    if problems:
        raise ConfigError(problems)
    if (cache.generation, len(cache.results)) != before or renderer.check_renders:
        cache.save(saved)


def check_started_config(app: App) -> str | None:
    """The check ``netbootd serve`` leaves until its services answer (start-up then
    costs the parse and validation of nodes.yaml only). Returns None, or the problems
    (also in ``config_error`` and the log) when the config the daemon started with is
    still in force and fails: the daemon then stops, as it would have refused to start."""
    inventory, renderer = app.inventory, app.render
    try:
        with sharing_gil():  # a thread beside the event loop (gilshare.py says why)
            check_config(app, inventory, renderer)
        # for the next start; before /readyz says ready, so a stop right then keeps it
        app.inventory_loader.save_snapshot()
    except ConfigError as exc:
        if app.inventory is not inventory:
            return None  # a reload replaced it meanwhile, checked in full
        text = scrub(str(exc), app.settings)
        app.config_error = text
        log.error("config rejected, stopping:\n%s", text)
        return text
    finally:
        app.config_pending = None
    log.info("config checked: every template renders for %d nodes", len(inventory.nodes))
    return None


def check_cache_file(app: App) -> Path:
    """Where the daemon keeps the keys of nodes whose templates rendered cleanly (a
    dot-file: a state directory inside the watched config tree never triggers a reload)."""
    return app.settings.paths.state / CheckCache.FILE_NAME


def shrink_problem(app: App, old: Inventory, new: Inventory) -> Problem | None:
    """Why ``new`` may not replace ``old``: it drops every node, or more than
    ``reload.max_node_loss`` of them, without ``allow_shrink: true``."""
    if new.allow_shrink or not old.nodes:
        return None
    lost = len(old.nodes.keys() - new.nodes.keys())
    share = lost / len(old.nodes)
    limit = app.settings.reload.max_node_loss
    if new.nodes and share <= limit:
        return None
    what = ("has no nodes at all" if not new.nodes else
            f"drops {lost} of {len(old.nodes)} nodes ({share:.0%} > reload.max_node_loss "
            f"{limit:.0%})")
    return Problem(str(app.settings.paths.inventory), 1, "nodes",
                   f"refused: the new file {what}; if that is intended, add "
                   "`allow_shrink: true` at the top level of the file (and remove it "
                   "once the reload is in force)")


def reload_now(app: App, *, probe: SettleProbe | None = None) -> str | None:
    """Reload once. Returns None on success, else the error text (old config kept)."""
    try:
        sources = settled_sources(app, probe=probe)
        with sharing_gil():  # in a thread beside the event loop (gilshare.py says why)
            inventory, renderer = validate_config(app, sources)
        shrink = shrink_problem(app, app.inventory, inventory)
        if shrink is not None:
            raise ConfigError([shrink])
    except ConfigError as exc:
        text = scrub(str(exc), app.settings)
        app.config_error = text
        app.metrics.config_reloads.labels("rejected").inc()
        app.events.record("config", None, "reload rejected; previous config still in force",
                          outcome="error", error=text[:2000])
        log.error("config reload rejected, previous config still in force:\n%s", text)
        return text
    changed = inventory.nodes != app.inventory.nodes or inventory.profiles != app.inventory.profiles
    app.inventory = inventory
    app.render = renderer
    app.config_error = None
    app.metrics.config_reloads.labels("ok").inc()
    if changed:
        # Open boot sessions keep their plan (a boot in flight is never changed); the
        # next boot of each machine sees the new inventory.
        app.events.record("config", None, "inventory reloaded", outcome="ok",
                          nodes=len(inventory.nodes))
        log.info("inventory reloaded: %d nodes, %d profiles", len(inventory.nodes),
                 len(inventory.profiles))
    for fn in app.on_reload:
        fn()
    return None


def watched_dirs(app: App) -> list[Path]:
    dirs = {app.settings.paths.inventory.parent.resolve(), app.settings.paths.templates.resolve()}
    return sorted(d for d in dirs if d.is_dir())


def _relevant(change: watchfiles.Change, path: str) -> bool:
    return is_source_name(Path(path).name)


async def watch_config(app: App, stop: asyncio.Event,
                       probe: SettleProbe | None = None) -> None:
    """Reload whenever something in the config or template directories changes."""
    dirs = watched_dirs(app)
    if not dirs:
        return
    loop = asyncio.get_running_loop()
    async for _changes in watchfiles.awatch(*dirs, watch_filter=_relevant, stop_event=stop,
                                           debounce=200, step=50, recursive=True):
        await loop.run_in_executor(None, lambda: reload_now(app, probe=probe))
