"""/files/<image>/<version>/<path>: the artefacts of one immutable image version.

Traversal is impossible by construction: a request path is looked up as a *key* in
the version's manifest (the set of relative paths the store verified), never
joined onto a directory first. The resolved file must also still lie inside the
version directory, so a symlink inside a rootfs cannot point the server elsewhere.

aiohttp's ``FileResponse`` does the transfer (sendfile, single Range -> 206/416,
HEAD, ETag / If-None-Match -> 304, Last-Modified, Content-Length); measured at
nginx speed (docs/http.md), so it is not rewritten here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .util import SERVICE, malformed, the_app, valid_name

log = logging.getLogger("netbootd.http.files")

MANIFEST = "manifest.json"
#: Versions never change once in the store; caches may keep them forever.
IMMUTABLE = "public, max-age=31536000, immutable"


class ManifestIndex:
    """Artefact path sets per version directory, LRU-cached, keyed by manifest mtime.

    The mtime in the key means a version that GC deleted and a new upload re-created
    under the same name is re-read, not served from a stale set.
    """

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._cache: OrderedDict[tuple[Path, int], frozenset[str]] = OrderedDict()

    async def artefacts(self, root: Path) -> frozenset[str] | None:
        try:
            st = (root / MANIFEST).stat()
        except OSError:
            return None
        key = (root, st.st_mtime_ns)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        # A rootfs manifest can list tens of thousands of files: parse off the loop.
        paths = await asyncio.to_thread(_read_artefacts, root / MANIFEST)
        if paths is None:
            return None
        self._cache[key] = paths
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return paths


def _read_artefacts(path: Path) -> frozenset[str] | None:
    try:
        data = json.loads(path.read_bytes())
        return frozenset(str(a["path"]) for a in data.get("artefacts", ()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("unreadable manifest %s: %s", path, exc)
        return None


INDEX_KEY: web.AppKey[ManifestIndex] = web.AppKey("netbootd_manifests", ManifestIndex)


class ArtefactResponse(web.FileResponse):
    """A FileResponse that serves exactly the named file and reports how it went."""

    def __init__(self, path: Path, done: Callable[[ArtefactResponse, float, str], None],
                 **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._done = done

    def _get_file_path_stat_encoding(self, accept_encoding: str) -> Any:
        # aiohttp would otherwise substitute a sibling "x.gz"/"x.br" for "x" when the
        # client accepts gzip/br. An artefact's bytes must be what its manifest sha256
        # says, so pre-compressed siblings are never used (tested).
        return super()._get_file_path_stat_encoding("")

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:  # FileResponse.prepare is not idempotent; the server calls it
            return self._payload_writer
        app = the_app(request)  # type: ignore[arg-type]
        gauge = app.metrics.active_transfers.labels(SERVICE)
        gauge.inc()
        t0 = time.monotonic()
        outcome = "aborted"
        try:
            writer = await super().prepare(request)
            outcome = "ok"
            return writer
        finally:
            gauge.dec()
            self._done(self, time.monotonic() - t0, outcome)


async def serve_file(request: web.Request) -> web.StreamResponse:
    app = the_app(request)
    image = request.match_info["image"]
    version = request.match_info["version"]
    rel = request.match_info["path"]
    if not (valid_name(image) and valid_name(version)):
        return malformed(request, "not found", status=404)
    root = app.settings.paths.images / "store" / image / version
    artefacts = await request.app[INDEX_KEY].artefacts(root)
    if artefacts is None or rel not in artefacts:
        app.metrics.requests.labels(SERVICE, "not_found").inc()
        return web.json_response({"error": "not found"}, status=404)
    path = root / rel
    try:
        real = path.resolve(strict=True)
        inside = real.is_relative_to(root.resolve(strict=True))
    except OSError:
        inside = False
    if not inside:
        app.metrics.requests.labels(SERVICE, "not_found").inc()
        log.warning("artefact %s/%s/%s resolves outside its version; refused",
                    image, version, rel)
        return web.json_response({"error": "not found"}, status=404)
    remote = request.remote or ""
    method = request.method

    def done(resp: ArtefactResponse, seconds: float, outcome: str) -> None:
        status = resp.status
        sent = (resp.content_length or 0) if status in (200, 206) and method != "HEAD" else 0
        if outcome == "ok" and status >= 400:
            outcome = "not_found" if status == 404 else "error"
        app.metrics.requests.labels(SERVICE, outcome).inc()
        if sent:
            app.metrics.bytes_sent.labels(SERVICE).inc(sent)
            app.metrics.transfer_seconds.labels(SERVICE).observe(seconds)
        if status in (200, 206) and method != "HEAD":
            app.events.record("http", app.clients.mac_for(remote) if remote else None,
                              f"served {image}/{version}/{rel}", ip=remote or None,
                              file=f"/files/{image}/{version}/{rel}", bytes=sent,
                              seconds=round(seconds, 3), image=image, version=version,
                              outcome=outcome)

    return ArtefactResponse(real, done, headers={"Cache-Control": IMMUTABLE})


def routes() -> list[web.RouteDef]:
    return [web.get("/files/{image}/{version}/{path:.+}", serve_file)]
