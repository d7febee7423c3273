"""An emulated Raspberry Pi 5 HTTP boot (tests, bench): what the bootloader does with
``BOOT_ORDER`` nibble 7.

1. ``pieeprom.sig`` (a bootloader update check; 404 is normal): when the sha256 in it
   differs from the bootloader the board runs, fetch ``pieeprom.upd``, check it against
   that sha256 and "flash" it (the board's running sha256 becomes the update's), so the
   next boot does not fetch it again;
2. ``boot.sig``, then ``boot.img``; the image's sha256 must be the first line of the
   signature file, and the ``rsa2048:`` line a valid RSA-2048 PKCS#1 v1.5 signature over
   it by the public key in the "EEPROM", else the board refuses to boot;
3. read the FAT image the way the firmware does: ``config.txt``, ``cmdline.txt``, the dtb
   and the kernel, in memory (:mod:`.fatread`).

Deliberately independent of netbootd's own signing code (:mod:`.sign`), of the mtools
that build the image and of aiohttp, the server's HTTP: a client that shared them would
hide their bugs. And cheap, because a bench runs a hundred of these on the machine that
serves them: each file is received straight into one buffer (no chunk list joined
afterwards), hashed once outside the GIL, and read without temporary files or
subprocesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from .fatread import FatError, FatImage

#: What a Pi 5 reads out of boot.img before it starts the kernel.
PI5_READS = ("config.txt", "bcm2712-rpi-5-b.dtb", "cmdline.txt", "kernel_2712.img")


class BootRefused(Exception):
    """The emulated bootloader would not boot this (bad signature, missing file)."""


@dataclass
class Board:
    """The part of a Pi that survives a reboot: its EEPROM."""

    public_key: rsa.RSAPublicKey
    eeprom_sha256: str = "0" * 64
    flashed: int = 0  #: bootloader updates written


@dataclass
class HttpBootLog:
    files: dict[str, bytes] = field(default_factory=dict)
    sig: str = ""
    image_bytes: int = 0
    image_sha256: str = ""
    eeprom_fetched: bool = False
    seconds: float = 0.0

    @property
    def version(self) -> str | None:
        """``netbootd.version=`` from the cmdline.txt inside the image."""
        for word in self.files.get("cmdline.txt", b"").decode().split():
            if word.startswith("netbootd.version="):
                return word.split("=", 1)[1]
        return None


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 2048:
        raise ValueError("the EEPROM holds an RSA-2048 public key")
    return key


def check_signature(sig_text: str, image: bytes, key: rsa.RSAPublicKey) -> str:
    """What the bootloader checks; raises :class:`BootRefused`. Returns the image's
    sha256 (hex)."""
    lines = [ln.strip() for ln in sig_text.splitlines() if ln.strip()]
    digest = hashlib.sha256(image).digest()
    if not lines or lines[0].lower() != digest.hex():
        raise BootRefused("boot.img sha256 is not the one boot.sig names")
    fields = dict(ln.split(":", 1) for ln in lines[1:] if ":" in ln)
    if "ts" not in fields or "rsa2048" not in fields:
        raise BootRefused("boot.sig lacks ts: or rsa2048:")
    try:
        key.verify(bytes.fromhex(fields["rsa2048"].strip()), digest, padding.PKCS1v15(),
                   utils.Prehashed(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise BootRefused("boot.sig signature does not verify with the EEPROM key") from None
    return digest.hex()


def read_fat(image: bytes | bytearray, names: tuple[str, ...]) -> dict[str, bytes]:
    """Files out of the FAT image, as the firmware reads its ramdisk."""
    try:
        fat = FatImage(image)
        return {name: fat.read(name) for name in names}
    except FatError as exc:
        raise BootRefused(f"boot.img: {exc}") from None


class _Response(asyncio.BufferedProtocol):
    """One HTTP/1.1 response, received by the event loop straight into its buffers: the
    header into a small scratch buffer, the body into one buffer of the announced
    ``Content-Length`` (netbootd always sends one; a body without it is refused). The
    socket stays registered for the whole body, unlike ``sock_recv_into`` per piece."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scratch = bytearray(1 << 16)
        self.head = bytearray()
        self.status = 0
        self.body: bytearray | None = None
        self.view: memoryview | None = None
        self.got = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self.view is not None and self.got < len(self.view):
            return self.view[self.got:]
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.done.done():
            return
        if self.view is not None and self.got < len(self.view):
            self.got += nbytes
        else:
            self._header(nbytes)
        if self.view is not None and self.got >= len(self.view):
            self.done.set_result(None)

    def _header(self, nbytes: int) -> None:
        if self.view is not None:
            self._fail("more bytes than Content-Length")
            return
        self.head += self.scratch[:nbytes]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 1 << 16:
                self._fail("no HTTP response header")
            return
        lines = self.head[:end].decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (ln.partition(":") for ln in lines[1:])}
        try:
            self.status = int(lines[0].split()[1])
            length = int(fields["content-length"])
        except (IndexError, ValueError):
            self._fail(f"bad status line {lines[0]!r}")
            return
        except KeyError:
            self._fail("no Content-Length")
            return
        self.body = bytearray(length)
        self.view = memoryview(self.body)
        rest = self.head[end + 4:end + 4 + length]
        self.view[:len(rest)] = rest
        self.got = len(rest)

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(BootRefused(f"GET {self.path}: {why}"))

    def _where(self) -> str:
        if self.view is None:
            return f"with {len(self.head)} bytes of the response header"
        return f"after {self.got} of {len(self.view)} body bytes (HTTP {self.status})"

    def eof_received(self) -> bool:
        self._fail(f"closed by the server {self._where()}")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost {self._where()} ({exc})")


