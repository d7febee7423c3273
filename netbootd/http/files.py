"""/files/<image>/<version>/<path>: the artefacts of one immutable image version.

Traversal is impossible by construction: the store's ``ImageRef`` for the version
carries the set of relative paths its manifest verified, and a request path is
looked up as a *key* in it (``Artefacts.open``), never joined onto a directory
first. The resolved file must also still lie inside the version directory, so a
symlink inside a rootfs cannot point the server elsewhere.

A download belongs to a boot: it refreshes the node's session and holds it open
while it runs, so a 100 MB initramfs that takes longer than ``boot.session_ttl``
cannot let the next file of the same boot be planned afresh.

aiohttp's ``FileResponse`` does the transfer (sendfile, single Range -> 206/416,
HEAD, ETag / If-None-Match -> 304, Last-Modified, Content-Length); measured at
nginx speed (docs/http.md), so it is not rewritten here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..model import ImageRef
from .util import SERVICE, context, malformed, valid_name, who_is

log = logging.getLogger("netbootd.http.files")

#: Versions never change once in the store; caches may keep them forever.
IMMUTABLE = "public, max-age=31536000, immutable"


class RefCache:
    """(image, version) -> ImageRef, so a download does not ask the store per request.

    The store parses a version's manifest once (a rootfs lists tens of thousands of
    files: that first parse runs off the loop); a version GC deleted fails
    ``Artefacts.open`` and is dropped here.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._refs: dict[tuple[str, str], ImageRef] = {}

    async def get(self, request: web.Request, image: str, version: str) -> ImageRef | None:
        key = (image, version)
        hit = self._refs.get(key)
        if hit is not None:
            return hit
        ref = await asyncio.to_thread(context(request).artefacts.ref, image, version)
        if ref is not None:
            if len(self._refs) >= self._size:
                self._refs.pop(next(iter(self._refs)))
            self._refs[key] = ref
        return ref

    def drop(self, image: str, version: str) -> None:
        self._refs.pop((image, version), None)


REFS_KEY: web.AppKey[RefCache] = web.AppKey("netbootd_refs", RefCache)


class ArtefactResponse(web.FileResponse):
    """A FileResponse that serves exactly the named file and reports how it went."""

    def __init__(self, path: Path, done: Callable[[ArtefactResponse, float, str], None],
                 start: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._done = done
        self._on_start = start

    def _get_file_path_stat_encoding(self, accept_encoding: str) -> Any:
        # aiohttp would otherwise substitute a sibling "x.gz"/"x.br" for "x" when the
        # client accepts gzip/br. An artefact's bytes must be what its manifest sha256
        # says, so pre-compressed siblings are never used (tested).
        return super()._get_file_path_stat_encoding("")

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:  # FileResponse.prepare is not idempotent; the server calls it
            return self._payload_writer
        ctx = context(request)  # type: ignore[arg-type]
        gauge = ctx.metrics.active_transfers.labels(SERVICE)
        gauge.inc()
        t0 = time.monotonic()
        outcome = "aborted"
        self._on_start()  # paired with _done in finally: a hold is always released
        try:
            writer = await super().prepare(request)
            outcome = "ok"
            return writer
        finally:
            gauge.dec()
            self._done(self, time.monotonic() - t0, outcome)


async def serve_file(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    image = request.match_info["image"]
    version = request.match_info["version"]
    rel = request.match_info["path"]
    if not (valid_name(image) and valid_name(version)):
        return malformed(request, "not found", status=404)
    refs = request.app[REFS_KEY]
    ref = await refs.get(request, image, version)
    real = ctx.artefacts.open(ref, rel) if ref is not None else None
    if real is None:
        if ref is not None and not ref.root.is_dir():
            refs.drop(image, version)  # deleted by GC since it was cached
        elif ref is not None and rel in ref.artefacts:
            log.warning("artefact %s/%s/%s resolves outside its version; refused",
                        image, version, rel)
        ctx.metrics.requests.labels(SERVICE, "not_found").inc()
        return web.json_response({"error": "not found"}, status=404)
    remote = request.remote or ""
    method = request.method
    # A download of a node in a boot refreshes its session and holds it open while it runs.
    mac = who_is(ctx, remote)
    if mac is not None and ctx.plans.current(mac) is None:
        mac = None

    def start() -> None:
        if mac is not None:
            ctx.plans.hold(mac)

    def done(resp: ArtefactResponse, seconds: float, outcome: str) -> None:
        if mac is not None:
            ctx.plans.release(mac)
        status = resp.status
        sent = (resp.content_length or 0) if status in (200, 206) and method != "HEAD" else 0
        if outcome == "ok" and status >= 400:
            outcome = "not_found" if status == 404 else "error"
        ctx.metrics.requests.labels(SERVICE, outcome).inc()
        if sent:
            ctx.metrics.bytes_sent.labels(SERVICE).inc(sent)
            ctx.metrics.transfer_seconds.labels(SERVICE).observe(seconds)
        if status in (200, 206) and method != "HEAD":
            ctx.events.record("http", mac or who_is(ctx, remote),
                              f"served {image}/{version}/{rel}", ip=remote or None,
                              file=f"/files/{image}/{version}/{rel}", bytes=sent,
                              seconds=round(seconds, 3), image=image, version=version,
                              outcome=outcome)

    return ArtefactResponse(real, done, start, headers={"Cache-Control": IMMUTABLE})


#: The path segment that names a channel instead of a version (never a version name).
CHANNELS = "channels"


async def channel_file(request: web.Request) -> web.StreamResponse:
    """``/files/<image>/channels/<channel>/<path>``: a stable URL for "the current prod
    image" (CI, upgrade scripts, nodes that upgrade themselves). It answers 302 to the
    immutable versioned URL, never the bytes themselves: caches keep versioned bytes
    only, and a client that resumes a download uses the Location it was sent, so a
    channel that moves meanwhile cannot splice two versions into one file."""
    ctx = context(request)
    image = request.match_info["image"]
    channel = request.match_info["channel"]
    rel = request.match_info["path"]
    if not (valid_name(image) and valid_name(channel)):
        return malformed(request, "not found", status=404)
    catalogue = ctx.catalogue
    version = await asyncio.to_thread(catalogue.active, image, channel) \
        if catalogue is not None else None
    if version is None:
        ctx.metrics.requests.labels(SERVICE, "not_found").inc()
        return web.json_response({"error": f"no version of {image} active on {channel}"},
                                 status=404)
    ctx.metrics.requests.labels(SERVICE, "redirect").inc()
    raise web.HTTPFound(f"/files/{image}/{version}/{rel}",
                        headers={"Cache-Control": "no-store"})


def routes() -> list[web.RouteDef]:
    return [web.get(f"/files/{{image}}/{CHANNELS}/{{channel}}/{{path:.+}}", channel_file),
            web.get("/files/{image}/{version}/{path:.+}", serve_file)]
