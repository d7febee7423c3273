"""/metrics (Prometheus text format), /healthz (alive) and /readyz (able to serve)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import auth
from .context import HttpContext
from .util import context


async def metrics(request: web.Request) -> web.Response:
    denied = auth.check(request, mutating=False)
    if denied is not None:
        return denied
    ctx = context(request)
    # generate_latest walks every collector; off the loop so a big registry never stalls it.
    body = await asyncio.to_thread(generate_latest, ctx.metrics.registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def healthz(request: web.Request) -> web.Response:
    """The process answers: that is all "alive" means."""
    return web.json_response({"ok": True})


def readiness(ctx: HttpContext) -> tuple[bool, dict[str, Any]]:
    """Ready = inventory loaded, checked, and every running service reports ok.

    A rejected reload does not make the daemon unready: the previous config still
    serves. It is reported (``config_error``) so the operator sees it.
    """
    reasons: list[str] = []
    services: dict[str, Any] = {}
    if not ctx.daemon.inventory_loaded():
        reasons.append("no inventory loaded")
    pending = ctx.daemon.config_pending()
    if pending:
        reasons.append(pending)
    for name, h in ctx.daemon.health().items():
        services[name] = h
        if not h.get("ok"):
            reasons.append(f"{name}: {h.get('error') or 'not ok'}")
    body = {"ready": not reasons, "reasons": reasons, "services": services,
            "config_error": ctx.daemon.config_error()}
    return not reasons, body


async def readyz(request: web.Request) -> web.Response:
    ok, body = readiness(context(request))
    return web.json_response(body, status=200 if ok else 503)


def routes() -> list[web.RouteDef]:
    return [web.get("/metrics", metrics), web.get("/healthz", healthz),
            web.get("/readyz", readyz)]
