"""Builds copied between replicas by content hash, over HTTP, through the normal ingest.

Every replica announces in etcd (``cluster/service.py``) the versions it holds with the
sha256 of each version's ``manifest.json``: the manifest names the sha256 of every
artefact, so that one hash names the whole content. A replica that lacks a version
another one announces asks the holder for it (``GET /cluster/v1/builds/<image>/
<version>.tar``, ``http/peers.py``) and feeds the stream to its store's upload ingest,
which verifies every artefact against the manifest exactly as for a build dropped by CI
(signature policy included). Then the manifest's hash must equal the announced one;
a difference (two different builds under one version name) is reported, never hidden.

One copy at a time, so a new build does not take every replica's disk and network at
once; a failed copy is tried again after :attr:`Replicator.RETRY` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import aiohttp

log = logging.getLogger("netbootd.cluster.replication")


def manifest_hash(ref: Any) -> str:
    """sha256 of a stored version's manifest.json (names its whole content)."""
    return hashlib.sha256((ref.root / "manifest.json").read_bytes()).hexdigest()


class Replicator:
    RETRY = 30.0

    def __init__(self, store_of: Callable[[], Any], me: str) -> None:
        self._store_of = store_of
        self.me = me
        self.copied: list[str] = []
        #: "image version" -> (when, why) of the last failed copy (status page).
        self.failed: dict[str, tuple[float, str]] = {}
        self.copying: str | None = None

    def wanted(self, replicas: dict[str, dict], skip: Collection[tuple[str, str]] = ()
               ) -> list[tuple[str, str, str, str]]:
        """(image, version, manifest hash, holder URL) this replica lacks, oldest first;
        none in ``skip`` (versions the cluster retired: a copy would undo its GC)."""
        store = self._store_of()
        if store is None:
            return []
        mine = {f"{r.name} {r.version}" for r in store.all_refs()}
        out: dict[str, tuple[str, str, str, str]] = {}
        now = time.monotonic()
        for name, d in sorted(replicas.items()):
            if name == self.me or not d.get("url"):
                continue
            for key, digest in (d.get("hashes") or {}).items():
                failed = self.failed.get(key)
                if key in mine or key in out or (failed and now - failed[0] < self.RETRY):
                    continue
                image, _, version = key.partition(" ")
                if (image, version) in skip:
                    continue
                out[key] = (image, version, digest, d["url"])
        return list(out.values())

    async def step(self, replicas: dict[str, dict],
                   skip: Collection[tuple[str, str]] = ()) -> None:
        """Copy the first build this replica lacks (and the cluster did not retire)."""
        todo = self.wanted(replicas, skip)
        if not todo:
            return
        image, version, digest, url = todo[0]
        key = f"{image} {version}"
        self.copying = key
        try:
            await self._copy(image, version, digest, url)
            self.copied.append(key)
            self.failed.pop(key, None)
            log.info("copied %s %s from %s (manifest sha256 %s)", image, version, url,
                     digest[:12])
        except Exception as exc:  # noqa: BLE001 - reported, tried again later
            self.failed[key] = (time.monotonic(), f"{type(exc).__name__}: {exc}"[:300])
            log.warning("copying %s %s from %s failed: %s", image, version, url, exc)
        finally:
            self.copying = None

    async def _copy(self, image: str, version: str, digest: str, url: str) -> None:
        store = self._store_of()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(f"{url}/cluster/v1/builds/{image}/{version}.tar") as resp:
            if resp.status != 200:
                raise RuntimeError(f"holder answered {resp.status}: "
                                   f"{(await resp.text())[:200]}")
            result = await store.ingest_upload(image, version, resp.content.iter_chunked(1 << 20))
        if not result.get("accepted"):
            raise RuntimeError(f"ingest refused the copy: {result.get('reason')}")
        ref = store.ref(image, version)
        if ref is None:
            raise RuntimeError("ingest accepted the copy but the store does not list it")
        got = manifest_hash(ref)
        if got != digest:
            raise RuntimeError(f"{image} {version} here has manifest sha256 {got[:12]}, the "
                               f"holder announced {digest[:12]}: two different builds under "
                               "one version name")

    def health(self) -> dict[str, Any]:
        return {"copying": self.copying, "copied": len(self.copied),
                "failed": {k: why for k, (_, why) in self.failed.items()}}
