"""A TFTP worker process: runs the transfers the daemon hands it.

    python -m netbootd.tftp.worker CONTROL_FD [--log-level LEVEL] [--pump-threads N]

Why worker processes: a transfer's per-block work is CPython, so one thread moves
blocks on one CPU, and it shares the GIL with the rest of the daemon. in.tftpd forks a
process per transfer and uses every CPU. A few long-lived workers get the same
parallelism without a process per transfer (measurements in docs/tftp.md).

Why a fresh interpreter (started by the daemon with ``subprocess`` and ``pass_fds``)
and not ``fork()``: the daemon is a threaded asyncio program, and a forked child
inherits locks other threads held at that instant. The worker imports only the engine,
the transfer and the codec (~50 ms).

What a worker does: it reads control messages (:mod:`netbootd.tftp.handoff`) on the
descriptor it was started with, runs each handed-over transfer and reports how it
ended. While fewer than ``--pump-threads`` transfers run that way, a new one gets a
thread of its own in the C per-block loop (:mod:`netbootd.tftp._pump`, GIL released:
one worker's threads use every CPU, and each blocked thread wakes next to its client);
beyond that, or when the module is not built, it runs on the worker's event loop with
the same :class:`~netbootd.tftp.transfer.Transfer` and
:class:`~netbootd.tftp.engine.EngineLoop` the daemon uses in-process, which serves many
transfers per wake-up. The first is the lowest latency per block, the second the least
CPU per block when many transfers are busy at once (measured: docs/tftp.md). It opens no file and no
socket of its own (only a pipe for its stop signal, and an epoll set per transfer) and
writes nothing to disk: it only sends from sockets and reads from (read-only, or
sealed) descriptors it was given. Policy, limits, events and
metrics stay in the daemon.

It stops when told (``stop``), on SIGTERM (both: clients get ERROR 0 "server
stopping") or when the daemon's end of the channel closes (the daemon died: clients
are told the same, nothing is reported). SIGINT is ignored: a Ctrl-C reaches the whole
process group, and the daemon decides when its workers stop.
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
import time
from types import ModuleType

from . import codec, handoff
from .engine import EngineLoop
from .handoff import ChannelClosed, Report
from .transfer import Negotiated, Transfer

log = logging.getLogger("netbootd.tftp.worker")

#: Stack of a pump thread: the C loop needs ~3 KiB; Python's default is 8 MiB of
#: address space per thread, which 2,000 transfers would turn into 16 GiB reserved.
PUMP_STACK = 256 * 1024


def load_pump() -> ModuleType | None:
    """The C per-block loop, or None when it was not built (no compiler at install)."""
    try:
        from . import _pump
    except ImportError:
        return None
    return _pump


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


class _Job:
    """A running transfer's id and its count of dropped datagrams."""

    __slots__ = ("id", "malformed")

    def __init__(self, job_id: int) -> None:
        self.id = job_id
        self.malformed = 0

    def count_malformed(self) -> None:
        self.malformed += 1


