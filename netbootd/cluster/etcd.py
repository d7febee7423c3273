"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``), with aiohttp.

Why the gateway and not a gRPC client library: the one maintained asyncio client on
PyPI (``aetcd`` 1.0.0, Apache-2.0) installs here, but it is one maintainer's project,
brings ``grpcio`` and ``protobuf`` (native code, ~13 MB) whose generated stubs must
match each other, and gRPC's C core does not survive ``fork()``, which the TFTP worker
pool uses. The gateway is part of etcd itself (3.4 serves it at ``/v3/``, 3.5+ too), is
the same v3 API (transactions, leases, watches), and aiohttp is already a dependency.
netbootd needs six calls (range, txn, delete, lease grant, lease keep-alive, watch),
each a JSON POST: that is this module.

The client runs its own event loop on its own thread. The planner and the node state
are synchronous and are called from the DHCP loop, the TFTP engine thread and HTTP
handlers alike; they wait on :meth:`Etcd.call` (bounded by ``timeout``) while the
watches stream on the client's loop and never touch the callers' loops. Endpoints are
tried in order from the last one that answered, so a lost member costs one timeout at
most once. :attr:`Etcd.reachable` says whether the last request got an answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

log = logging.getLogger("netbootd.cluster.etcd")

T = TypeVar("T")


class Unreachable(Exception):
    """No etcd endpoint answered within the timeout."""


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


@dataclass(frozen=True, slots=True)
class KV:
    """One key as etcd holds it."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    @classmethod
    def parse(cls, kv: dict[str, Any]) -> KV:
        return cls(key=unb64(kv.get("key")).decode(), value=unb64(kv.get("value")),
                   mod_revision=int(kv.get("mod_revision", 0)),
                   create_revision=int(kv.get("create_revision", 0)),
                   lease=int(kv.get("lease", 0)))


@dataclass(frozen=True, slots=True)
class Event:
    """A watched change: ``kv.value`` is empty for a delete."""

    deleted: bool
    kv: KV


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def absent(key: str) -> dict[str, Any]:
    """Compare: the key does not exist (its create revision is 0)."""
    return {"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"}


def mod_is(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key was last written at ``revision``."""
    return {"target": "MOD", "key": b64(key), "result": "EQUAL", "mod_revision": str(revision)}


def value_is(key: str, value: bytes | str) -> dict[str, Any]:
    return {"target": "VALUE", "key": b64(key), "result": "EQUAL", "value": b64(value)}


