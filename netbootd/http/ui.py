"""The status page ``/``: what a person opens first.

Server-rendered (jinja2, autoescape on: hostnames and messages come from the
network), no front-end build. It reloads its own content every few seconds with
a few lines of JS (``static/status.js``), or a meta refresh without JS.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from .. import __version__
from . import auth
from .api import all_nodes
from .context import HttpContext
from .metrics import readiness
from .util import context

HERE = Path(__file__).parent
#: Event kinds drawn as dots of the boot timeline, in boot order.
PHASES = ("dhcp", "tftp", "http", "kernel", "booted", "provisioned", "installed", "joined",
          "failed")
_ENV_KEY: web.AppKey[jinja2.Environment] = web.AppKey("netbootd_ui_env", jinja2.Environment)


def relative(ts: float | None, now: float) -> str:
    """'12 s ago', '3 min ago', '2 h ago', '5 d ago'; '—' when never."""
    if not ts:
        return "—"
    d = max(0, now - ts)
    if d < 5:
        return "just now"
    if d < 60:
        return f"{int(d)} s ago"
    if d < 3600:
        return f"{int(d // 60)} min ago"
    if d < 86400:
        return f"{int(d // 3600)} h ago"
    return f"{int(d // 86400)} d ago"


def human_size(n: Any) -> str:
    """Bytes as B / KiB / MiB / GiB with one decimal."""
    try:
        size = float(n)
    except (TypeError, ValueError):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def timeline(ctx: HttpContext, mac: str, limit: int = 8) -> list[dict[str, Any]]:
    """The node's last phases, consecutive repeats folded (one dot per step of a boot)."""
    dots: list[dict[str, Any]] = []
    for ev in ctx.events.timeline(mac):
        if ev.kind not in PHASES or ev.fields.get("outcome") in ("aborted", "ignored"):
            continue
        if dots and dots[-1]["kind"] == ev.kind:
            dots[-1].update(ts=ev.ts, count=dots[-1]["count"] + 1, message=ev.message)
            continue
        dots.append({"kind": ev.kind, "ts": ev.ts, "count": 1, "message": ev.message})
    return dots[-limit:]


def _images(ctx: HttpContext) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    store = ctx.catalogue
    if store is None:
        return [], [], "image store not running"
    try:
        images = store.list_images()
        rejected = store.rejected() if hasattr(store, "rejected") else []
    except Exception as exc:  # noqa: BLE001 - the page must render even if the store is sick
        return [], [], f"image store error: {exc}"
    return images, rejected, None


def _services(ctx: HttpContext) -> list[dict[str, Any]]:
    out = []
    for name, h in ctx.daemon.health().items():
        detail = h.get("error") or ", ".join(str(b) for b in h.get("bound", []) or [])
        out.append({"name": name, "ok": bool(h.get("ok")), "detail": detail})
    return out


def page_context(ctx: HttpContext) -> dict[str, Any]:
    now = time.time()
    nodes = []
    for n in sorted(all_nodes(ctx), key=lambda n: (not n.known, n.hostname)):
        d = n.model_dump()
        d["seen"] = relative(n.last_seen, now)
        d["timeline"] = [dict(t, ago=relative(t["ts"], now)) for t in timeline(ctx, n.mac)]
        nodes.append(d)
    images, rejected, store_error = _images(ctx)
    ready, _ = readiness(ctx)
    counts = {p: sum(1 for n in nodes if n["phase"] == p) for p in ("booted", "joined", "failed")}
    return {
        "version": __version__, "host": socket.gethostname(), "now": now,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "nodes": nodes, "images": images, "rejected": rejected, "store_error": store_error,
        "services": _services(ctx), "ready": ready, "config_error": ctx.daemon.config_error(),
        "counts": counts, "relative": lambda ts: relative(ts, now),
    }


async def index(request: web.Request) -> web.Response:
    denied = auth.check(request, mutating=False)
    if denied is not None:
        return denied
    page = await asyncio.to_thread(page_context, context(request))  # store reads: off the loop
    html = request.app[_ENV_KEY].get_template("status.html.j2").render(page)
    return web.Response(text=html, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


def setup(web_app: web.Application) -> None:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,  # everything rendered here is HTML with text from the network
        undefined=jinja2.StrictUndefined,
    )
    env.filters["size"] = human_size
    web_app[_ENV_KEY] = env
    web_app.router.add_get("/", index)
    web_app.router.add_static("/static/", HERE / "static", follow_symlinks=False,
                              append_version=False)
