"""REST API ``/api/v1``: nodes, images, plans, reload, node events.

One route table (:data:`OPS`) drives both aiohttp routing and the OpenAPI document,
so the two cannot drift apart. Bodies are validated by pydantic; every bad input is a
400/404/409 JSON error ``{"error": ...}``, counted as malformed, never a 500.
Store calls (file I/O, fsync) run in a thread so the event loop keeps serving boots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..errors import Conflict, DiskFull, NotFound, TooLarge
from ..lifecycle import Verdict
from ..model import Action, ClientFacts, ClientKind, NodeView, normalise_serial
from ..planner import effective_action, follows_channel
from ..render import RenderError
from . import auth
from .boot import beacon
from .context import HttpContext
from .models import (
    MAC_PATTERN,
    NAME_PATTERN,
    SERIAL_PATTERN,
    ActivateIn,
    EventIn,
    EventOut,
    GcIn,
    ImagesOut,
    NodeActionIn,
    NodeDetail,
    NodeList,
    NodeOut,
    Ok,
    PinIn,
    PlanOut,
    ReloadOut,
    RollbackIn,
)
from .openapi import Op, Param, document
from .util import SERVICE, context, json_error, parse_mac, server_info, valid_name

log = logging.getLogger("netbootd.http.api")

PREFIX = "/api/v1"
MAX_EVENT_BODY = 16 * 1024


class _Refused(Exception):
    """Raised inside a handler to answer with a JSON error (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _body(request: web.Request, model: type[BaseModel], limit: int = 64 * 1024) -> Any:
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise _Refused(413, f"body larger than {limit} bytes")
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[:3]
        text = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                         for e in first)
        raise _Refused(400, f"invalid body: {text}") from None


def _mac_param(request: web.Request) -> str:
    mac = parse_mac(request.match_info["mac"])
    if mac is None:
        raise _Refused(400, "not a MAC address")
    return mac


def _name_param(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if not valid_name(value):
        raise _Refused(400, f"invalid {key} {value!r}")
    return value


def _jsonable(obj: Any) -> Any:
    """Store results (dataclasses, pydantic models, Paths) -> plain JSON values."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return _jsonable(obj.to_dict())
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return str(obj)


async def _store(request: web.Request, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call the image store in a thread; map its typed errors to 404/409/400."""
    store = context(request).catalogue
    fn: Callable[..., Any] | None = getattr(store, method, None) if store is not None else None
    if fn is None:
        raise _Refused(409, "the image store is not running")
    try:
        if asyncio.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)
    except ValueError as exc:  # every store error is a ValueError: a user mistake, not a 500
        raise _Refused(status_for(exc), str(exc)) from None


def status_for(exc: BaseException) -> int:
    """The HTTP status of a typed error (errors.py); any other ValueError is a 400."""
    if isinstance(exc, DiskFull):
        return 507
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    return 400


# -- nodes -------------------------------------------------------------------------------
def _expected_action(ctx: HttpContext, view: NodeView) -> str:
    """The action a machine gets. Images are resolved only for installed nodes with
    ``upgrade: auto`` (their next boot installs when the channel moved), so the list
    stays cheap for every other node."""
    current = ctx.plans.current(view.mac)
    if current is not None:
        return current.action.value
    if not view.known and ctx.settings.policy.unknown == "ignore":
        return Action.IGNORE.value
    record = ctx.node_state.get(view.mac)
    if follows_channel(view, record):
        return ctx.plans.peek(ctx.nodes.facts_for(view.mac)).action.value
    action, _ = effective_action(view, record,
                                 retry_failed=ctx.settings.provision.retry_failed)
    return action.value


def node_out(ctx: HttpContext, mac: str, cls: type[NodeOut] = NodeOut, **extra: Any) -> NodeOut:
    view = ctx.nodes.view(ctx.nodes.facts_for(mac))
    state = ctx.events.nodes.get(mac)
    ip = (state.ip if state else None) or ctx.nodes.static_ip(mac) or ctx.addresses.ip_for(mac)
    rec = ctx.node_state.get(mac)
    if rec is not None:
        extra.setdefault("lifecycle", rec.stage.value)
        extra.setdefault("progress", rec.progress)
        if rec.image and rec.version:
            extra.setdefault("installed", f"{rec.image} {rec.version}")
    return cls(
        mac=mac, hostname=view.hostname, known=view.known, profile=view.profile,
        role=view.role, action=_expected_action(ctx, view), ip=ip,
        phase=state.phase if state else "unknown", image=state.image if state else None,
        version=state.version if state else None,
        last_seen=state.last_seen if state and state.last_seen else None,
        message=state.message if state else "", **extra)


