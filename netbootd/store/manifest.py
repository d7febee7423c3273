"""``manifest.json``: the pydantic model of a build, and its ed25519 signature check.

Pure: parsing, path rules and signature maths, no file system walking (ingest.py
does that). A manifest names the image, the version, what kind of build it is
and the sha256 of every regular file, so verifying the manifest (signature) and
then every checksum proves the whole build.

Signatures (ed25519, via ``cryptography``) come in two forms, either is enough:

- ``"signature"`` in the manifest: base64 of the signature over the *canonical*
  manifest (the JSON without ``signature``, keys sorted, no spaces);
  :func:`sign_manifest` produces it.
- a detached ``manifest.json.sig`` next to the manifest: the signature (raw 64
  bytes or base64) over the exact bytes of ``manifest.json``; this is what
  ``openssl pkeyutl -sign -rawin`` writes, so CI needs no Python.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MANIFEST = "manifest.json"
DETACHED_SIG = "manifest.json.sig"

Kind = Literal["kernel+initrd", "pi-boot+rootfs", "rootfs", "disk", "installer"]
#: Older spellings of a kind, accepted and normalised (``disk-image`` was the first name).
KIND_ALIASES = {"disk-image": "disk"}
Compression = Literal["none", "zst", "xz", "gz"]
#: File name suffix of a disk image -> its compression (the only names a disk may have).
DISK_SUFFIXES: dict[str, str] = {".img": "none", ".img.zst": "zst", ".img.xz": "xz",
                                 ".img.gz": "gz"}

#: Image names and versions become directory names: one safe path component each.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """The manifest is missing, unparsable, invalid or wrongly signed (a rejection reason)."""


#: Versions may not be called this: ``/files/<image>/channels/<channel>/…`` is the stable
#: channel URL (http/files.py).
RESERVED_VERSIONS = frozenset({"channels"})


def check_name(value: str, what: str = "name") -> str:
    """One safe path component: letters, digits, ``. _ + -``; not starting with a dot."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits and . _ + - "
                         "(not starting with a dot), at most 128 characters")
    if what == "version" and value in RESERVED_VERSIONS:
        raise ValueError(f"invalid version {value!r}: reserved for channel URLs")
    return value


def check_relpath(value: str) -> str:
    """A relative POSIX path inside the build: no absolute paths, no ``..``, no empty parts."""
    if not isinstance(value, str) or not value or "\\" in value or "\0" in value:
        raise ValueError(f"invalid path {value!r}")
    p = PurePosixPath(value)
    if p.is_absolute():
        raise ValueError(f"absolute path {value!r}")
    parts = [x for x in value.split("/") if x not in ("", ".")]
    if not parts or any(x == ".." for x in parts):
        raise ValueError(f"path {value!r} leaves the build")
    return "/".join(parts)


