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
    """Bytes in SI units (kB, MB, GB; 1000-based), as the CLI prints them."""
    try:
        size = float(n)
    except (TypeError, ValueError):
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


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


def _store_bytes(ctx: HttpContext) -> dict[str, int] | None:
    """The whole store's logical and physical bytes (versions share files), if known."""
    store = ctx.catalogue
    try:
        return store.bytes_used() if store is not None and hasattr(store, "bytes_used") \
            else None
    except Exception:  # noqa: BLE001 - the page must render even if the store is sick
        return None


def _services(ctx: HttpContext) -> list[dict[str, Any]]:
    out = []
    for name, h in ctx.daemon.health().items():
        detail = h.get("error") or ", ".join(str(b) for b in h.get("bound", []) or [])
        out.append({"name": name, "ok": bool(h.get("ok")), "detail": detail})
    return out


#: Inventory nodes per page; unknown machines shown (most recent first) before "N more".
PAGE_SIZE = 100
UNKNOWN_SHOWN = 5
#: Events in the recent-events panel.
EVENTS_SHOWN = 50


def _node_row(ctx: HttpContext, n: Any, now: float) -> dict[str, Any]:
    d = n.model_dump()
    d["seen"] = relative(n.last_seen, now)
    d["timeline"] = [dict(t, ago=relative(t["ts"], now)) for t in timeline(ctx, n.mac)]
    if not n.known:
        d["what"] = "unknown machine"  # not "default · worker": nothing was decided for it
    elif n.action == "local":
        d["what"] = "boots from its own disk"
    else:
        d["what"] = f"{n.profile} · {n.role}"
    return d


