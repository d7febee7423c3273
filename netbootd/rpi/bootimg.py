"""The signed ``boot.img`` a Raspberry Pi 4/5 loads over HTTP, built per node and version.

A boot.img is a FAT image of a boot partition that the bootloader uses as a ramdisk: here
the planned version's Pi boot tree plus the node's own rendered ``cmdline.txt`` and
``config.txt`` (the same text TFTP would serve it). It is made with mtools (``mformat``,
``mmd``, ``mcopy``: no loop device, no mount) with every timestamp fixed through
``SOURCE_DATE_EPOCH`` and a volume serial taken from the content, so the same inputs give
the same bytes. ``boot.sig`` signs it with the operator's RSA-2048 key (:mod:`.sign`).

Images are cached under ``<cache>/<image>/<version>/<content key>.img`` with their
``.sig`` next to them; the key is a hash of the rendered files (a version's tree never
changes). The ``.sig`` is written last: an image without one is unfinished. Before an
image is handed out its bytes are checked against its ``.sig`` (sha256 and signature by
the key in force); the check is remembered per file identity (inode, size, mtime and
ctime: any write or ``utime`` changes ctime), so a storm costs one hash per image. An
image that does not match is deleted and built again; it is never served.

The per-boot token that lifecycle reports prove themselves with is rendered into
cmdline.txt. A token that changed every boot would make every boot a new image, so a
node on HTTP boot gets a token stable per (node, image version), derived from a secret
kept next to the cache (:func:`token_hook`); it still proves the report comes from the
node's own boot files and is checked together with the node's address.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from ..interfaces import Artefacts
    from ..model import BootPlan
    from ..render import ServerInfo
    from ..settings import Settings

log = logging.getLogger("netbootd.rpi.bootimg")

#: Every timestamp inside a boot.img (FAT stores local time from 1980; 2000-01-01 UTC).
FIXED_EPOCH = 946684800
#: Files the node gets rendered instead of the version's own.
RENDERED = ("cmdline.txt", "config.txt")
#: FAT cluster of 4 KiB (8 sectors); the smallest image is FAT16 (>= 4085 clusters).
CLUSTER = 4096
MIN_IMAGE = 20 << 20
#: Above this the image is FAT32 (FAT16 holds at most 65524 clusters of 4 KiB).
FAT16_MAX = 250 << 20


class BuildError(Exception):
    """The image could not be built (a tool failed, the key is unusable)."""


def enabled_for(plan: BootPlan, settings: Settings) -> bool:
    """Does this plan boot over HTTP? The setting switches the feature on; the node's (or
    its profile's) ``vars.http_boot: true`` opts it in."""
    return bool(settings.rpi.http_boot.enabled and plan.answers and plan.image is not None
                and plan.node.vars.get("http_boot") is True)


def compose_config_txt(own: bytes, rendered: str) -> bytes:
    """The version's config.txt with the node's rendered lines appended (as TFTP serves it)."""
    if own and not own.endswith(b"\n"):
        own += b"\n"
    return own + rendered.encode()


@dataclass(frozen=True)
class Content:
    """What goes into one boot.img."""

    image: str
    version: str
    #: (path inside the image, file in the version) for the version's boot tree.
    tree: tuple[tuple[str, Path], ...]
    #: The node's own files, by name at the image's root.
    rendered: tuple[tuple[str, bytes], ...]
    key: str = field(default="")

    @staticmethod
    def make(image: str, version: str, tree: Iterable[tuple[str, Path]],
             rendered: dict[str, bytes]) -> Content:
        tree_t = tuple(sorted(tree))
        rend_t = tuple(sorted(rendered.items()))
        h = hashlib.sha256(f"{image}\0{version}\0".encode())
        for rel, path in tree_t:
            h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        for name, data in rend_t:
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        return Content(image, version, tree_t, rend_t, h.hexdigest()[:24])