class Artefact(BaseModel):
    """One regular file of the build."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Relative POSIX path inside the build.")
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(description="Lower-case hex sha256 of the content.")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        v = check_relpath(v)
        if v in (MANIFEST, DETACHED_SIG):
            raise ValueError(f"{v} is not an artefact")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not _HEX64.fullmatch(v):
            raise ValueError("sha256 must be 64 hex digits")
        return v


class BootSection(BaseModel):
    """Where the boot pieces are; which keys a build needs depends on its kind."""

    model_config = ConfigDict(extra="allow")
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    rootfs: str | None = None
    boot_tree: str | None = None
    disk: str | None = None

    @field_validator("kernel", "initrd", "rootfs", "boot_tree", "disk")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return check_relpath(v) if v is not None else None


def disk_compression(path: str) -> str | None:
    """The compression a disk image's file name says (``x.img.zst`` -> ``zst``), or None
    when the name is not ``*.img``, ``*.img.zst``, ``*.img.xz`` or ``*.img.gz``."""
    for suffix, comp in sorted(DISK_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if path.endswith(suffix) and len(path) > len(suffix) and not path.endswith("/" + suffix):
            return comp
    return None


class DiskSection(BaseModel):
    """The disk image of a ``disk`` build: one raw image file, maybe compressed.

    ``size``/``sha256`` describe the stored file (they must equal its artefact entry);
    the ``uncompressed_*`` figures are the builder's word for the raw image, which the
    installer checks after writing it (the store never decompresses a build).
    """

    model_config = ConfigDict(extra="forbid")
    path: str
    compression: Compression
    size: int = Field(ge=0)
    sha256: str
    uncompressed_size: int = Field(ge=0)
    uncompressed_sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_relpath(v)

    @field_validator("sha256", "uncompressed_sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not _HEX64.fullmatch(v):
            raise ValueError("sha256 must be 64 hex digits")
        return v


class Manifest(BaseModel):
    """The schema of ``manifest.json`` (documented in docs/store.md)."""

    model_config = ConfigDict(extra="forbid")
    image: str
    version: str
    created: datetime
    kind: Kind
    boards: list[str] = Field(min_length=1)
    boot: BootSection = Field(default_factory=BootSection)
    artefacts: list[Artefact]
    disk: DiskSection | None = None
    signature: str | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: object) -> object:
        return KIND_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        return check_name(v, "image name")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return check_name(v, "version")

    @field_validator("artefacts")
    @classmethod
    def _unique(cls, v: list[Artefact]) -> list[Artefact]:
        seen: set[str] = set()
        for a in v:
            if a.path in seen:
                raise ValueError(f"artefact {a.path!r} listed twice")
            seen.add(a.path)
        return v

    @model_validator(mode="after")
    def _disk(self) -> Manifest:
        """The disk section agrees with the artefacts and the file name (pure checks;
        that the file is really there and hashes right is ingest's job)."""
        d = self.disk
        if d is None:
            return self
        if self.kind != "disk":
            raise ValueError(f"a disk section needs kind disk, not {self.kind}")
        art = next((a for a in self.artefacts if a.path == d.path), None)
        if art is None:
            raise ValueError(f"disk.path {d.path!r} is not an artefact")
        if (art.size, art.sha256) != (d.size, d.sha256):
            raise ValueError(f"disk size/sha256 differ from the artefact entry of {d.path!r}")
        suffix = disk_compression(d.path)
        if suffix is None:
            raise ValueError(f"disk.path {d.path!r} must end in "
                             f"{', '.join(DISK_SUFFIXES)}")
        if suffix != d.compression:
            raise ValueError(f"disk.compression {d.compression!r} does not match "
                             f"{d.path!r} (expected {suffix!r})")
        if self.boot.disk is not None and self.boot.disk != d.path:
            raise ValueError(f"boot.disk {self.boot.disk!r} differs from disk.path {d.path!r}")
        return self

    @property
    def total_size(self) -> int:
        return sum(a.size for a in self.artefacts)

    def boot_dict(self) -> dict[str, str]:
        """The ``boot`` section as ImageRef.boot wants it (only keys that are set);
        ``disk`` is the disk section's path when there is one."""
        out = {k: str(v) for k, v in self.boot.model_dump().items() if v is not None}
        if self.disk is not None:
            out["disk"] = self.disk.path
        return out


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate; the error message is a rejection reason a human can act on."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError("manifest.json must be a JSON object")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "manifest"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ManifestError(f"invalid manifest: {where}: {first['msg']}{more}") from exc


def canonical_bytes(raw: dict[str, Any]) -> bytes:
    """What the in-manifest signature covers: the manifest without ``signature``."""
    body = {k: v for k, v in raw.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(raw: dict[str, Any], private_key: Any) -> dict[str, Any]:
    """Return ``raw`` with ``signature`` set (CI helper; ``private_key`` is an Ed25519PrivateKey)."""
    sig = private_key.sign(canonical_bytes(raw))
    return {**raw, "signature": base64.b64encode(sig).decode()}


def load_public_key(path: Path) -> Any:
    """An ed25519 public key from PEM, OpenSSH (``ssh-ed25519 AAAA..``) or base64 raw 32 bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import (
        load_pem_public_key,
        load_ssh_public_key,
    )

    data = path.read_bytes().strip()
    key: Any = None
    if data.startswith(b"-----BEGIN"):
        key = load_pem_public_key(data)
    elif data.startswith(b"ssh-ed25519"):
        key = load_ssh_public_key(data)
    else:
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{path}: not an ed25519 public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an ed25519 public key")  # noqa: TRY004 - config error
    return key


def _decode_sig(data: bytes) -> bytes:
    if len(data) == 64:
        return data
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ManifestError("signature is neither 64 raw bytes nor base64") from exc


def verify_signature(manifest_bytes: bytes, detached: bytes | None, keys: list[Any]) -> str:
    """Check the build's signature against trusted keys; return which form matched.

    Raises :class:`ManifestError` when there is no signature or none verifies.
    """
    from cryptography.exceptions import InvalidSignature

    if not keys:
        raise ManifestError("signature required but no trusted keys are configured")
    candidates: list[tuple[str, bytes, bytes]] = []
    raw = json.loads(manifest_bytes)
    if isinstance(raw, dict) and raw.get("signature"):
        candidates.append(("embedded", _decode_sig(str(raw["signature"]).encode()),
                           canonical_bytes(raw)))
    if detached is not None:
        candidates.append(("detached", _decode_sig(detached), manifest_bytes))
    if not candidates:
        raise ManifestError("signature required but the build is not signed")
    for form, sig, body in candidates:
        for key in keys:
            try:
                key.verify(sig, body)
                return form
            except InvalidSignature:
                continue
    raise ManifestError("signature does not verify with any trusted key")
