"""An emulated Raspberry Pi 5 TFTP client (lab, tests and bench), on plain UDP sockets.

It behaves as the Pi bootloader does on the wire (docs/rpi-netboot.md):
RRQ ``octet`` with ``tsize 0`` and ``blksize 1468`` from a new source port for every
request, an unanswered RRQ resent from the same port every ~2 s, strictly one
block per round trip, probe-and-abort (read the OACK, answer ERROR 0 "Early
terminate", ask again later), block numbers wrapping 65535 -> 0, and the Pi 5 load
order with its prefix fallback.

Deliberately independent of :mod:`netbootd.tftp.codec` (its own few struct calls):
a peer that shares the server's codec would hide the codec's bugs.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field

#: Pi 5 load order over TFTP (docs/rpi-netboot.md). Names the firmware may not find
#: (pieeprom.sig, armstub8-2712.bin) are part of the real sequence.
PI5_FILES = (
    "config.txt", "pieeprom.sig", "bcm2712-rpi-5-b.dtb", "config.txt", "initramfs_2712",
    "bcm2712-rpi-5-b.dtb", "overlays/overlay_map.dtb", "config.txt",
    "overlays/bcm2712d0.dtbo", "cmdline.txt", "armstub8-2712.bin", "kernel_2712.img",
)


class TftpError(Exception):
    """The server answered with ERROR."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Result:
    data: bytes = b""
    oack: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    server_port: int = 0
    retransmits: int = 0

    @property
    def tsize(self) -> int | None:
        v = self.oack.get("tsize")
        return int(v) if v is not None else None


