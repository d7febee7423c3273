"""Hot reload of the inventory and templates: validate first, swap only if valid.

Why the *directory* is watched: editors and ``mv`` replace a file by renaming
a new one over it; a watch on the old inode would miss that (style.md). A
change is debounced, fully validated (YAML, schema, selectors, every template
for every node), and only then swapped in. A bad edit leaves the running
inventory in force and the error visible (log, event, status page, /readyz
stays ready: the old config still serves).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import watchfiles

from .app import App
from .inventory import Inventory, load_inventory
from .render import Renderer
from .yamlfile import ConfigError

log = logging.getLogger("netbootd.reload")


def validate_config(app: App) -> tuple[Inventory, Renderer]:
    """Load the inventory and check every template against it; raise ``ConfigError``."""
    inventory = load_inventory(app.settings.paths.inventory)
    renderer = Renderer(app.settings)
    problems = renderer.check(inventory, app.planner.images)
    if problems:
        raise ConfigError(problems)
    return inventory, renderer


def reload_now(app: App) -> str | None:
    """Reload once. Returns None on success, else the error text (old config kept)."""
    try:
        inventory, renderer = validate_config(app)
    except ConfigError as exc:
        app.config_error = str(exc)
        app.metrics.config_reloads.labels("rejected").inc()
        app.events.record("config", None, "reload rejected; previous config still in force",
                          outcome="error", error=str(exc)[:2000])
        log.error("config reload rejected, previous config still in force:\n%s", exc)
        return str(exc)
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
    name = Path(path).name
    return not (name.startswith(".") or name.endswith(("~", ".swp", ".tmp")))


async def watch_config(app: App, stop: asyncio.Event) -> None:
    """Reload whenever something in the config or template directories changes."""
    dirs = watched_dirs(app)
    if not dirs:
        return
    async for _changes in watchfiles.awatch(*dirs, watch_filter=_relevant, stop_event=stop,
                                           debounce=200, step=50, recursive=True):
        await asyncio.get_running_loop().run_in_executor(None, reload_now, app)
