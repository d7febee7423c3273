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
   and the kernel, here with mtools' ``mcopy`` out of the image file.

Deliberately independent of netbootd's own signing code (:mod:`.sign`): a client that
shared it would hide its bugs.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

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


def read_fat(image: bytes, names: tuple[str, ...]) -> dict[str, bytes]:
    """Files out of a FAT image (mtools), as the firmware reads its ramdisk."""
    out: dict[str, bytes] = {}
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="pi-ramdisk-", dir=shm) as tmp:
        img = Path(tmp) / "boot.img"
        img.write_bytes(image)
        for name in names:
            dest = Path(tmp) / name.replace("/", "_")
            proc = subprocess.run(["mcopy", "-n", "-i", str(img), f"::/{name}", str(dest)],
                                  check=False, capture_output=True, env={"MTOOLSRC": "/dev/null",
                                                            "MTOOLS_SKIP_CHECK": "1",
                                                            "PATH": "/usr/bin:/bin"})
            if proc.returncode != 0:
                raise BootRefused(f"{name} not in boot.img: {proc.stderr.decode().strip()}")
            out[name] = dest.read_bytes()
    return out


async def _get(session: aiohttp.ClientSession, url: str) -> bytes | None:
    async with session.get(url) as resp:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise BootRefused(f"GET {url}: HTTP {resp.status}")
        return await resp.read()


async def pi5_http_boot(base_url: str, board: Board, *, reads: tuple[str, ...] = PI5_READS,
                        session: aiohttp.ClientSession | None = None,
                        timeout: float = 120.0,
                        between: Callable[[], Awaitable[None]] | None = None
                        ) -> HttpBootLog:
    """One HTTP boot from ``base_url`` (``http://HTTP_HOST:HTTP_PORT/HTTP_PATH``).
    ``between`` runs after boot.sig and before boot.img: a board that is slow to ask
    for the image (tests hold it there to move a channel in between)."""
    log = HttpBootLog()
    t0 = time.monotonic()
    own = session is None
    if session is None:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
    base = base_url.rstrip("/")
    try:
        sig = await _get(session, f"{base}/pieeprom.sig")
        if sig is not None:
            want = sig.decode().split("\n", 1)[0].strip().lower()
            if want != board.eeprom_sha256:
                upd = await _get(session, f"{base}/pieeprom.upd")
                if upd is None or hashlib.sha256(upd).hexdigest() != want:
                    raise BootRefused("pieeprom.upd missing or not the one pieeprom.sig names")
                board.eeprom_sha256 = want
                board.flashed += 1
                log.eeprom_fetched = True
        sig_body = await _get(session, f"{base}/boot.sig")
        if sig_body is None:
            raise BootRefused("no boot.sig")
        if between is not None:
            await between()
        image = await _get(session, f"{base}/boot.img")
        if image is None:
            raise BootRefused("no boot.img")
    finally:
        if own:
            await session.close()
    log.sig = sig_body.decode()
    log.image_bytes = len(image)
    # hashing 30+ MB releases the GIL: a storm of emulated Pis checks in parallel
    log.image_sha256 = await asyncio.to_thread(check_signature, log.sig, image,
                                               board.public_key)
    if reads:
        log.files = await asyncio.to_thread(read_fat, image, reads)
    log.seconds = time.monotonic() - t0
    return log
