"""Matchbox-compatible identity: ``GET /metadata?mac=…`` (or ``uuid=``, ``hostname=``).

Images built for matchbox ask this URL (``curl $METADATA_URL > /run/metadata``) and
source the answer, so it is served the way matchbox serves it: plain ``KEY=value``
lines, upper-case keys, nested values joined with ``_``, the machine's ``MAC`` and every
query parameter as ``REQUEST_QUERY_<NAME>`` plus ``REQUEST_RAW_QUERY``. ``Accept:
application/json`` (or ``?format=json``) gets the same data as a JSON object.

What netbootd knows of a node takes the place of a matchbox group's metadata: the
node's ``vars`` and ``labels``, its hostname, role, profile, and the image and version
it boots. Secrets are never part of it (they live only in the node's cloud-init
user-data, served under the strict address binding); ``metadata`` is for non-secret
facts, like matchbox's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ..model import Action, normalise_mac
from .util import SERVICE, context, malformed

_KEY = re.compile(r"[^A-Za-z0-9]+")


def flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    """``{"some": {"nested": {"data": 1}}}`` -> ``SOME_NESTED_DATA=1`` (matchbox's rule)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}_{k}" if prefix else str(k), v, out)
        return
    key = _KEY.sub("_", prefix).strip("_").upper()
    if not key:
        return
    if isinstance(value, bool):
        out[key] = "true" if value else "false"
    elif isinstance(value, list):
        out[key] = ",".join(str(v) for v in value)
    else:
        out[key] = "" if value is None else str(value)


async def metadata(request: web.Request) -> web.Response:
    ctx = context(request)
    q = request.query
    mac = None
    try:
        if "mac" in q:
            mac = normalise_mac(q["mac"])
    except ValueError:
        return malformed(request, "mac must be a MAC address")
    if mac is None and ("uuid" in q or "hostname" in q):
        mac = ctx.nodes.find(uuid=q.get("uuid"), hostname=q.get("hostname"))
    if mac is None:
        ctx.metrics.requests.labels(SERVICE, "not_found").inc()
        return web.json_response({"error": "no machine matches (selectors: mac, uuid, "
                                           "hostname)"}, status=404)
    plan = ctx.plans.current(mac) or ctx.plans.peek(ctx.nodes.facts_for(mac, request.remote))
    if plan.action is Action.IGNORE and not plan.node.known:
        ctx.metrics.requests.labels(SERVICE, "ignored").inc()
        return web.json_response({"error": "unknown machine"}, status=404)
    node = plan.node
    data: dict[str, Any] = {**node.labels, **node.vars, "hostname": node.hostname,
                            "role": node.role, "profile": node.profile,
                            "action": plan.action.value}
    if plan.image is not None:
        data.update(image=plan.image.name, version=plan.image.version)
    out: dict[str, str] = {}
    flatten("", data, out)
    out["MAC"] = mac
    for k, v in q.items():
        flatten(f"request_query_{k}", normalise_mac(v) if k == "mac" else v, out)
    out["REQUEST_RAW_QUERY"] = request.query_string
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    ctx.events.record("http", mac, "matchbox metadata", ip=request.remote, outcome="ok",
                      file="/metadata")
    if q.get("format") == "json" or "application/json" in request.headers.get("Accept", ""):
        return web.Response(text=json.dumps(out, sort_keys=True),
                            content_type="application/json", headers={"Cache-Control":
                                                                      "no-store"})
    text = "".join(f"{k}={v}\n" for k, v in out.items())
    return web.Response(text=text, content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


def routes() -> list[web.RouteDef]:
    return [web.get("/metadata", metadata)]
