"""Fleet bootloader updates: ``pieeprom.upd`` named by a profile, ``pieeprom.sig`` made here.

At every network boot a Pi reads ``pieeprom.sig`` next to its boot files; when the sha256
in it differs from the bootloader it runs, it fetches ``pieeprom.upd``, writes it to its
EEPROM and reboots. The operator makes the update once with ``rpi-eeprom-config`` on any
Pi (docs/rpi-netboot.md, section 7), puts it into ``rpi.pieeprom_dir`` and names it in a
profile or node: ``vars: {pieeprom: fleet-2026-12.bin}``. netbootd serves it under the
node's prefix with a ``pieeprom.sig`` of its sha256 and modification time.

Only a plain file name inside ``rpi.pieeprom_dir`` is accepted (no path, no symlink out),
so a vars entry cannot make netbootd serve another file of the host.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import sign

if TYPE_CHECKING:
    from ..model import BootPlan
    from ..settings import Settings

NAMES = ("pieeprom.sig", "pieeprom.upd")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: The Pi 5 EEPROM is 2 MiB; anything much larger is not a bootloader image.
MAX_SIZE = 16 << 20


@dataclass(frozen=True)
class Update:
    path: Path
    sha256: str
    sig: bytes


class NotOffered(Exception):
    """No update for this node (none named, or the named file is unusable)."""


_cache: dict[Path, tuple[tuple[int, int, int, int], Update]] = {}
_lock = threading.Lock()


def update_for(plan: BootPlan, settings: Settings) -> Update:
    """The update the plan's node is offered; raises :class:`NotOffered` with why not."""
    name = plan.node.vars.get("pieeprom")
    if not name:
        raise NotOffered("no vars.pieeprom for this node")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise NotOffered(f"vars.pieeprom {name!r} is not a file name")
    base = settings.rpi.pieeprom_dir
    try:
        path = (base / name).resolve(strict=True)
        inside = path.is_relative_to(base.resolve(strict=True))
        st = path.stat()
    except OSError as exc:
        raise NotOffered(f"{base / name}: {exc.strerror}") from None
    if not inside or not path.is_file() or st.st_size > MAX_SIZE:
        raise NotOffered(f"{base / name} is not a bootloader image in {base}")
    ident = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        hit = _cache.get(path)
    if hit is not None and hit[0] == ident:
        return hit[1]
    sha = sign.file_sha256(path)
    upd = Update(path, sha, sign.digest_sig(sha, int(st.st_mtime)).encode())
    with _lock:
        if len(_cache) > 64:
            _cache.clear()
        _cache[path] = (ident, upd)
    return upd


def read_update(upd: Update) -> bytes:
    """The update's bytes, checked against the sha256 its .sig announces."""
    data = upd.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != upd.sha256:
        with _lock:
            _cache.pop(upd.path, None)
        raise NotOffered(f"{upd.path} changed while being served; try again")
    return data

