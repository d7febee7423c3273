"""What a transfer is before it runs: negotiated options and its own port (TID).

The block loop itself is C (:mod:`netbootd.tftp._pump`, run by
:mod:`netbootd.tftp.pumps`); everything a transfer needs decided in Python is here:

* :func:`negotiate`: RFC 2347 options (``blksize`` RFC 2348, ``tsize`` and ``timeout``
  RFC 2349, ``windowsize`` RFC 7440) within our bounds. Only options the client asked
  for and we accept appear in the OACK; an invalid or unacceptable value leaves the
  option out, which RFC 2347 allows, and the client falls back to its default.
* :func:`open_tid`: two sockets share the transfer's port, one *connected* to the
  client, which carries the whole transfer with ``send``/``recv`` (no address to parse
  or build per packet), and one unconnected, which the kernel hands everything else
  sent to that port, so a stranger gets its ERROR 5 from the right port.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

#: RFC 2348 bounds.
BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464
#: RFC 7440 bounds.
WINDOW_MIN, WINDOW_MAX = 1, 65535
#: RFC 2349 bounds (seconds).
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Transfer parameters after option negotiation, and the OACK to send (if any)."""

    blksize: int = 512
    windowsize: int = 1
    timeout: float = 1.0
    oack: dict[str, str] | None = None


def _int(value: str) -> int | None:
    try:
        v = value.strip()
        return int(v) if v.isdigit() else None
    except (AttributeError, ValueError):
        return None


def negotiate(options: dict[str, str], *, size: int, blksize_max: int, windowsize_max: int,
              default_timeout: float, timeout_max: int = TIMEOUT_MAX) -> Negotiated:
    """Accept what we support, within bounds; unknown or invalid options are left out of
    the OACK (RFC 2347 lets a server ignore an option), never an error.

    Only options the client asked for appear in the OACK; a client that asks for
    none gets plain DATA, as RFC 1350 clients expect.

    ``timeout`` above ``timeout_max`` (``tftp.timeout_max``) is refused, not lowered:
    RFC 2349 wants the OACK to echo the client's value, and a client that asked for
    255 s (an attack run held every slot for 30 minutes with it, never ACKing) then
    uses its own default while we use ``tftp.retransmit_timeout``.
    """
    oack: dict[str, str] = {}
    blksize, windowsize, timeout = 512, 1, default_timeout
    if "blksize" in options:
        v = _int(options["blksize"])
        if v is not None and v >= BLKSIZE_MIN:
            blksize = min(v, BLKSIZE_MAX, blksize_max)
            oack["blksize"] = str(blksize)
    if "tsize" in options and _int(options["tsize"]) is not None:
        oack["tsize"] = str(size)
    if "timeout" in options:
        v = _int(options["timeout"])
        if v is not None and TIMEOUT_MIN <= v <= min(TIMEOUT_MAX, timeout_max):
            timeout = float(v)
            oack["timeout"] = str(v)
    if "windowsize" in options:
        v = _int(options["windowsize"])
        if v is not None and v >= WINDOW_MIN:
            windowsize = min(v, WINDOW_MAX, windowsize_max)
            oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack or None)


def open_tid(local_ip: str, peer: tuple[str, int]) -> tuple[socket.socket, socket.socket]:
    """The server's TID for one transfer: (socket connected to ``peer``, socket for
    strangers), both on one fresh ephemeral port of ``local_ip``, non-blocking.

    Order matters. The first socket gets its port *without* SO_REUSEADDR (so the
    kernel picks a port no other socket uses), then is connected (from then on only
    ``peer`` reaches it; anything that slipped in before is discarded), then the
    stranger socket joins the port with SO_REUSEADDR. The kernel delivers a datagram
    to the connected socket when the source matches (it scores higher), else to the
    unconnected one.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger: socket.socket | None = None
    try:
        sock.setblocking(False)
        sock.bind((local_ip, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.connect(peer)
        _drain(sock)
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.setblocking(False)
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(sock.getsockname())
    except OSError:
        sock.close()
        if stranger is not None:
            stranger.close()
        raise
    return sock, stranger


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(1)
        except OSError:  # BlockingIOError: empty; anything else: nothing to keep either
            return
