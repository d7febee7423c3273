"""The HTTP server under slow clients and a filling disk, with real sockets on 127.0.0.1.

In the field: 20,050 slow connections used up the descriptors TFTP shares with HTTP
(and asyncio logged 204,793 accept tracebacks in 18 s); a 1.6 GB chunked upload
filled the disk and got a 500.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netbootd.daemon import QuietExceptionHandler
from netbootd.http.testkit import TOKEN, ServerThread, make_app

CAP = 100
SLOW = 300


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def get(srv: ServerThread, path: str = "/healthz") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.app.settings.http.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def open_connections(srv: ServerThread) -> int:
    return srv.call(_count(srv))


async def _count(srv: ServerThread) -> int:
    handlers = len(srv.service._runner.server.connections)  # aiohttp's own view
    assert handlers <= CAP
    return srv.service.site.open


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset)."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    finally:
        sock.setblocking(True)
    return data == b"" or data.startswith(b"HTTP/1.1 503")


@pytest.fixture
def slow_server(tmp_path: Path):
    app = make_app(tmp_path / "d", http={"max_connections": CAP, "idle_timeout": 2.0})
    with ServerThread(app) as srv:
        yield srv


def test_connection_cap_holds_and_service_recovers(slow_server: ServerThread):
    srv = slow_server
    assert srv.service.site.cap == CAP
    socks: list[socket.socket] = []
    try:
        for _ in range(SLOW):  # a request head that never ends
            s = socket.create_connection(("127.0.0.1", srv.app.settings.http.port), timeout=30)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        wait_for(lambda: srv.service.site.refused >= SLOW - CAP, "the excess to be refused")
        assert open_connections(srv) <= CAP
        assert srv.service.site.refused == SLOW - CAP
        # the refused ones were told so and closed at once, without a handler each
        wait_for(lambda: sum(closed_by_peer(s) for s in socks) >= SLOW - CAP,
                 "refused connections to be closed")
        # the slow ones are closed by the idle/slow-header timeout: service is back
        wait_for(lambda: open_connections(srv) == 0, "slow clients to be timed out")
        status, body = get(srv)
        assert status == 200, body
        metrics = get(srv, "/metrics")[1].decode()
        assert f"netbootd_http_connections_refused_total {float(SLOW - CAP)}" in metrics
    finally:
        for s in socks:
            s.close()


def test_trickled_request_head_is_cut_off(slow_server: ServerThread):
    """A client that keeps sending header bytes, slower than a request completes, is
    closed after http.idle_timeout although it is never idle for long."""
    srv = slow_server
    s = socket.create_connection(("127.0.0.1", srv.app.settings.http.port), timeout=30)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        sent = 0
        while not closed_by_peer(s):
            assert time.monotonic() - t0 < 60, "a trickling client was never cut off"
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % sent)
            except ConnectionError:
                break
            sent += 1
            time.sleep(0.1)  # the client's pace, not an assertion
        assert sent >= 5  # it was cut off while still sending, not before it started
        assert get(srv)[0] == 200
    finally:
        s.close()


def test_accept_errors_are_logged_once_per_interval(caplog):
    """What asyncio reports on every failed accept() when descriptors run out."""
    now = [0.0]
    handler = QuietExceptionHandler(interval=10.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(handler)
    exc = OSError(24, "Too many open files")
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(10_000):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": exc})
            assert len(caplog.records) == 1
            now[0] = 11.0
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": exc})
    finally:
        loop.close()
    assert len(caplog.records) == 2
    assert "9999 more like it" in caplog.records[1].getMessage()


# -- uploads and the disk ------------------------------------------------------------------
def fs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@pytest.fixture
def reserve_server(tmp_path: Path):
    app = make_app(tmp_path / "d", real_store=True)
    # a reserve of the whole file system, above the free space whatever other processes on
    # the machine write or delete meanwhile: any upload would eat into it (no disk is filled)
    reserve = fs_size(app.settings.paths.images)
    store = app.settings.store.model_copy(update={"min_free_bytes": reserve})
    app.settings = app.settings.model_copy(update={"store": store})
    app.store.settings = store
    with ServerThread(app) as srv:
        yield srv


def put(srv: ServerThread, body, headers: dict[str, str], *, chunked: bool) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.app.settings.http.port, timeout=60)
    try:
        conn.request("PUT", "/api/v1/images/demo/9.9", body=body, encode_chunked=chunked,
                     headers={"Authorization": f"Bearer {TOKEN}", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def leftovers(srv: ServerThread) -> list[str]:
    incoming = srv.app.settings.paths.images / "incoming"
    return sorted(p.name for p in incoming.iterdir()) if incoming.exists() else []


def test_upload_that_would_eat_the_reserve_is_refused_with_507(reserve_server: ServerThread):
    srv = reserve_server
    status, body = put(srv, b"\0" * 4096, {"Content-Type": "application/octet-stream"},
                       chunked=False)
    assert status == 507, body
    assert b"min_free_bytes" in body
    assert leftovers(srv) == []


def test_chunked_upload_is_refused_before_the_disk_fills(reserve_server: ServerThread):
    srv = reserve_server
    chunks = (b"\0" * 65536 for _ in range(64))
    status, body = put(srv, chunks, {"Content-Type": "application/octet-stream"},
                       chunked=True)
    assert status == 507, body
    assert leftovers(srv) == []
