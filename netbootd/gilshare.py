"""A shorter GIL switch interval while a long pure-Python job runs beside the event loop.

Why: a reload (parsing nodes.yaml, the render check of every node) and the start-up
render check run in a thread so the loop keeps answering, but that thread runs Python
without pause and holds the GIL. The loop gives the GIL up at every system call of an
answer (``epoll_wait``, ``recvmsg``, ``stat``, ``urandom``, ``sendmsg``) and then waits
for it to come back; CPython makes the busy thread hand it over only after
``sys.getswitchinterval()``, 5 ms by default. So one proxy-DHCP answer, 0.4 ms on a
quiet daemon, waited 5 ms per system call during a 10,000-node template reload: a
p99 of 25-250 ms. With 0.5 ms the loop waits a tenth as long per call: p99 7-12 ms
against 47-50 ms in the same runs (docs/benchmarks.md), for 0.1-0.2 s more reload
time in hand-overs. Resting the worker every 2 ms instead also helped but slowed it by
20-40 %.

The interval is process-wide: it is lowered while at least one such job runs and put
back when the last one ends, so the packet paths run with CPython's default otherwise.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

#: The switch interval while a job runs (seconds).
BUSY_SWITCH_INTERVAL = 0.0005

_lock = threading.Lock()
_running = 0
_saved: float | None = None


@contextlib.contextmanager
def sharing_gil(interval: float = BUSY_SWITCH_INTERVAL) -> Iterator[None]:
    """Run the block with the GIL handed to waiting threads every ``interval`` seconds
    (or the interval already in force, if shorter). Nests and overlaps across threads:
    the first to enter saves the interval, the last to leave restores it."""
    global _running, _saved
    with _lock:
        if _running == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved))
        _running += 1
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0 and _saved is not None:
                sys.setswitchinterval(_saved)
                _saved = None
