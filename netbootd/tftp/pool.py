"""The daemon's side of the TFTP worker processes: start, hand off, collect, restart.

Everything here except :meth:`WorkerPool.close` runs on the TFTP engine thread (the
thread that also admits requests), so the pool needs no locks: a report arrives on
the same thread that counted the transfer in.

A worker that dies (its channel reads EOF while the daemon is not stopping) is
logged with its exit status, its transfers are reported as ``error`` ("TFTP worker
died"), and its slot is started again: at once if it had lived a while, after
:data:`RESTART_DELAY` if it died young (a worker that cannot even start must not turn
into a fork loop). Until then new transfers go to the other workers, or run in the
daemon's own pump threads when none is left.

Stopping is the daemon's decision alone. Once :meth:`WorkerPool.stop` has begun, a
closing channel is expected and no worker is started again. Each worker runs in a
process group of its own, so a Ctrl-C (SIGINT to the terminal's foreground group) or a
``kill`` of the daemon's group reaches only the daemon, which then stops its workers
over their channels; a worker ignores SIGINT and SIGTERM too (systemd's
``KillMode=control-group`` signals every process of the unit, whatever its group). The
one window left is a worker's first milliseconds, before its interpreter has set those
dispositions: a worker ended by SIGTERM or SIGINT is therefore taken as part of a stop
that is on its way (logged at INFO, started again only after :data:`RESTART_DELAY`,
which a stop that began in between cancels), not as a death.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import handoff
from .engine import EngineLoop
from .handoff import ChannelClosed, Report

log = logging.getLogger("netbootd.tftp")

#: A worker that lived less than this is restarted after RESTART_DELAY, else at once.
YOUNG = 5.0
RESTART_DELAY = 1.0
#: Exit statuses (``Popen.returncode``) of a worker ended by a stop's signal.
STOP_SIGNALS = frozenset((-signal.SIGTERM, -signal.SIGINT))


def default_size() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class WorkerProcess:
    """One worker: its process, the daemon's end of its channel, its transfer ids."""

    __slots__ = ("chan", "closed", "jobs", "proc", "slot", "started")

    def __init__(self, slot: int, proc: subprocess.Popen, chan: socket.socket) -> None:
        self.slot = slot
        self.proc = proc
        self.chan = chan
        self.jobs: set[int] = set()
        self.started = time.monotonic()
        self.closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerPool:
    """``size`` worker processes; ``on_report(Report)`` is called once per handed-over
    transfer, when it ends (or its worker died)."""

    def __init__(self, loop: EngineLoop, size: int,
                 on_report: Callable[[Report], None], *, pump_threads: int = 16,
                 on_progress: Callable[[int], None] | None = None) -> None:
        """``pump_threads``: block-loop threads per worker (``tftp.pump_threads``);
        ``on_progress(id)``: a transfer's client acknowledged its first data block."""
        self.loop = loop
        self.size = size
        self.pump_threads = pump_threads
        self.on_report = on_report
        self.on_progress = on_progress
        self.slots: list[WorkerProcess | None] = [None] * size
        #: processes not reaped yet (a stopping worker stays here until close())
        self._procs: list[subprocess.Popen] = []
        self.stopping = False
        #: set (on the engine thread) once every worker's channel is closed after stop()
        self.all_closed = threading.Event()
        self.restarts = 0

    # -- lifecycle (engine thread) -----------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.size):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        if self.stopping or self.slots[slot] is not None:
            return
        parent, child = handoff.channel_pair()
        level = logging.getLevelName(log.getEffectiveLevel())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "netbootd.tftp.worker", str(child.fileno()),
                 "--log-level", str(level), "--pump-threads", str(self.pump_threads)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                process_group=0)  # group signals are for the daemon (see the docstring)
        except OSError as exc:
            parent.close()
            log.error("tftp: cannot start worker %d: %s; retrying in %.0fs", slot, exc,
                      RESTART_DELAY)
            self.loop.call_later(RESTART_DELAY, self._spawn, slot)
            return
        finally:
            child.close()  # the worker has its own copy now
        parent.setblocking(False)
        w = WorkerProcess(slot, proc, parent)
        self.slots[slot] = w
        self._procs.append(proc)
        self.loop.add_reader(parent.fileno(), self._on_message, w)
        log.debug("tftp: worker %d started (pid %d)", slot, proc.pid)

    def stop(self) -> None:
        """Tell every worker to abort its transfers and exit; their reports (``aborted``,
        "server stopping") still arrive before their channels close."""
        self.stopping = True
        for w in self.live():
            try:
                handoff.send(w.chan, {"op": "stop"})
            except ChannelClosed as exc:
                self._lost(w, f"cannot tell it to stop: {exc}")
        self._check_all_closed()

    def close(self, timeout: float = 0.3) -> None:
        """After the engine thread ended: reap every worker, killing any that has not
        exited within ``timeout``; transfers never reported are reported ``aborted``."""
        end = time.monotonic() + timeout
        for proc in self._procs:
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tftp: worker pid %d did not exit; killing it", proc.pid)
                proc.kill()
                proc.wait()
        self._procs.clear()
        for w in list(self.live()):
            self._close_channel(w)
            for job in sorted(w.jobs):
                self.on_report(Report(job, "aborted", "server stopping"))
            w.jobs.clear()

    # -- transfers (engine thread) -------------------------------------------------------------
    def live(self) -> list[WorkerProcess]:
        return [w for w in self.slots if w is not None and not w.closed]

    def pick(self) -> WorkerProcess | None:
        """The worker with the fewest open transfers (None: no worker is running)."""
        return min(self.live(), key=lambda w: len(w.jobs), default=None)

    def hand_off(self, w: WorkerProcess, job: int, msg: dict[str, Any],
                 fds: tuple[int, int, int]) -> bool:
        """Send one transfer (``fds``: connected socket, stranger socket, content);
        False (and the worker is written off) if it cannot take it. The caller keeps
        its own descriptors and closes them either way."""
        w.jobs.add(job)  # before sending: the worker may answer before send() returns
        try:
            handoff.send(w.chan, msg, fds)
        except ChannelClosed as exc:
            w.jobs.discard(job)  # not the worker's: the caller runs it elsewhere
            self._lost(w, f"hand-off failed: {exc}")
            return False
        return True

    def abort(self, w: WorkerProcess, job: int, reason: str) -> None:
        """End one of ``w``'s transfers early (ERROR 0 ``reason``); its report follows."""
        if job not in w.jobs or w.closed:
            return
        try:
            handoff.send(w.chan, {"op": "abort", "id": job, "reason": reason})
        except ChannelClosed as exc:
            self._lost(w, f"abort failed: {exc}")

    def _on_message(self, w: WorkerProcess) -> None:
        while not w.closed:
            try:
                got = handoff.receive(w.chan)
            except ChannelClosed as exc:
                self._lost(w, str(exc))
                return
            if got is None:
                return
            msg, fds = got
            for fd in fds:  # a worker has no business sending descriptors
                os.close(fd)
            if msg.get("op") == "progress":
                job = msg.get("id")
                if job in w.jobs and self.on_progress is not None:
                    self.on_progress(job)
                continue
            try:
                if msg.get("op") != "done":
                    raise ValueError(f"unexpected message {msg.get('op')!r}")
                report = Report.from_message(msg)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("tftp: worker pid %d: bad report: %s", w.pid, exc)
                continue
            if report.id in w.jobs:
                w.jobs.discard(report.id)
                self.on_report(report)

    # -- failures ------------------------------------------------------------------------------
    def _close_channel(self, w: WorkerProcess) -> None:
        if w.closed:
            return
        w.closed = True
        try:
            self.loop.remove_reader(w.chan.fileno())
        except (ValueError, OSError):
            pass
        w.chan.close()

    def _lost(self, w: WorkerProcess, why: str) -> None:
        """The channel to ``w`` is gone: expected when stopping, a death otherwise."""
        if w.closed:
            return
        self._close_channel(w)
        if self.stopping:
            self._check_all_closed()
            return
        try:
            code = w.proc.wait(0.2)
        except subprocess.TimeoutExpired:  # alive but deaf: it cannot be trusted any more
            w.proc.send_signal(signal.SIGKILL)
            code = w.proc.wait()
        self._procs.remove(w.proc)
        lived = time.monotonic() - w.started
        stopped = code in STOP_SIGNALS
        if stopped:  # a stop reached it before it could ignore signals (see the docstring)
            log.info("tftp: worker %d (pid %d) ended by %s after %.1fs; starting it again "
                     "in %.0fs unless the daemon is stopping", w.slot, w.pid,
                     signal.Signals(-code).name, lived, RESTART_DELAY)
        else:
            log.error("tftp: worker %d (pid %d) died after %.1fs (%s, exit status %s); "
                      "%d transfer(s) lost", w.slot, w.pid, lived, why, code, len(w.jobs))
        for job in sorted(w.jobs):
            self.on_report(Report(job, "aborted", "server stopping") if stopped
                           else Report(job, "error", "TFTP worker died"))
        w.jobs.clear()
        self.slots[w.slot] = None
        self.restarts += 1
        if lived < YOUNG or stopped:
            self.loop.call_later(RESTART_DELAY, self._spawn, w.slot)
        else:
            self._spawn(w.slot)

    def _check_all_closed(self) -> None:
        if self.stopping and not self.live():
            self.all_closed.set()
