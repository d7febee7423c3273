"""A TFTP worker process: runs the transfers the daemon hands it.

    python -m netbootd.tftp.worker CONTROL_FD [--log-level LEVEL] [--pump-threads N]

Why worker processes: admission, policy, rendering, events and metrics are Python in the
daemon; the blocks are moved by the C loop (:mod:`netbootd.tftp._pump`) in threads with
the GIL released. Running those threads in a few worker processes keeps the daemon's
own GIL and CPU free for DHCP and HTTP, and a crash in the data plane costs only the
transfers of one worker (measurements in docs/tftp.md).

Why a fresh interpreter (started by the daemon with ``subprocess`` and ``pass_fds``)
and not ``fork()``: the daemon is a threaded asyncio program, and a forked child
inherits locks other threads held at that instant. The worker imports only the engine
loop, the codec, the hand-off and the pumps (~50 ms).

What a worker does: it reads control messages (:mod:`netbootd.tftp.handoff`) on the
descriptor it was started with and gives each handed-over transfer to its
:class:`~netbootd.tftp.pumps.Pumps` (up to ``--pump-threads`` C threads, the least
loaded one takes it). It tells the daemon once when a transfer's client first
acknowledges data (``progress``: the daemon's admission never evicts such a transfer)
and once when it ends (``done``); ``abort`` ends one transfer early (eviction). It opens
no file and no socket of its own and writes nothing to disk: it only sends from sockets
and reads from (read-only, or sealed) descriptors it was given.

It stops when told (``stop``: clients get ERROR 0 "server stopping", every transfer is
reported) or when the daemon's end of the channel closes (the daemon died: clients are
told the same, nothing is reported). Only the daemon decides when its workers stop, so
SIGINT and SIGTERM are ignored: a Ctrl-C reaches the whole foreground process group, and
systemd's default ``KillMode=control-group`` sends SIGTERM to every process of the unit at
once. A worker that stopped on its own there would be seen by the daemon as a worker that
died (and started again) if its exit beat the daemon's own signal handler. The daemon
also starts each worker in a process group of its own (see :mod:`netbootd.tftp.pool`),
so group signals do not reach it even before this module has set those dispositions.
SIGKILL still works, and a worker whose daemon is gone stops by itself (EOF).
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import signal
import socket
import sys
import threading

from . import handoff
from .engine import EngineLoop
from .handoff import ChannelClosed, Report
from .pumps import PUMP_STACK, Pumps
from .transfer import Negotiated

log = logging.getLogger("netbootd.tftp.worker")


class MappedSource:
    """The content of one transfer, mapped from the descriptor the daemon passed."""

    __slots__ = ("data", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.data: bytes | mmap.mmap = (mmap.mmap(fd, size, access=mmap.ACCESS_READ)
                                        if size else b"")

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()


class Worker:
    """The control side of a worker: starts transfers, reports their end."""

    def __init__(self, loop: EngineLoop, chan: socket.socket, pump_threads: int) -> None:
        self.loop = loop
        self.chan = chan
        self.pumps = Pumps(loop, pump_threads, on_report=self._report,
                           on_progress=self._progress, name="tftp-worker")
        self.connected = True  # the daemon's end is open: reports can go out
        self.stopping = False

    def on_control(self) -> None:
        while not self.stopping:
            try:
                got = handoff.receive(self.chan)
            except ChannelClosed:
                log.warning("tftp worker: the daemon closed the channel; stopping")
                self.connected = False
                self.shutdown()
                return
            if got is None:
                return
            msg, fds = got
            op = msg.get("op")
            if op == "start" and len(fds) == 3:
                self.start(msg, *fds)
                continue
            for fd in fds:
                os.close(fd)
            if op == "abort":
                self.pumps.abort(int(msg.get("id", 0)), str(msg.get("reason", "aborted")))
            elif op == "stop":
                self.shutdown()
                return
            else:
                log.warning("tftp worker: ignored control message %r", op)

    def start(self, msg: dict, sock_fd: int, stranger_fd: int, content_fd: int) -> None:
        """Start one handed-over transfer; the descriptors are owned from here on."""
        job = int(msg.get("id", 0))
        source: MappedSource | None = None
        try:
            try:
                source = MappedSource(content_fd, int(msg["size"]))
            finally:
                os.close(content_fd)
            oack = msg.get("oack")
            params = Negotiated(int(msg["blksize"]), int(msg["windowsize"]),
                                float(msg["timeout"]), dict(oack) if oack else None)
            self.pumps.add(job, sock_fd, stranger_fd, source, params,
                           retries=int(msg["retries"]), stall_max=float(msg["stall_max"]))
        except (KeyError, IndexError, TypeError, ValueError, OSError, RuntimeError) as exc:
            # a file that shrank below its announced size, or a message we cannot read
            os.close(sock_fd)
            os.close(stranger_fd)
            if source is not None:
                source.close()
            log.warning("tftp worker: cannot start transfer %d: %s", job, exc)
            self._report(Report(job, "error", f"worker cannot start: {exc}", seconds=0.0))

    def _progress(self, job: int) -> None:
        self._send({"op": "progress", "id": job})

    def _report(self, report: Report) -> None:
        self._send(report.message())

    def _send(self, msg: dict) -> None:
        if not self.connected:
            return
        try:
            handoff.send(self.chan, msg)
        except ChannelClosed as exc:
            log.warning("tftp worker: cannot report to the daemon (%s); stopping", exc)
            self.connected = False
            self.shutdown()

    def shutdown(self) -> None:
        """Abort every transfer (clients get ERROR 0), report them while the daemon
        listens, then end the loop."""
        if self.stopping:
            return
        self.stopping = True
        self.pumps.stop()
        self._stop_when_idle()

    def _stop_when_idle(self) -> None:
        if self.pumps.idle.is_set():
            self.loop.stop_soon()
        else:  # the pumps' last reports are queued on this loop; look again after them
            self.loop.call_later(0.005, self._stop_when_idle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="netbootd TFTP worker (started by the daemon)")
    ap.add_argument("control_fd", type=int)
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--pump-threads", type=int, default=16,
                    help="threads running the C block loop (tftp.pump_threads)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):  # the daemon decides (see the docstring)
        signal.signal(sig, signal.SIG_IGN)
    threading.stack_size(PUMP_STACK)
    chan = socket.socket(fileno=args.control_fd)
    chan.setblocking(False)
    loop = EngineLoop(name="netbootd-tftp-worker")
    # SCHED_BATCH (inherited by the pump threads): a woken pump thread does not preempt
    # the running task, it runs when that task sleeps or its slice ends. Measured in the
    # 100-Pi storm (clients on the same 2 vCPUs), slowest file: 19.1-21.7 s -> 16.5-18.8 s
    # with a thread per transfer; 20 x 8 MiB and lock-step do not change, a client sleeps
    # right after each ACK anyway (docs/tftp.md).
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a seccomp filter may refuse it: slower, not broken
        log.info("tftp worker: SCHED_BATCH refused (%s); running without it", exc)
    worker = Worker(loop, chan, args.pump_threads)
    loop.add_reader(chan.fileno(), worker.on_control)
    try:
        loop.run()
    finally:
        loop.close()
        chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