def all_nodes(ctx: HttpContext) -> list[NodeOut]:
    macs = ctx.nodes.macs()
    known = set(macs)
    macs += [m for m in list(ctx.events.nodes) if m not in known]
    return [node_out(ctx, m) for m in macs]


async def list_nodes(request: web.Request) -> web.Response:
    return _json(NodeList(nodes=all_nodes(context(request))))


async def get_node(request: web.Request) -> web.Response:
    ctx = context(request)
    mac = _mac_param(request)
    events = ctx.events.timeline(mac)  # in a cluster also what other replicas saw
    if not ctx.nodes.known(mac) and mac not in ctx.events.nodes and not events:
        raise _Refused(404, f"no node {mac} (not in the inventory, never seen)")
    timeline = [EventOut(ts=e.ts, kind=e.kind, message=e.message, fields=_jsonable(e.fields),
                         replica=e.replica or None)
                for e in events]
    return _json(node_out(ctx, mac, NodeDetail, timeline=timeline))


async def pin_node(request: web.Request) -> web.Response:
    ctx = context(request)
    mac = _mac_param(request)
    body: PinIn = await _body(request, PinIn)
    image = body.image or ctx.nodes.view(ctx.nodes.facts_for(mac)).image \
        or ctx.settings.boot.default_image
    await _store(request, "pin", mac, body.version, image, by="api")
    return _json(Ok(message=f"{mac} pinned to {image} {body.version}"))


async def unpin_node(request: web.Request) -> web.Response:
    mac = _mac_param(request)
    await _store(request, "unpin", mac)
    return _json(Ok(message=f"{mac} unpinned"))


# -- images ------------------------------------------------------------------------------
async def list_images(request: web.Request) -> web.Response:
    images = _jsonable(await _store(request, "list_images"))
    rejected_fn = getattr(context(request).catalogue, "rejected", None)
    rejected = _jsonable(await _store(request, "rejected")) if rejected_fn else []
    has_bytes = getattr(context(request).catalogue, "bytes_used", None) is not None
    used = _jsonable(await _store(request, "bytes_used")) if has_bytes else {}
    return _json(ImagesOut(images=[_as_dict(i) for i in images or []],
                           rejected=[_as_dict(r) for r in rejected or []],
                           store=used if isinstance(used, dict) else {}))


def _as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {"value": v}


def _detail(result: Any) -> dict[str, Any]:
    j = _jsonable(result)
    return j if isinstance(j, dict) else ({} if j is None else {"result": j})


async def activate(request: web.Request) -> web.Response:
    name = _name_param(request, "name")
    body: ActivateIn = await _body(request, ActivateIn)
    await _store(request, "activate", name, body.version, body.channel, by="api")
    return _json(Ok(message=f"{name} {body.version} active on {body.channel}"))


async def rollback(request: web.Request) -> web.Response:
    name = _name_param(request, "name")
    body: RollbackIn = await _body(request, RollbackIn)
    version = await _store(request, "rollback", name, body.channel, by="api")
    return _json(Ok(message=f"{name} rolled back to {version} on {body.channel}",
                    detail={"version": version}))


async def gc(request: web.Request) -> web.Response:
    body: GcIn = await _body(request, GcIn)
    ctx = context(request)
    # The daemon's own pass when its store service runs: with replicas the leader's
    # decision for the cluster, never this replica's rules alone (docs/replicas.md).
    running = ctx.gc_pass(body.dry_run) if ctx.gc_pass is not None else None
    if running is not None:
        try:
            victims = await running
        except ValueError as exc:  # the store's typed errors, as _store maps them
            raise _Refused(status_for(exc), str(exc)) from None
    else:
        # Versions in open boot sessions are kept too: a boot in flight finishes on them.
        in_use = ctx.plans.versions_in_use()
        victims = await _store(request, "gc", dry_run=body.dry_run, in_use=in_use)
    listed = [{"image": i, "version": v} for i, v in victims or []]
    return _json(Ok(message=f"{'would delete' if body.dry_run else 'deleted'} "
                    f"{len(listed)} version(s)", detail={"versions": listed}))