def collect(plan: BootPlan, artefacts: Artefacts, server: ServerInfo) -> Content:
    """The boot tree of the plan's version and the node's rendered files (raises the
    renderer's ``RenderError`` for a broken template)."""
    image = plan.image
    assert image is not None
    tree = (image.boot.get("boot_tree", "boot") or "boot").strip("/")
    root = (image.root / tree).resolve()
    files: list[tuple[str, Path]] = []
    own_config = b""
    for rel in image.artefacts:
        if not rel.startswith(tree + "/"):
            continue
        inner = rel[len(tree) + 1:]
        path = artefacts.open(image, rel)
        if path is None or not path.resolve().is_relative_to(root):
            continue  # outside the boot tree once symlinks are followed: never copied
        if inner == "config.txt":
            own_config = path.read_bytes()
        elif inner != "cmdline.txt":
            files.append((inner, path))
    renderer = artefacts.renderer()
    rendered = {
        "cmdline.txt": renderer.render("cmdline.txt", plan, server).encode(),
        "config.txt": compose_config_txt(own_config,
                                         renderer.render("config.txt", plan, server)),
    }
    return Content.make(image.name, image.version, files, rendered)


def image_size(content: Content) -> int:
    """Bytes for an image that holds the content: every file and directory in whole
    clusters, plus room for the FATs and slack, rounded up to a MiB."""
    def clusters(n: int) -> int:
        return max(1, -(-n // CLUSTER)) * CLUSTER

    data = sum(clusters(p.stat().st_size) for _, p in content.tree)
    data += sum(clusters(len(b)) for _, b in content.rendered)
    dirs = {str(Path(rel).parent) for rel, _ in content.tree} - {"."}
    data += CLUSTER * 2 * (len(dirs) + 1) + 32 * (len(content.tree) + 8)
    total = int(data * 1.03) + (1 << 20)
    total = max(MIN_IMAGE, total)
    return -(-total // (1 << 20)) * (1 << 20)


def _mtools(*argv: str) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(FIXED_EPOCH), "MTOOLSRC": "/dev/null",
           "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found: install Debian's mtools") from None
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(argv[:3])}...: {proc.stderr.strip()[:400]}")


def write_image(content: Content, out: Path, work: Path) -> None:
    """Build ``out`` (a FAT image) from ``content``; ``work`` is a scratch directory."""
    size = image_size(content)
    work.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    fmt = ["-c", "8"] if size <= FAT16_MAX else ["-F", "-c", "8"]
    serial = content.key[:8]
    _mtools("mformat", "-i", str(out), "-N", serial, "-v", "BOOT", *fmt, "::")
    dirs = sorted({str(p) for rel, _ in content.tree for p in Path(rel).parents} - {"."},
                  key=lambda d: (d.count("/"), d))
    if dirs:
        _mtools("mmd", "-i", str(out), *(f"::/{d}" for d in dirs))
    by_dir: dict[str, list[str]] = {}
    for rel, path in content.tree:
        by_dir.setdefault(str(Path(rel).parent), []).append(str(path))
    for name, data in content.rendered:
        staged = work / name
        staged.write_bytes(data)
        by_dir.setdefault(".", []).append(str(staged))
    for d in sorted(by_dir, key=lambda d: (d != ".", d.count("/"), d)):
        target = "::/" if d == "." else f"::/{d}/"
        # one call per directory; sources in sorted order (the directory layout follows)
        srcs = sorted(by_dir[d], key=lambda s: Path(s).name)
        for i in range(0, len(srcs), 500):
            _mtools("mcopy", "-i", str(out), "-o", *srcs[i:i + 500], target)


@dataclass(frozen=True)
class Entry:
    """A built, checked boot.img and its boot.sig."""

    image: Path
    sig: str
    sha256: str
    size: int
    version: str
    key: str


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class BootImages:
    """The boot.img cache of one daemon: build, sign, check, prune.

    ``settings`` is a getter (a reload may change the key file). Builds run in threads,
    at most ``parallel`` at a time (default: one per CPU, at most 4: a build is mtools
    subprocesses and hashing, which both run outside the GIL); two asks for the same
    image share one build.
    """

    def __init__(self, settings: Callable[[], Settings], *, parallel: int | None = None
                 ) -> None:
        self._settings = settings
        self._sem: asyncio.Semaphore | None = None
        self._parallel = parallel or max(1, min(4, os.cpu_count() or 1))
        self._building: dict[str, asyncio.Future[Entry]] = {}
        self._checked: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._key_cache: tuple[tuple[int, int, int], Any] | None = None
        self._lock = threading.Lock()
        #: one lock per cached image path: two checks of one file (a Pi's request and the
        #: prebuilder) hash it once, and one never deletes what the other just rebuilt
        self._check_locks: dict[str, threading.Lock] = {}
        self.built = 0  #: images built (metrics, tests)
        self.refused = 0  #: cached images whose bytes did not match their signature
        self.last_ready: dict[tuple[str, str], float] = {}  #: (image, version) -> first ready

    @property
    def parallel(self) -> int:
        """How many builds run at once."""
        return self._parallel

    # -- key -----------------------------------------------------------------------------
    def private_key(self) -> rsa.RSAPrivateKey:
        path = self._settings().rpi.http_boot.key_file
        if path is None:
            raise BuildError("rpi.http_boot.key_file is not set (netbootd keys generate)")
        try:
            st = path.stat()
        except OSError as exc:
            raise BuildError(f"HTTP-boot key {path}: {exc.strerror}") from None
        ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._key_cache
        if hit is not None and hit[0] == ident:
            return hit[1]
        try:
            key = sign.load_private_key(path)
        except sign.SigningKeyError as exc:
            raise BuildError(str(exc)) from None
        with self._lock:
            self._key_cache = (ident, key)
        return key

    # -- cache ---------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self._settings().http_boot_dir

    def paths(self, content: Content) -> tuple[Path, Path]:
        d = self.root / content.image / content.version
        return d / f"{content.key}.img", d / f"{content.key}.sig"

    async def get(self, content: Content) -> Entry:
        """The checked image for this content, built (once) if needed. The build is a
        task of its own: a client that goes away does not cancel it for the others."""
        hit = await asyncio.to_thread(self._cached, content)
        if hit is not None:
            return hit
        task = self._building.get(content.key)
        if task is None:
            task = asyncio.ensure_future(self._build_once(content))
            self._building[content.key] = task
            def done(t: asyncio.Future[Entry], key: str = content.key) -> None:
                self._building.pop(key, None)
                if not t.cancelled():
                    t.exception()  # retrieved here: waiters may all have gone
            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _build_once(self, content: Content) -> Entry:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._parallel)
        async with self._sem:
            return await asyncio.to_thread(self._build, content)

    def _cached(self, content: Content) -> Entry | None:
        """The cached entry if its bytes match its signature by the key in force;
        a mismatch is deleted (and rebuilt by the caller)."""
        img, _ = self.paths(content)
        with self._lock:
            check_lock = self._check_locks.setdefault(str(img), threading.Lock())
        with check_lock:
            return self._check(content)

    def _check(self, content: Content) -> Entry | None:
        img, sigp = self.paths(content)
        try:
            st = img.stat()
            sig_text = sigp.read_text()
        except (OSError, UnicodeDecodeError):
            return None
        ident = _identity(st)
        with self._lock:
            seen = self._checked.get(str(img))
        key = self.private_key()
        if seen is not None and seen == (ident, sig_text) and self._key_ok(sig_text, key):
            return self._entry(content, img, sig_text, st.st_size)
        sha = sign.file_sha256(img)
        try:
            parsed = sign.parse_sig(sig_text)
        except ValueError:
            parsed = None
        if parsed is None or parsed.sha256 != sha:
            self.refused += 1
            log.warning("http-boot: %s does not match its boot.sig; deleted, rebuilding", img)
            for p in (sigp, img):
                p.unlink(missing_ok=True)
            with self._lock:
                self._checked.pop(str(img), None)
            return None
        if not sign.verify_sig(sig_text, sha, key.public_key()):
            # the bytes are intact, the signature is not by the key in force (rotated)
            sig_text = sign.boot_sig(key, sha, int(time.time()))
            _atomic_write(sigp, sig_text.encode())
        if _identity(img.stat()) != ident:
            return None  # changed while we hashed it: check again from the start
        with self._lock:
            self._checked[str(img)] = (ident, sig_text)
        return self._entry(content, img, sig_text, st.st_size)

    def _key_ok(self, sig_text: str, key: rsa.RSAPrivateKey) -> bool:
        """The remembered check still holds for the key in force (cheap: one verify)."""
        parsed = sign.parse_sig(sig_text)
        return sign.verify_sig(sig_text, parsed.sha256, key.public_key())

    def _entry(self, content: Content, img: Path, sig_text: str, size: int) -> Entry:
        ver = (content.image, content.version)
        self.last_ready.setdefault(ver, time.time())
        return Entry(img, sig_text, sig_text.split("\n", 1)[0], size, content.version,
                     content.key)

    def _build(self, content: Content) -> Entry:
        hit = self._cached(content)
        if hit is not None:
            return hit
        key = self.private_key()
        img, sigp = self.paths(content)
        img.parent.mkdir(parents=True, exist_ok=True)
        tag = f".{content.key}.{os.getpid()}.{threading.get_ident()}"
        tmp_img = img.parent / (tag + ".img")
        work = img.parent / (tag + ".d")
        t0 = time.monotonic()
        try:
            write_image(content, tmp_img, work)
            sha = sign.file_sha256(tmp_img)
            sig_text = sign.boot_sig(key, sha, int(time.time()))
            # No fsync of the image: after a crash a torn image fails the check against
            # its boot.sig (the first hand-out hashes it) and is rebuilt, so flushing a
            # 30+ MB file per node to disk (under a storm of activations) buys nothing.
            sigp.unlink(missing_ok=True)  # no .sig while the image is being replaced
            os.replace(tmp_img, img)
            _atomic_write(sigp, sig_text.encode())
        finally:
            tmp_img.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        self.built += 1
        st = img.stat()
        with self._lock:
            self._checked[str(img)] = (_identity(st), sig_text)
        log.info("http-boot: built %s %s (%s, %d MiB) in %.2f s", content.image,
                 content.version, content.key, st.st_size >> 20, time.monotonic() - t0)
        return self._entry(content, img, sig_text, st.st_size)

    def prune(self, keep: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Delete the images of versions no longer stored; returns what went."""
        gone = []
        root = self.root
        if not root.is_dir():
            return gone
        for image_dir in root.iterdir():
            if not image_dir.is_dir():
                continue
            for version_dir in image_dir.iterdir():
                if version_dir.is_dir() and (image_dir.name, version_dir.name) not in keep:
                    shutil.rmtree(version_dir, ignore_errors=True)
                    gone.append((image_dir.name, version_dir.name))
            if not any(image_dir.iterdir()):
                image_dir.rmdir()
        with self._lock:
            for path in list(self._checked):
                if not Path(path).exists():
                    del self._checked[path]
            for path in list(self._check_locks):
                if not Path(path).exists() and not self._check_locks[path].locked():
                    del self._check_locks[path]
        return gone


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the token of an HTTP-boot node ---------------------------------------------------------
def token_hook(settings: Callable[[], Settings]) -> Callable[[BootPlan], str | None]:
    """For the planner: the boot token of a plan that boots over HTTP, stable per
    (node, image, version) so the node's boot.img can be built ahead of time; None for
    every other plan (they keep their random per-boot token)."""
    secrets: dict[Path, bytes] = {}
    lock = threading.Lock()

    def secret(directory: Path) -> bytes:
        path = directory / "token.key"
        with lock:
            hit = secrets.get(path)
            if hit is not None:
                return hit
            directory.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                value = path.read_bytes()
            else:
                value = os.urandom(32)
                with os.fdopen(fd, "wb") as f:
                    f.write(value)
                    os.fsync(f.fileno())
            if len(value) < 16:  # a truncated file: never derive tokens from it
                raise BuildError(f"{path} is damaged; delete it (tokens are re-derived)")
            secrets[path] = value
            return value

    def token_for(plan: BootPlan) -> str | None:
        s = settings()
        if not enabled_for(plan, s):
            return None
        assert plan.image is not None
        msg = f"{plan.node.mac}|{plan.image.name}|{plan.image.version}|{plan.action.value}"
        return hmac.new(secret(s.http_boot_dir), msg.encode(), hashlib.sha256).hexdigest()[:24]

    return token_for
