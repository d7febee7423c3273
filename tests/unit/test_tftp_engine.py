"""EngineLoop: the TFTP data-plane loop (readers, timers, cross-thread calls, resilience)."""

from __future__ import annotations

import socket
import threading
import time

from netbootd.tftp.engine import EngineLoop


def test_readers_timers_and_threadsafe_calls():
    loop = EngineLoop()
    seen: list[str] = []
    done = threading.Event()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)

    def on_read() -> None:
        seen.append("read:" + a.recv(100).decode())

    def boom() -> None:
        raise RuntimeError("a bad callback must not stop the loop")

    loop.add_reader(a.fileno(), on_read)
    loop.call_later(0.05, seen.append, "t2")
    loop.call_later(0.01, seen.append, "t1")
    loop.call_later(0.02, boom)
    loop.call_later(0.03, seen.append, "cancelled").cancel()
    loop.run_in_thread()
    try:
        b.send(b"x")
        loop.call_soon_threadsafe(seen.append, "soon")
        time.sleep(0.1)
        loop.call_soon_threadsafe(done.set)
        assert done.wait(1)
        assert loop.running
        assert "read:x" in seen and "soon" in seen
        assert seen.index("t1") < seen.index("t2") and "cancelled" not in seen
        loop.call_soon_threadsafe(loop.remove_reader, a.fileno())
    finally:
        t0 = time.monotonic()
        loop.stop(1.0)
        assert time.monotonic() - t0 < 1.0 and not loop.running
        loop.stop(1.0)  # idempotent
        loop.call_soon_threadsafe(seen.append, "late")  # after close: ignored, no raise
        a.close()
        b.close()


def test_close_without_running():
    loop = EngineLoop()
    loop.close()
    loop.close()