class _Fetch:
    """One RRQ as a callback state machine (no task or timer handle per block)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: tuple[str, int], path: str,
                 *, options: dict[str, str], probe: bool, rrq_retry: float,
                 ack_timeout: float, tries: int, bind_ip: str) -> None:
        self.loop = loop
        self.server = server
        self.probe = probe
        self.rrq_retry = rrq_retry
        self.ack_timeout = ack_timeout
        self.tries = tries
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((bind_ip, 0))
        body = [path.encode(), b"octet"]
        for k, v in options.items():
            body += [k.encode(), str(v).encode()]
        self.rrq = b"\x00\x01" + b"".join(x + b"\0" for x in body)
        self.asked = set(options)
        self.blksize = 512
        self.peer_port: int | None = None
        self.expected = 1
        self.chunks: list[bytes] = []
        self.last_sent = self.rrq
        self.misses = 0
        self.last_progress = loop.time()
        self.result = Result()
        self.fut: asyncio.Future[Result] = loop.create_future()
        self.buf = bytearray(65536 + 4)
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = time.monotonic()

    def start(self) -> asyncio.Future[Result]:
        self.loop.add_reader(self.sock.fileno(), self.on_readable)
        self.sock.sendto(self.rrq, self.server)
        self.timer = self.loop.call_later(self.rrq_retry, self.on_timer)
        return self.fut

    def close(self) -> None:
        if self.timer:
            self.timer.cancel()
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()

    def finish(self, exc: BaseException | None = None) -> None:
        if self.fut.done():
            return
        self.close()
        if exc is not None:
            self.fut.set_exception(exc)
            return
        self.result.data = b"".join(self.chunks)
        self.result.seconds = time.monotonic() - self.t0
        self.fut.set_result(self.result)

    def send(self, pkt: bytes) -> None:
        self.last_sent = pkt
        assert self.peer_port is not None
        try:
            self.sock.sendto(pkt, (self.server[0], self.peer_port))
        except OSError:
            pass

    def on_timer(self) -> None:
        self.timer = None
        if self.fut.done():
            return
        now = self.loop.time()
        wait = self.rrq_retry if self.peer_port is None else self.ack_timeout
        if now < self.last_progress + wait:
            self.timer = self.loop.call_at(self.last_progress + wait, self.on_timer)
            return
        self.misses += 1
        if self.misses > self.tries:
            self.finish(TimeoutError(f"no answer after {self.tries} tries"))
            return
        self.result.retransmits += 1
        self.last_progress = now
        if self.peer_port is None:
            self.sock.sendto(self.rrq, self.server)  # same source port, as the Pi does
        else:
            self.send(self.last_sent)
        self.timer = self.loop.call_at(now + wait, self.on_timer)

    def on_readable(self) -> None:
        try:
            n, addr = self.sock.recvfrom_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(exc)
            return
        if addr[0] != self.server[0] or n < 4:
            return
        if self.peer_port is None:
            self.peer_port = addr[1]
            self.result.server_port = addr[1]
        elif addr[1] != self.peer_port:
            return  # another TID (a late answer to a resent RRQ): not ours
        op, arg = struct.unpack_from(">HH", self.buf)
        if op == 5:
            msg = bytes(self.buf[4:n]).split(b"\0", 1)[0].decode("utf-8", "replace")
            self.finish(TftpError(arg, msg))
        elif op == 6 and self.expected == 1 and not self.chunks:
            parts = bytes(self.buf[2:n]).rstrip(b"\0").split(b"\0")
            oack = {parts[i].decode().lower(): parts[i + 1].decode()
                    for i in range(0, len(parts) - 1, 2)}
            extra = set(oack) - self.asked
            if extra:
                self.finish(AssertionError(f"OACK has options not asked for: {extra}"))
                return
            self.result.oack = oack
            self.blksize = int(oack.get("blksize", 512))
            self.last_progress = self.loop.time()
            if self.probe:
                self.send(struct.pack(">HH", 5, 0) + b"Early terminate\0")
                self.finish()
            else:
                self.send(struct.pack(">HH", 4, 0))
        elif op == 3:
            if arg == self.expected & 0xFFFF:
                self.chunks.append(bytes(self.buf[4:n]))
                self.last_progress = self.loop.time()
                self.misses = 0
                self.send(struct.pack(">HH", 4, arg))
                self.expected += 1
                if n - 4 < self.blksize:
                    self.finish()
            elif arg == (self.expected - 1) & 0xFFFF:
                self.send(self.last_sent)  # our ACK was lost: say it again


async def fetch(server: tuple[str, int], path: str, *, blksize: int | None = 1468,
                tsize: bool = True, probe: bool = False, rrq_retry: float = 2.0,
                ack_timeout: float = 1.0, tries: int = 5, bind_ip: str = "127.0.0.1",
                file_timeout: float = 120.0) -> Result:
    """One Pi-style RRQ from a fresh source port. ``probe`` = read the OACK, then abort."""
    options: dict[str, str] = {}
    if tsize:
        options["tsize"] = "0"
    if blksize:
        options["blksize"] = str(blksize)
    f = _Fetch(asyncio.get_running_loop(), server, path, options=options, probe=probe,
               rrq_retry=rrq_retry, ack_timeout=ack_timeout, tries=tries, bind_ip=bind_ip)
    try:
        return await asyncio.wait_for(f.start(), file_timeout)
    finally:
        f.close()


@dataclass
class BootLog:
    """What one emulated Pi loaded: file -> bytes (None = ERROR 1) and per-file seconds."""

    files: dict[str, bytes | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    prefix_used: bool = True


async def pi5_boot(server: tuple[str, int], prefix: str | None, *,
                   files: tuple[str, ...] = PI5_FILES, bind_ip: str = "127.0.0.1",
                   probe: bool = True, **kw: object) -> BootLog:
    """Load the Pi 5 file set: ``<prefix>/config.txt`` first and, if that is missing,
    drop the prefix (as the firmware does); each present file is probed and then
    fetched, like the bootloader."""
    log = BootLog()
    base = f"{prefix}/" if prefix else ""
    if prefix:
        try:
            await fetch(server, base + "config.txt", probe=True, bind_ip=bind_ip, **kw)  # type: ignore[arg-type]
        except TftpError as exc:
            if exc.code != 1:
                raise
            base, log.prefix_used = "", False
    for name in files:
        path = base + name
        t0 = time.monotonic()
        try:
            if probe:
                await fetch(server, path, probe=True, bind_ip=bind_ip, **kw)  # type: ignore[arg-type]
            res = await fetch(server, path, bind_ip=bind_ip, **kw)  # type: ignore[arg-type]
            log.files[name] = res.data
        except TftpError as exc:
            if exc.code != 1:
                raise
            log.files[name] = None
        log.seconds[name] = max(log.seconds.get(name, 0.0), time.monotonic() - t0)
    return log
