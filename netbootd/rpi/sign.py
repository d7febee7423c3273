"""boot.sig and pieeprom.sig: what the Pi bootloader checks, and the operator's key.

``boot.sig`` is three text lines::

    <sha256 of boot.img, hex>
    ts: <unix time>
    rsa2048: <RSA-2048 PKCS#1 v1.5 signature over SHA-256(boot.img), hex>

which is what ``openssl dgst -sign key.pem -sha256`` produces over the image, written
out the way the bootloader reads it. ``pieeprom.sig`` has the first two lines only.
The signature is deterministic (PKCS#1 v1.5), so the same image, key and ``ts`` give
the same file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

#: The bootloader's key size (the EEPROM holds an RSA-2048 public key).
KEY_BITS = 2048
_CHUNK = 1 << 20


class SigningKeyError(Exception):
    """The signing key is missing, unreadable or not RSA-2048."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"cannot read HTTP-boot key {path}: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != KEY_BITS:
        raise SigningKeyError(f"{path}: the Pi bootloader needs an RSA-{KEY_BITS} key")
    return key


def generate_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def public_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    """The public key as ``-----BEGIN PUBLIC KEY-----`` PEM (SubjectPublicKeyInfo):
    what ``rpi-eeprom-config --pubkey`` reads."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def write_key_pair(directory: Path, *, name: str = "http-boot", force: bool = False
                   ) -> tuple[Path, Path, rsa.RSAPrivateKey]:
    """``<name>.key`` (mode 0600) and ``<name>.pub.pem`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    priv, pub = directory / f"{name}.key", directory / f"{name}.pub.pem"
    if not force and (priv.exists() or pub.exists()):
        raise FileExistsError(f"{priv} or {pub} exists (--force replaces them)")
    key = generate_key()
    tmp = priv.with_suffix(".key.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    os.replace(tmp, priv)
    pub.write_bytes(public_pem(key))
    return priv, pub, key


def sign_digest(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """RSA-2048 PKCS#1 v1.5 over an already computed SHA-256."""
    return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def boot_sig(key: rsa.RSAPrivateKey, sha256_hex: str, ts: int) -> str:
    sig = sign_digest(key, bytes.fromhex(sha256_hex))
    return f"{sha256_hex}\nts: {ts}\nrsa2048: {sig.hex()}\n"


def digest_sig(sha256_hex: str, ts: int) -> str:
    """pieeprom.sig: the update's sha256 and a timestamp, no signature."""
    return f"{sha256_hex}\nts: {ts}\n"


@dataclass(frozen=True)
class ParsedSig:
    sha256: str
    ts: int
    rsa2048: bytes | None


def parse_sig(text: str) -> ParsedSig:
    """Read a boot.sig / pieeprom.sig; raises ValueError when it is not one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines or len(lines[0]) != 64:
        raise ValueError("first line must be a sha256 in hex")
    sha = lines[0].lower()
    bytes.fromhex(sha)
    ts, sig = None, None
    for ln in lines[1:]:
        key, _, value = ln.partition(":")
        if key == "ts":
            ts = int(value.strip())
        elif key == "rsa2048":
            sig = bytes.fromhex(value.strip())
    if ts is None:
        raise ValueError("no ts: line")
    return ParsedSig(sha, ts, sig)


def verify_sig(text: str, sha256_hex: str, public: rsa.RSAPublicKey) -> bool:
    """Does ``text`` name ``sha256_hex`` and carry a valid signature by ``public``?"""
    try:
        parsed = parse_sig(text)
    except ValueError:
        return False
    if parsed.sha256 != sha256_hex.lower() or parsed.rsa2048 is None:
        return False
    try:
        public.verify(parsed.rsa2048, bytes.fromhex(sha256_hex), padding.PKCS1v15(),
                      utils.Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
