"""Forward a loopback TCP port of the host into a lab namespace (the status page for the demo).

The lab must not add addresses or routes to the root namespace, so a browser on the host
cannot reach netbootd inside ``srv`` directly. This forwarder listens on ``127.0.0.1:PORT``
in the root namespace and opens each upstream connection from a thread that has joined the
lab namespace with ``setns(2)``: network namespaces are per thread, and a socket stays in
the namespace it was created in. Hand-written because socat is not installed here and
Python 3.11 has no ``os.setns``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import socket
import threading

log = logging.getLogger("netbootd.lab.forward")

CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Forwarder:
    """``127.0.0.1:listen_port`` (root namespace) -> ``target`` inside namespace ``ns``."""

    def __init__(self, ns: str, target: tuple[str, int], listen_port: int) -> None:
        self.ns, self.target, self.listen_port = ns, target, listen_port
        self._requests: queue.Queue[queue.Queue[socket.socket | Exception] | None] = \
            queue.Queue()
        self._server: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> Forwarder:
        srv = socket.create_server(("127.0.0.1", self.listen_port), reuse_port=False)
        srv.settimeout(0.5)
        self._server = srv
        threading.Thread(target=self._connector, name="lab-fwd-ns", daemon=True).start()
        threading.Thread(target=self._accept, name="lab-fwd-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._requests.put(None)
        if self._server is not None:
            self._server.close()

    def _connector(self) -> None:
        """Lives in the lab namespace; creates every upstream socket there."""
        _setns(f"/run/netns/{self.ns}")
        while True:
            reply = self._requests.get()
            if reply is None:
                return
            try:
                reply.put(socket.create_connection(self.target, timeout=5))
            except OSError as exc:
                reply.put(exc)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            reply: queue.Queue[socket.socket | Exception] = queue.Queue()
            self._requests.put(reply)
            upstream = reply.get()
            if isinstance(upstream, Exception):
                log.warning("forward to %s in %s failed: %s", self.target, self.ns, upstream)
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until either end closes, then close both (one direction
    of a forwarded connection: run one per direction)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