async def _get(host: str, port: int, path: str) -> bytearray | None:
    """One ``GET`` on a connection of its own, as small as a bootloader's HTTP client.
    404 -> None; any other status but 200 refuses the boot."""
    loop = asyncio.get_running_loop()
    transport, resp = await loop.create_connection(lambda: _Response(path), host, port)
    try:
        transport.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         "Connection: close\r\n\r\n").encode())
        await resp.done
    finally:
        transport.close()
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise BootRefused(f"GET {path}: HTTP {resp.status}")
    assert resp.body is not None
    return resp.body


async def pi5_http_boot(base_url: str, board: Board, *, reads: tuple[str, ...] = PI5_READS,
                        timeout: float = 120.0,
                        between: Callable[[], Awaitable[None]] | None = None
                        ) -> HttpBootLog:
    """One HTTP boot from ``base_url`` (``http://HTTP_HOST:HTTP_PORT/HTTP_PATH``).
    ``between`` runs after boot.sig and before boot.img: a board that is slow to ask
    for the image (tests hold it there to move a channel in between)."""
    log = HttpBootLog()
    t0 = time.monotonic()
    url = urlsplit(base_url)
    host, port, base = url.hostname or "", url.port or 80, url.path.rstrip("/")
    async with asyncio.timeout(timeout):
        sig = await _get(host, port, f"{base}/pieeprom.sig")
        if sig is not None:
            want = sig.decode().split("\n", 1)[0].strip().lower()
            if want != board.eeprom_sha256:
                upd = await _get(host, port, f"{base}/pieeprom.upd")
                if upd is None or hashlib.sha256(upd).hexdigest() != want:
                    raise BootRefused("pieeprom.upd missing or not the one pieeprom.sig names")
                board.eeprom_sha256 = want
                board.flashed += 1
                log.eeprom_fetched = True
        sig_body = await _get(host, port, f"{base}/boot.sig")
        if sig_body is None:
            raise BootRefused("no boot.sig")
        if between is not None:
            await between()
        image = await _get(host, port, f"{base}/boot.img")
        if image is None:
            raise BootRefused("no boot.img")
    log.sig = sig_body.decode()
    log.image_bytes = len(image)
    # hashing 30+ MB releases the GIL: the loop keeps receiving the other Pis' images
    log.image_sha256 = await asyncio.to_thread(check_signature, log.sig, image,
                                               board.public_key)
    if reads:
        log.files = read_fat(image, reads)
    log.seconds = time.monotonic() - t0
    return log