async def upload(request: web.Request) -> web.Response:
    """Stream a build (tar / tar.gz / tar.zst) into the store's ingest.

    The body is never held in memory: the store writes it to a dot-file in incoming/
    (invisible to the watcher), renames it into place and ingests it at once.

    ``max_upload_bytes`` is a size limit, not a disk limit: the upload must also leave
    ``store.min_free_bytes`` free on the store's filesystem, checked against the
    Content-Length before a byte is written and every 64 MiB while it streams (chunked
    uploads have no length), so a big upload is refused with 507 (Insufficient
    Storage) and its partial file removed before the disk is full.
    """
    import os

    class DiskReserve(Exception):  # not a ValueError: the store must not map it to 4xx
        pass

    name = _name_param(request, "name")
    version = _name_param(request, "version")
    settings = context(request).settings
    limit = settings.http.max_upload_bytes
    reserve = settings.store.min_free_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _Refused(413, f"upload larger than http.max_upload_bytes ({limit} bytes)")
    where = settings.paths.images

    def free_bytes() -> int:
        st = os.statvfs(where if where.exists() else where.parent)
        return st.f_bavail * st.f_frsize

    def refusal(free: int, more: int) -> str:
        return (f"not enough disk space: {free} bytes free on the image store, the upload "
                f"needs {more} more and must leave store.min_free_bytes ({reserve}) free")

    free = await asyncio.to_thread(free_bytes)
    if free - (request.content_length or 0) < reserve:
        raise _Refused(507, refusal(free, request.content_length or 0))

    async def guarded() -> Any:
        since_check = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            since_check += len(chunk)
            if since_check >= 64 << 20:
                since_check = 0
                left = await asyncio.to_thread(free_bytes)
                if left < reserve:
                    raise DiskReserve(refusal(left, 0))
            yield chunk

    try:
        result = await _store(request, "ingest_upload", name, version, guarded(),
                              max_bytes=limit)
    except DiskReserve as exc:
        raise _Refused(507, str(exc)) from None
    detail = _detail(result)
    if not detail.get("accepted", True):
        raise _Refused(400, f"build rejected: {detail.get('reason') or 'invalid'}")
    return _json(Ok(message=f"{name} {version} ingested", detail=detail))


# -- plan, reload ------------------------------------------------------------------------
async def plan(request: web.Request) -> web.Response:
    ctx = context(request)
    q = request.query
    mac = parse_mac(q.get("mac", ""))
    if mac is None:
        raise _Refused(400, "query parameter mac must be a MAC address")
    try:  # a parameter that is present must be valid, even when empty
        serial = normalise_serial(q["serial"]) if "serial" in q else None
        arch = int(q["arch"]) if "arch" in q else None
        kind = ClientKind(q["kind"]) if "kind" in q else None
    except ValueError as exc:
        raise _Refused(400, str(exc)) from None
    if arch is not None and not 0 <= arch <= 0xFFFF:
        raise _Refused(400, "arch must be 0..65535")
    base = ctx.nodes.facts_for(mac)
    facts = ClientFacts(mac=mac, kind=kind or (ClientKind.RPI if serial else base.kind),
                        serial=serial or base.serial, arch=arch)
    p = await asyncio.to_thread(ctx.plans.peek, facts)
    out = PlanOut(mac=mac, action=p.action.value, hostname=p.node.hostname, known=p.node.known,
                  profile=p.node.profile, reason=p.reason,
                  image=p.image.name if p.image else None,
                  version=p.image.version if p.image else None,
                  channel=(p.image.channel if p.image else None) or p.node.channel or None,
                  pinned=bool(p.image and p.image.pinned))
    if p.action is not Action.IGNORE:
        server = server_info(request)
        for artefact, attr in (("ipxe", "ipxe"), ("cmdline.txt", "cmdline")):
            if artefact == "cmdline.txt" and p.image is None:
                continue
            try:
                setattr(out, attr, ctx.renderer.render(artefact, p, server))
            except RenderError as exc:
                out.render_errors.append(str(exc))
    return _json(out)


