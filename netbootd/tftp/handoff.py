"""What the daemon and a TFTP worker process say to each other, and how.

One ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair per worker. SEQPACKET keeps message
boundaries (one message = one JSON object, no framing code), carries descriptors
with the message they belong to (``SCM_RIGHTS``), and reads as EOF the moment the
other side is gone, which is how each side notices the other died.

daemon -> worker
    ``start`` + three descriptors: the transfer's two UDP sockets (on one ephemeral
    port of the local address the RRQ came to, the server TID: one connected to the
    client, one for strangers, see :func:`netbootd.tftp.transfer.open_tid`) and a
    read-only descriptor of the content (the image file itself, or a sealed memfd
    holding rendered, netascii or small-file bytes). Fields: ``id``, ``peer`` [ip, port], ``size``,
    ``blksize``, ``windowsize``, ``timeout``, ``oack`` (the negotiated options, or
    null), ``retries``.

    ``stop``: abort every transfer (the client gets ERROR 0 "server stopping"),
    report each one, exit.

worker -> daemon
    ``done``: ``id``, ``outcome`` (ok | aborted | error), ``reason``, ``bytes_acked``,
    ``payload_sent``, ``packets_sent``, ``seconds``, ``malformed`` (datagrams dropped on
    the transfer's port).

Both sides keep their end non-blocking (it sits in an epoll loop); a send that finds
the buffer full waits for room for a bounded time instead of dropping a message.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
from dataclasses import asdict, dataclass
from typing import Any

#: Longest control message (a start message is ~250 bytes).
MAX_MESSAGE = 4096
#: Most descriptors one message carries (a start message: two sockets and the content).
MAX_FDS = 3
#: How long a send waits for the other side to drain its end before giving up.
SEND_TIMEOUT = 2.0
_SEALS = (getattr(fcntl, "F_SEAL_SEAL", 1) | getattr(fcntl, "F_SEAL_SHRINK", 2)
          | getattr(fcntl, "F_SEAL_GROW", 4) | getattr(fcntl, "F_SEAL_WRITE", 8))


class ChannelClosed(Exception):
    """The other side is gone (EOF, reset, or it stopped reading)."""


@dataclass(slots=True)
class Report:
    """How one transfer ended, wherever it ran (the daemon's accounting input)."""

    id: int
    outcome: str
    reason: str
    bytes_acked: int = 0
    payload_sent: int = 0
    packets_sent: int = 0
    seconds: float | None = None
    malformed: int = 0

    def message(self) -> dict[str, Any]:
        return {"op": "done", **asdict(self)}

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Report:
        return cls(int(msg["id"]), str(msg["outcome"]), str(msg["reason"]),
                   int(msg["bytes_acked"]), int(msg["payload_sent"]),
                   int(msg["packets_sent"]), float(msg["seconds"]), int(msg["malformed"]))


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(daemon end, worker end); both close-on-exec (the worker end is passed on
    explicitly with ``pass_fds``)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(chan: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
         ) -> None:
    """Send one message (and descriptors). Raises :class:`ChannelClosed`."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    waited = False
    while True:
        try:
            if fds:
                socket.send_fds(chan, [data], list(fds))
            else:
                chan.send(data)
            return
        except (BlockingIOError, InterruptedError):
            if waited:
                raise ChannelClosed("the other side does not read") from None
            poller = select.poll()
            poller.register(chan.fileno(), select.POLLOUT)
            poller.poll(SEND_TIMEOUT * 1000)
            waited = True
        except OSError as exc:  # EPIPE, ECONNRESET, EBADF
            raise ChannelClosed(str(exc)) from exc


def receive(chan: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the descriptors that came with it; ``None`` when nothing is
    waiting. Raises :class:`ChannelClosed` at EOF. A message that does not decode is
    returned as ``{"op": "bad"}`` (its descriptors still returned, for closing)."""
    try:
        data, fds, flags, _ = socket.recv_fds(chan, MAX_MESSAGE, MAX_FDS)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise ChannelClosed(str(exc)) from exc
    if not data and not fds:
        raise ChannelClosed("EOF")
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict) or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("not a message")
    except ValueError:
        msg = {"op": "bad"}
    return msg, fds


def memfd_with(data: bytes | memoryview, name: str = "netbootd-tftp") -> int:
    """A read-only descriptor of a sealed anonymous file holding ``data`` (rendered
    ``cmdline.txt``, netascii text, small files read at open). The worker maps it like
    a file on disk; the seals guarantee nobody can change it under a transfer, and the
    descriptor it gets is opened read-only (through ``/proc/self/fd``), so a worker
    holds no writable descriptor at all."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        try:
            ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /proc: the seals alone keep it immutable
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return ro