class Etcd:
    """An etcd v3 client on its own thread; see the module docstring."""

    def __init__(self, endpoints: list[str], *, timeout: float = 1.0,
                 ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if ca_file or cert_file or any(e.startswith("https:") for e in endpoints):
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if cert_file and key_file:
                self._ssl.load_cert_chain(str(cert_file), str(key_file))
        self._good = 0  #: index of the endpoint that answered last
        #: Did the last request get an answer? (status page, /readyz, activation gate)
        self.reachable = True
        self.last_error = ""
        self.last_ok = 0.0
        #: Requests etcd answered (metrics; the tests count round trips with it).
        self.requests = 0
        #: Requests tried (answered or not).
        self.attempts = 0
        #: time.monotonic() of the last request no endpoint answered.
        self.failed_at = 0.0
        #: Watches that resumed after a compaction by reading their prefix afresh.
        self.caught_up = 0
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="etcd-client", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (background loops end)."""
        return self._closed

    # -- the client's loop ---------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl else False,
                                               limit=64))
        return self._session

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Run ``coro`` on the client's loop; returns its concurrent future."""
        if self._closed and not self._loop.is_running():
            coro.close()
            raise Unreachable("etcd client closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request, waited for by the (any-thread) caller; raises :class:`Unreachable`."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("Etcd.call() on the client's own loop would deadlock")
        if self._closed:
            raise Unreachable("etcd client closed (the daemon is stopping)")
        fut = self.submit(self.post(path, body))
        try:
            return fut.result(self.timeout * (len(self.endpoints) + 1))
        except FutureTimeout as exc:
            fut.cancel()
            raise Unreachable(f"etcd: no answer to {path}") from exc
        except FutureCancelled as exc:
            # close() cancelled it mid-flight: to a background writer this is etcd gone
            raise Unreachable("etcd client closed (the daemon is stopping)") from exc

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the endpoints in turn, from the one that answered last."""
        errors = []
        self.attempts += 1
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._good + i) % n
            url = self.endpoints[idx] + path
            try:
                async with self._client().post(
                        url, json=body,
                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status != 200:
                        # An answer: etcd is there, the request was wrong (or no leader).
                        msg = data.get("message") or data.get("error") or str(data)
                        if "leader" in str(msg) or resp.status == 503:
                            errors.append(f"{url}: {msg}")
                            continue
                        raise EtcdError(f"etcd {path}: {msg}")
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                errors.append(f"{url}: {type(exc).__name__} {exc}".strip())
                continue
            self._good = idx
            self.requests += 1
            self.reachable = True
            self.last_ok = time.time()
            self.last_error = ""
            return data
        self.reachable = False
        self.failed_at = time.monotonic()
        self.last_error = "; ".join(errors)[:500]
        raise Unreachable(f"etcd unreachable: {self.last_error}")

    def recently_down(self, within: float) -> bool:
        """Did the last request find no endpoint, less than ``within`` seconds ago? The
        protocol paths then skip etcd instead of waiting out the timeout per request;
        a background request (presence, lease) finds it back."""
        return not self.reachable and time.monotonic() - self.failed_at < within

    # -- the calls -----------------------------------------------------------------------------
    def range_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        data = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return ([KV.parse(kv) for kv in data.get("kvs", [])],
                int(data.get("header", {}).get("revision", 0)))

    def get(self, key: str) -> KV | None:
        data = self.call("/v3/kv/range", {"key": b64(key)})
        kvs = data.get("kvs") or []
        return KV.parse(kvs[0]) if kvs else None

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] | None = None
            ) -> tuple[bool, int, list[dict[str, Any]]]:
        """(succeeded, revision, responses) of one transaction."""
        data = self.call("/v3/kv/txn", {"compare": compare, "success": success,
                                        "failure": failure or []})
        return (bool(data.get("succeeded")), int(data.get("header", {}).get("revision", 0)),
                data.get("responses") or [])

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body = put_op(key, value, lease)["request_put"]
        data = self.call("/v3/kv/put", body)
        return int(data.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up); returns its id."""
        data = self.call("/v3/lease/grant", {"TTL": str(max(1, int(ttl + 0.999)))})
        return int(data["ID"])

    def keepalive(self, lease: int) -> bool:
        """Refresh a lease once (a put does not); False if it is gone."""
        data = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0)) > 0

    def members(self) -> list[dict[str, Any]]:
        return self.call("/v3/cluster/member/list", {}).get("members", [])

    # -- watching ------------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int,
              on_events: Callable[[list[Event], int], None], *,
              known: Iterable[str] | None) -> None:
        """Call ``on_events(events, revision)`` (on the client's thread) for every change
        under ``prefix`` after ``start_revision``, for as long as the client lives;
        reconnects (and resumes from the last revision seen) when a member goes away.

        ``known``: the keys under ``prefix`` the caller loaded at ``start_revision``. A
        watch that resumes after etcd compacted the history it needs (a replica cut off
        while ``--auto-compaction`` ran) reads the prefix afresh and reports what changed
        meanwhile as events, puts of what was written and deletes of what is gone
        (:meth:`_catch_up`): a caller never misses a change, however long it was away.
        ``None`` for a prefix whose deletes the caller can miss (keys that are only
        ever overwritten or expire, too many to track): the catch-up reports writes."""
        self.submit(self._watch(prefix, start_revision, on_events,
                                None if known is None else set(known)))

    async def _watch(self, prefix: str, revision: int,
                     on_events: Callable[[list[Event], int], None],
                     known: set[str] | None) -> None:
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix)}}
        n = 0
        compacted = False
        while not self._closed:
            url = self.endpoints[(self._good + n) % len(self.endpoints)] + "/v3/watch"
            try:
                if compacted:
                    revision = await self._catch_up(prefix, revision, known, on_events)
                    compacted = False
                body["create_request"]["start_revision"] = str(revision + 1)
                async with self._client().post(
                        url, json=body, timeout=aiohttp.ClientTimeout(
                            total=None, sock_connect=self.timeout)) as resp:
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result", {})
                        if result.get("compact_revision"):
                            compacted = True  # history gone: read the prefix afresh
                            break
                        events = [Event(deleted=e.get("type") == "DELETE",
                                        kv=KV.parse(e.get("kv", {})))
                                  for e in result.get("events", [])]
                        rev = int(result.get("header", {}).get("revision", revision))
                        if events:
                            if known is not None:
                                for e in events:
                                    (known.discard if e.deleted else known.add)(e.kv.key)
                            revision = max(revision, max(e.kv.mod_revision for e in events))
                            _deliver(on_events, events, rev)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect to the next member
                log.debug("etcd watch on %s ended: %s", url, exc)
            n += 1
            if not self._closed:
                await asyncio.sleep(min(1.0, self.timeout))

    async def _catch_up(self, prefix: str, revision: int, known: set[str] | None,
                        on_events: Callable[[list[Event], int], None]) -> int:
        """What changed under ``prefix`` since ``revision``, read afresh because etcd
        compacted that history: every key written after it (a put each) and every key of
        ``known`` that is gone (a delete each, at the read's revision). Two reads at one
        revision: the changed keys with their values, then the keys alone (skipped when
        no keys are tracked). Returns the revision the watch resumes from."""
        changed = await self.post("/v3/kv/range", {
            "key": b64(prefix), "range_end": prefix_end(prefix),
            "min_mod_revision": str(revision + 1)})
        now = int(changed.get("header", {}).get("revision", 0))
        events = [Event(deleted=False, kv=KV.parse(kv)) for kv in changed.get("kvs", [])]
        if known is not None:
            keys = await self.post("/v3/kv/range", {
                "key": b64(prefix), "range_end": prefix_end(prefix), "keys_only": True,
                "revision": str(now)})
            present = {unb64(kv.get("key")).decode() for kv in keys.get("kvs", [])}
            events += [Event(deleted=True, kv=KV(key=key, value=b"", mod_revision=now,
                                                 create_revision=0))
                       for key in sorted(known - present)]
            known.clear()
            known.update(present)
        self.caught_up += 1
        log.warning("etcd watch of %s resumed after a compaction: read afresh at revision "
                    "%d (%d written, %d deleted meanwhile)", prefix, now,
                    sum(not e.deleted for e in events), sum(e.deleted for e in events))
        if events:
            _deliver(on_events, events, now)
        return now

    def close(self) -> None:
        """Stop the client's loop and thread (watches end)."""
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
            if self._session is not None:
                await self._session.close()

        try:
            self.submit(shut()).result(2)
        except Exception as exc:  # noqa: BLE001 - closing anyway
            log.debug("etcd client close: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2)


def _deliver(on_events: Callable[[list[Event], int], None], events: list[Event],
             revision: int) -> None:
    try:
        on_events(events, revision)
    except Exception:
        log.exception("etcd watch handler failed")


class EtcdError(Exception):
    """etcd answered, and refused the request (a bug of ours, or a bad key)."""