class Worker:
    """The control side of a worker: starts transfers, reports their end."""

    def __init__(self, loop: EngineLoop, chan: socket.socket,
                 pump: ModuleType | None = None, pump_threads: int = 0) -> None:
        """``pump``: the C module (None: not built); up to ``pump_threads`` transfers
        run in threads of their own in it, the rest on ``loop`` in Python."""
        self.loop = loop
        self.chan = chan
        self.pump = pump
        self.pump_threads = pump_threads if pump is not None else 0
        self.jobs: dict[Transfer, _Job] = {}
        #: ids of transfers running in pump threads
        self.pumping: set[int] = set()
        #: readable once stopping: every pump thread polls it, aborts and returns
        self._stop_r, self._stop_w = os.pipe()
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
            if msg.get("op") == "start" and len(fds) == 3:
                self.start(msg, *fds)
                continue
            for fd in fds:
                os.close(fd)
            if msg.get("op") == "stop":
                self.shutdown()
                return
            log.warning("tftp worker: ignored control message %r", msg.get("op"))

    def start(self, msg: dict, sock_fd: int, stranger_fd: int, content_fd: int) -> None:
        """Start one handed-over transfer; the descriptors are owned from here on."""
        sock = socket.socket(fileno=sock_fd)
        stranger = socket.socket(fileno=stranger_fd)
        job = _Job(int(msg.get("id", 0)))
        source: MappedSource | None = None
        try:
            try:
                source = MappedSource(content_fd, int(msg["size"]))
            finally:
                os.close(content_fd)
            oack = msg.get("oack")
            params = Negotiated(int(msg["blksize"]), int(msg["windowsize"]),
                                float(msg["timeout"]), dict(oack) if oack else None)
            peer = (str(msg["peer"][0]), int(msg["peer"][1]))
            sock.setblocking(False)
            stranger.setblocking(False)
            if self.pump is not None and len(self.pumping) < self.pump_threads:
                self._start_pump(job, sock, stranger, source, params, int(msg["retries"]))
                return
            tr = Transfer(self.loop, sock, peer, source, params, retries=int(msg["retries"]),
                          on_done=self._done, stranger=stranger,
                          on_malformed=job.count_malformed)
        except (KeyError, IndexError, TypeError, ValueError, OSError) as exc:
            # a file that shrank below its announced size, or a message we cannot read
            sock.close()
            stranger.close()
            if source is not None:
                source.close()
            log.warning("tftp worker: cannot start transfer %d: %s", job.id, exc)
            self._report(Report(job.id, "error", f"worker cannot start: {exc}", seconds=0.0))
            return
        self.jobs[tr] = job
        tr.start()

    def _start_pump(self, job: _Job, sock: socket.socket, stranger: socket.socket,
                    source: MappedSource, params: Negotiated, retries: int) -> None:
        self.pumping.add(job.id)
        try:
            threading.Thread(target=self._pump_thread, name=f"tftp-{job.id}", daemon=True,
                             args=(job, sock, stranger, source, params, retries)).start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or tasks
            self.pumping.discard(job.id)
            sock.close()
            stranger.close()
            source.close()
            log.error("tftp worker: cannot start transfer %d: %s", job.id, exc)
            self._report(Report(job.id, "error", f"worker cannot start: {exc}", seconds=0.0))

    def _pump_thread(self, job: _Job, sock: socket.socket, stranger: socket.socket,
                     source: MappedSource, params: Negotiated, retries: int) -> None:
        """One transfer, start to end, in C; then its report goes to the loop thread."""
        assert self.pump is not None
        started = time.monotonic()
        try:
            oack = codec.build_oack(params.oack) if params.oack else None
            outcome, reason, blocks, payload, packets, malformed = self.pump.run(
                sock.fileno(), stranger.fileno(), source.data, params.blksize,
                params.windowsize, params.timeout, retries, oack, self._stop_r)
            report = Report(job.id, outcome, reason, min(blocks * params.blksize, source.size),
                            payload, packets, round(time.monotonic() - started, 6), malformed)
        except Exception as exc:  # a bug here must end one transfer, not the worker
            log.exception("tftp worker: transfer %d failed", job.id)
            report = Report(job.id, "error", f"worker: {exc}", seconds=0.0)
        finally:
            sock.close()
            stranger.close()
            source.close()
        try:
            self.loop.call_soon_threadsafe(self._pump_done, report)
        except (OSError, ValueError):  # the loop is gone (the worker is exiting)
            pass

    def _pump_done(self, report: Report) -> None:
        self.pumping.discard(report.id)
        self._report(report)
        if self.stopping and not self.pumping:
            self.loop.stop_soon()

    def _done(self, tr: Transfer, outcome: str, reason: str) -> None:
        job = self.jobs.pop(tr)
        self._report(Report(job.id, outcome, reason, tr.bytes_acked, tr.payload_sent,
                            tr.packets_sent, round(time.monotonic() - tr.started, 6),
                            job.malformed))

    def _report(self, report: Report) -> None:
        if not self.connected:
            return
        try:
            handoff.send(self.chan, report.message())
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
        os.write(self._stop_w, b"x")  # pump threads abort; the last report stops the loop
        for tr in list(self.jobs):
            tr.abort("server stopping")
        if not self.pumping:
            self.loop.stop_soon()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="netbootd TFTP worker (started by the daemon)")
    ap.add_argument("control_fd", type=int)
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--pump-threads", type=int, default=0,
                    help="transfers that run in a C thread of their own (tftp.pump_threads); "
                    "the rest run on this worker's event loop")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.stack_size(PUMP_STACK)
    chan = socket.socket(fileno=args.control_fd)
    chan.setblocking(False)
    loop = EngineLoop(name="netbootd-tftp-worker")
    pump = load_pump() if args.pump_threads > 0 else None
    if pump is not None:
        # SCHED_BATCH (inherited by the pump threads): a woken transfer thread does not
        # preempt the running task, it runs when that task sleeps or its slice ends. A
        # thread per transfer otherwise costs a context switch per block per transfer
        # on a busy CPU; measured in the 100-Pi storm (clients on the same 2 vCPUs),
        # slowest file: 19.1-21.7 s -> 16.5-18.8 s (29.4 -> 23.8 s with a thread for
        # every transfer); 20 x 8 MiB and lock-step do not change, a client sleeps
        # right after each ACK anyway (docs/tftp.md).
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # a seccomp filter may refuse it: slower, not broken
            log.info("tftp worker: SCHED_BATCH refused (%s); running without it", exc)
    worker = Worker(loop, chan, pump, args.pump_threads)
    signal.signal(signal.SIGTERM, lambda *_: loop.call_soon_threadsafe(worker.shutdown))
    loop.add_reader(chan.fileno(), worker.on_control)
    try:
        loop.run()
    finally:
        loop.close()
        chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