async def reload(request: web.Request) -> web.Response:
    ctx = context(request)
    error = await asyncio.to_thread(ctx.daemon.reload)
    if error:
        return web.json_response(ReloadOut(ok=False, error=error).model_dump(), status=409)
    return _json(ReloadOut(ok=True))


# -- from the nodes ----------------------------------------------------------------------
async def post_event(request: web.Request) -> web.Response:
    """A node reports a phase (JSON). Lifecycle phases need the boot's token and must
    come from the node's own address; see lifecycle.py."""
    ev: EventIn = await _body(request, EventIn, limit=MAX_EVENT_BODY)
    return _report(request, ev)


async def get_event(request: web.Request) -> web.Response:
    """The same report as a GET with query parameters, for initrds whose only HTTP
    client is busybox ``wget`` (no POST bodies worth the name)."""
    q = request.query
    raw = {k: q[k] for k in ("mac", "phase", "message", "image", "version", "token",
                             "reason") if k in q}
    if "progress" in q:
        try:
            raw["progress"] = int(q["progress"])
        except ValueError:
            raise _Refused(400, "progress must be a whole number 0..100") from None
    try:
        ev = EventIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[:3]
        text = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'query'}: {e['msg']}"
                         for e in first)
        raise _Refused(400, f"invalid query: {text}") from None
    return _report(request, ev)


def _report(request: web.Request, ev: EventIn) -> web.Response:
    ctx = context(request)
    outcome = ctx.lifecycle.report(ev.mac, ev.phase, token=ev.token, ip=request.remote or "",
                                   progress=ev.progress, reason=ev.reason, message=ev.message)
    if outcome.verdict is Verdict.FORBIDDEN:
        raise _Refused(403, outcome.message)
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    return _json(Ok(message=outcome.message))


async def node_action(request: web.Request) -> web.Response:
    """Operator verb: reinstall | local | netboot (the lifecycle, not nodes.yaml)."""
    ctx = context(request)
    mac = _mac_param(request)
    body: NodeActionIn = await _body(request, NodeActionIn)
    try:
        rec = await asyncio.to_thread(ctx.lifecycle.operator, mac, body.action, by="api")
    except ValueError as exc:
        raise _Refused(status_for(exc), str(exc)) from None
    return _json(Ok(message=f"{mac}: {body.action} (lifecycle {rec.stage.value})",
                    detail={"lifecycle": rec.stage.value, "rev": rec.rev}))


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi())


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status,
                        content_type="application/json")


_MAC = Param("mac", "path", {"type": "string", "pattern": MAC_PATTERN},
             description="MAC address (aa:bb:cc:dd:ee:ff, aa-bb-.., aabbccddeeff).")
_NAME = Param("name", "path", {"type": "string", "pattern": NAME_PATTERN},
              description="Image name.")
_VERSION = Param("version", "path", {"type": "string", "pattern": NAME_PATTERN},
                 description="Image version.")