def _nfs_warnings(ctx: HttpContext, health: dict[str, dict[str, Any]],
                  images: list[dict[str, Any]]) -> list[str]:
    """What the NFS roots of active versions need and nothing provides, said plainly."""
    store = ctx.catalogue
    active = {(img["name"], v) for img in images for v in img.get("channels", {}).values()}
    try:
        refs = store.all_refs() if store is not None and hasattr(store, "all_refs") else []
    except Exception:  # noqa: BLE001 - the page must render even if the store is sick
        refs = []
    roots = sorted(str(r.root / r.boot["rootfs"]) for r in refs
                   if r.boot.get("rootfs") and (r.name, r.version) in active)
    if not roots:
        return []
    nfs = health.get("nfs")
    if nfs is None:
        return [(f"{len(roots)} active image version(s) boot with an NFS root, but the NFS "
                 "service is not running: nothing exports them, so those machines stop after "
                 "their kernel.")]
    if nfs.get("backend") in (None, "none"):
        return [(f"{len(roots)} active image version(s) boot with an NFS root, but nfs.backend "
                 "is none: netbootd only lists what it would export, nothing exports them, and "
                 "those machines stop after their kernel. Set nfs.backend to exportfs or "
                 "ganesha.")]
    if nfs.get("error"):
        return [f"NFS exports could not be applied ({nfs.get('backend')}): {nfs['error']}"]
    exported = {str(e.get("path")) for e in nfs.get("exports") or []}
    missing = [r for r in roots if r not in exported]
    if missing:
        return [f"not exported although planned: {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
    return []


def _events(ctx: HttpContext, node: str | None, now: float) -> list[dict[str, Any]]:
    evs = ctx.events.timeline(node)[-EVENTS_SHOWN:] if node else \
        ctx.events.recent(EVENTS_SHOWN)
    out = []
    for ev in sorted(evs, key=lambda e: e.ts, reverse=True)[:EVENTS_SHOWN]:
        out.append({"ts": ev.ts, "ago": relative(ev.ts, now), "kind": ev.kind,
                    "mac": ev.mac, "message": ev.message, "replica": ev.replica,
                    "when": time.strftime("%H:%M:%S", time.localtime(ev.ts)),
                    "outcome": str(ev.fields.get("outcome", ""))})
    return out


def page_context(ctx: HttpContext, query: dict[str, str] | None = None) -> dict[str, Any]:
    query = query or {}
    now = time.time()
    everyone = all_nodes(ctx)
    known = sorted((n for n in everyone if n.known), key=lambda n: n.hostname)
    unknown = sorted((n for n in everyone if not n.known), key=lambda n: -(n.last_seen or 0))
    pages = max(1, -(-len(known) // PAGE_SIZE))
    try:
        page = min(max(1, int(query.get("page", "1"))), pages)
    except ValueError:
        page = 1
    shown = known[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    all_unknown = query.get("unknown") == "all"
    nodes = [_node_row(ctx, n, now) for n in shown]
    strangers = [_node_row(ctx, n, now) for n in
                 (unknown if all_unknown else unknown[:UNKNOWN_SHOWN])]
    node_filter = query.get("node") or None
    if node_filter:
        try:
            from ..model import normalise_mac

            node_filter = normalise_mac(node_filter)
        except ValueError:
            match = [n.mac for n in known if n.hostname == node_filter.lower()]
            node_filter = match[0] if match else node_filter
    # machines the daemon ignored (not in the fleet) have no rows: a count and a sample
    ignored_total, ignored_recent = (ctx.events.ignored() if hasattr(ctx.events, "ignored")
                                     else (0, []))
    images, rejected, store_error = _images(ctx)
    ready, _ = readiness(ctx)
    health = ctx.daemon.health()
    counts = {p: sum(1 for n in everyone if n.phase == p) for p in ("booted", "joined", "failed")}
    counts["installing"] = sum(1 for n in known if n.lifecycle == "installing")
    return {
        "version": __version__, "host": socket.gethostname(), "now": now,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "nodes": nodes, "known_total": len(known), "page": page, "pages": pages,
        "page_size": PAGE_SIZE, "unknown": strangers, "unknown_total": len(unknown),
        "all_unknown": all_unknown, "ignored_total": ignored_total,
        "ignored_recent": [(mac, relative(ts, now)) for mac, ts in ignored_recent[:UNKNOWN_SHOWN]],
        "images": images, "rejected": rejected, "store_error": store_error,
        "store_bytes": _store_bytes(ctx),
        "services": _services(ctx), "ready": ready, "config_error": ctx.daemon.config_error(),
        "counts": counts, "relative": lambda ts: relative(ts, now),
        "nfs_warnings": _nfs_warnings(ctx, health, images),
        "events": _events(ctx, node_filter, now), "node_filter": node_filter,
        "cluster": _cluster(health, images, now),
    }


def _cluster(health: dict[str, dict[str, Any]], images: list[dict], now: float
             ) -> dict[str, Any] | None:
    """The replicas panel (``cluster.backend: etcd``): who is live, what each holds,
    whether each holds every active version, etcd's health. None on a single daemon."""
    h = health.get("cluster")
    if h is None:
        return None
    active = sorted({f"{i['name']} {v}" for i in images
                     for v in (i.get("channels") or {}).values()})
    rows = []
    for name, r in (h.get("replicas") or {}).items():
        held = set(r.get("versions") or [])
        rows.append({"name": name, "me": name == h.get("replica"), "held": len(held),
                     "missing": [a for a in active if a not in held],
                     "since": relative(r["since"], now) if r.get("since") else ""})
    rep = h.get("replication") or {}
    return {"ok": bool(h.get("ok")), "error": h.get("error", ""), "replica": h.get("replica"),
            "members": h.get("etcd_members") or [], "endpoints": h.get("endpoints") or [],
            "rows": rows, "copying": rep.get("copying"), "failed": rep.get("failed") or {},
            "sessions": h.get("sessions") or {}, "leader": h.get("leader") or "",
            "quorum": h.get("activation_quorum", "all")}


async def index(request: web.Request) -> web.Response:
    denied = auth.check(request, mutating=False)
    if denied is not None:
        return denied
    query = {k: v for k, v in request.query.items() if k in ("page", "node", "unknown")}
    page = await asyncio.to_thread(page_context, context(request), query)  # off the loop
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
