"""The daemon <-> worker channel: messages with descriptors, EOF, sealed memfds."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket

import pytest

from netbootd.tftp import handoff
from netbootd.tftp.handoff import ChannelClosed, Report


def test_memfd_is_sealed_and_read_only():
    fd = handoff.memfd_with(b"console=serial0\n")
    try:
        assert os.pread(fd, 100, 0) == b"console=serial0\n"
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        with pytest.raises(OSError):
            os.write(fd, b"x")  # the descriptor is read-only ...
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 0)  # ... and the file itself cannot change (sealed)
        finally:
            os.close(rw)
        with mmap.mmap(fd, 16, access=mmap.ACCESS_READ) as m:
            assert m[:7] == b"console"
    finally:
        os.close(fd)


def test_message_with_descriptors_then_eof():
    daemon, worker = handoff.channel_pair()
    daemon.setblocking(False)
    worker.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    content = handoff.memfd_with(b"abc")
    try:
        assert handoff.receive(worker) is None  # nothing waiting
        handoff.send(daemon, {"op": "start", "id": 3}, (udp.fileno(), content))
        msg, fds = handoff.receive(worker)
        assert msg == {"op": "start", "id": 3} and len(fds) == 2
        with socket.socket(fileno=fds[0]) as passed:
            assert passed.type == socket.SOCK_DGRAM
        assert os.pread(fds[1], 3, 0) == b"abc"
        os.close(fds[1])
        rep = Report(3, "ok", "", 10, 12, 2, 0.5, 1)
        handoff.send(worker, rep.message())
        got, fds = handoff.receive(daemon)
        assert Report.from_message(got) == rep and fds == []
        daemon.close()
        with pytest.raises(ChannelClosed):
            handoff.receive(worker)
        with pytest.raises(ChannelClosed):
            handoff.send(worker, {"op": "done"})
    finally:
        udp.close()
        os.close(content)
        worker.close()
        daemon.close()