#: The API. ``auth``: "none" = nodes call it, "read" = open when http.read_open,
#: "write" = bearer token always.
OPS: list[Op] = [
    Op("GET", "/nodes", list_nodes, "All nodes: inventory plus machines seen", response=NodeList,
       tags=("nodes",)),
    Op("GET", "/nodes/{mac}", get_node, "One node with its boot timeline", response=NodeDetail,
       params=(_MAC,), errors=(400, 404), tags=("nodes",)),
    Op("POST", "/nodes/{mac}/pin", pin_node, "Pin a node to an image version", auth="write",
       body=PinIn, response=Ok, params=(_MAC,), errors=(400, 404, 409, 413), tags=("nodes",)),
    Op("DELETE", "/nodes/{mac}/pin", unpin_node, "Remove a node's pin", auth="write",
       response=Ok, params=(_MAC,), errors=(400, 404, 409), tags=("nodes",)),
    Op("GET", "/images", list_images, "Images, versions, channels, rejected builds",
       response=ImagesOut, errors=(409,), tags=("images",)),
    Op("POST", "/images/gc", gc, "Delete unused versions", auth="write", body=GcIn,
       response=Ok, errors=(400, 409, 413), tags=("images",)),
    Op("POST", "/images/{name}/activate", activate, "Activate a version on a channel",
       auth="write", body=ActivateIn, response=Ok, params=(_NAME,),
       errors=(400, 404, 409, 413), tags=("images",)),
    Op("POST", "/images/{name}/rollback", rollback, "Point a channel at its previous version",
       auth="write", body=RollbackIn, response=Ok, params=(_NAME,),
       errors=(400, 404, 409, 413), tags=("images",)),
    Op("PUT", "/images/{name}/{version}", upload, "Upload a build (tar, tar.gz, tar.zst)",
       auth="write", body_media="application/octet-stream", response=Ok,
       # "activate"/"rollback" are sub-resources, not versions one can upload
       route_path="/images/{name}/{version:(?!activate$|rollback$)[^/]+}",
       params=(_NAME, _VERSION), errors=(400, 404, 409, 413, 507), tags=("images",)),
    Op("GET", "/plan", plan, "What a machine would get if it booted now", response=PlanOut,
       params=(Param("mac", "query", {"type": "string", "pattern": MAC_PATTERN}),
               Param("serial", "query", {"type": "string", "pattern": SERIAL_PATTERN},
                     required=False),
               Param("arch", "query", {"type": "integer", "minimum": 0, "maximum": 65535},
                     required=False),
               Param("kind", "query", {"type": "string", "enum": [k.value for k in ClientKind]},
                     required=False)),
       tags=("plan",)),
    Op("POST", "/reload", reload, "Reload inventory and templates", auth="write",
       response=ReloadOut, errors=(409,), tags=("config",)),
    Op("POST", "/events", post_event, "A node reports a boot phase", auth="none", body=EventIn,
       response=Ok, errors=(400, 403, 413), tags=("nodes",)),
    Op("GET", "/events", get_event, "A node reports a boot phase (query form for initrds)",
       auth="none", response=Ok, errors=(400, 403),
       params=(Param("mac", "query", {"type": "string", "pattern": MAC_PATTERN}),
               Param("phase", "query", {"type": "string"}),
               Param("token", "query", {"type": "string", "maxLength": 64}, required=False),
               Param("progress", "query", {"type": "integer", "minimum": 0, "maximum": 100},
                     required=False),
               Param("reason", "query", {"type": "string", "maxLength": 1000},
                     required=False),
               Param("message", "query", {"type": "string", "maxLength": 1000},
                     required=False)),
       tags=("nodes",)),
    Op("POST", "/nodes/{mac}/action", node_action,
       "Reinstall a node, hand it to its disk, or network-boot it", auth="write",
       body=NodeActionIn, response=Ok, params=(_MAC,), errors=(400, 404, 409, 413),
       tags=("nodes",)),
    Op("GET", "/beacon/{mac}", beacon, "Kernel handed over (fetched by iPXE)", auth="none",
       response_media="text/plain", params=(_MAC, Param("session", "query", {
           "type": "string", "pattern": "^[0-9A-Za-z]{0,64}$"}, required=False)),
       tags=("nodes",)),
]


def _wrap(op: Op) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        if op.auth != "none":
            denied = auth.check(request, mutating=op.auth == "write")
            if denied is not None:
                return denied
        try:
            return await op.handler(request)
        except _Refused as exc:
            metrics = context(request).metrics
            if exc.status in (400, 413):
                metrics.malformed.labels(SERVICE).inc()
            metrics.requests.labels(SERVICE, "client_error").inc()
            return json_error(exc.status, str(exc))

    handler.__name__ = op.handler.__name__
    return handler


@functools.cache
def openapi() -> dict[str, Any]:
    """The API's OpenAPI document, built on first request: building it (every model's
    JSON schema) costs ~80 ms that a daemon's start-up need not wait for."""
    doc = document([dataclasses.replace(o, path=PREFIX + o.path) for o in OPS], __version__)
    doc["paths"][PREFIX + "/openapi.json"] = {"get": {
        "summary": "This document", "operationId": "openapi", "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {
            "application/json": {"schema": {"type": "object"}}}}}}}
    return doc


def routes() -> list[web.RouteDef]:
    out = [web.get(PREFIX + "/openapi.json", openapi_json)]
    for op in OPS:
        if op.handler is beacon:
            continue  # routed by boot.py (its own validation); documented here
        out.append(web.route(op.method, PREFIX + (op.route_path or op.path), _wrap(op)))
    return out

