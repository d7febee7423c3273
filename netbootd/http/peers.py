"""/cluster/v1/builds/<image>/<version>.tar: a stored version as a build, for other replicas.

With ``cluster.backend: etcd`` each replica keeps its own store; a build ingested by
one is copied to the others (``cluster/replication.py``) by asking this route of a
replica that holds it. The answer is the version directory as an uncompressed tar
(manifest.json, its signature if any, every artefact), which the receiving replica
ingests like any upload: every artefact is verified against the manifest's sha256
there, and the manifest's own hash against the one the holder announced in etcd, so
nothing here needs trusting. Read-only, like ``/files``: images never hold secrets
(docs/security.md). Served only when the daemon runs as a replica.
"""

from __future__ import annotations

import asyncio
import logging
import tarfile
import threading
from typing import Any

from aiohttp import web

from .util import context, valid_name

log = logging.getLogger("netbootd.http.peers")

CHUNK = 1 << 20


class _QueueWriter:
    """A file-like sink that hands tarfile's bytes to the event loop in chunks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None],
                 cancelled: threading.Event) -> None:
        self.loop = loop
        self.queue = queue
        self.cancelled = cancelled
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise OSError("client went away")
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            chunk, self.buf = bytes(self.buf), bytearray()
            # bounded queue: the thread waits for the network, never buffers a rootfs
            asyncio.run_coroutine_threadsafe(self.queue.put(chunk), self.loop).result()


async def build_tar(request: web.Request) -> web.StreamResponse:
    image, version = request.match_info["image"], request.match_info["version"]
    if not (valid_name(image) and valid_name(version)):
        raise web.HTTPBadRequest(text="bad image or version name")
    ctx = context(request)
    ref = await asyncio.to_thread(ctx.artefacts.ref, image, version)
    if ref is None:
        raise web.HTTPNotFound(text=f"{image} {version} is not held here")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
    cancelled = threading.Event()
    sink = _QueueWriter(loop, queue, cancelled)

    def produce() -> None:
        try:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for entry in sorted(ref.root.iterdir()):
                    tar.add(entry, arcname=entry.name, recursive=True)
            sink.flush()
        except Exception as exc:  # noqa: BLE001 - the reader sees a short stream
            log.warning("build export %s %s stopped: %s", image, version, exc)
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(None), loop)

    resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    await resp.prepare(request)
    worker = loop.run_in_executor(None, produce)
    try:
        while (chunk := await queue.get()) is not None:
            await resp.write(chunk)
    finally:
        cancelled.set()
        while not queue.empty():  # let a producer blocked on put() finish
            queue.get_nowait()
        await asyncio.shield(worker)
    await resp.write_eof()
    return resp


def routes() -> list[Any]:
    return [web.get("/cluster/v1/builds/{image}/{version}.tar", build_tar)]
