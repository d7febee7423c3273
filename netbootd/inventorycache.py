"""Reloads of nodes.yaml that parse and validate only the node entries whose text changed.

Why: a fleet's nodes.yaml is mostly the same from one reload to the next (one node
edited, a few added). Parsing and validating 10,000 entries again costs most of a
second; looking up 10,000 unchanged entry texts costs milliseconds.

How: the text is cut into its top-level part (profiles, ``allow_shrink``, comments)
and one piece per node entry: the lines from an entry's key at the node indentation up
to the next one. A piece seen before (same text) reuses its validated ``Node``; a new
piece is parsed and validated alone. Cutting is safe because YAML block structure is
decided by indentation: a line at the node indentation always starts the next key in a
whole-file parse as well, and a piece that cuts through anything that spans lines
(a quoted or flow scalar, a flow collection) cannot parse on its own.

A daemon's first load (start-up) has nothing to reuse yet. It reads a snapshot instead:
the parsed content of the nodes.yaml it last started with, as JSON in its state
directory (``snapshot``), used only for the very same text and parser. JSON is parsed in
C and validated by the same pydantic model as ever, so what costs most of a start-up
(YAML parsed in Python, 0.3 s at 10,000 nodes) is skipped and nothing is trusted
unvalidated. Content JSON cannot carry exactly (dates, non-string keys) is never saved.

Only success takes this path. Anything it cannot vouch for (a layout it does not cut,
a piece that does not parse on its own, an alias or merge key, a duplicate, a
validation or cross-node problem, too many changed pieces to gain anything) goes to
``inventory.load_inventory``, so every value is the full load's and every error keeps
its file, line and field exactly as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .inventory import (
    DEFAULT_PROFILE,
    Inventory,
    InventoryFile,
    Node,
    Profile,
    ambiguous_profiles,
    inventory_from_data,
    load_inventory,
)
from .model import normalise_mac
from .yamlfile import LineDict, load_yaml, parse_yaml_text, paused_gc

#: Above this share of changed entries a whole-file load is as cheap: take it.
REPARSE_SHARE = 0.2

#: A line at column 0 that is not a comment: the end of the nodes block.
_TOP_LINE = re.compile(r"\n[^ \n#]")
_FIRST_CONTENT = re.compile(r"\n( +)[^ \n#]")
#: Several documents, directives, other line ends, tabs: never cut.
_UNCUT = ("\n---", "\n...", "\n%", "\r", "\t", "\n\ufeff")


@dataclass(frozen=True, slots=True)
class Pieces:
    """nodes.yaml cut for reuse: the text without the nodes block, and each entry's text."""

    head: str
    entries: list[str]


def cut(text: str) -> Pieces | None:
    """``text`` cut into its top-level part and one piece per node entry, or None when
    its layout is not the plain block layout this module can cut safely.

    Every search looks for a newline first: the regular expression engine then skips
    ahead with a plain substring search (a 10,000-node file is cut in milliseconds)."""
    t = "\n" + text
    if any(mark in t for mark in _UNCUT):
        return None
    at = t.find("\nnodes:")
    if at < 0 or t.find("\nnodes:", at + 1) >= 0:
        return None
    eol = t.find("\n", at + 1)
    eol = len(t) if eol < 0 else eol
    rest = t[at + len("\nnodes:"):eol].strip()
    if rest and not rest.startswith("#"):
        return None  # nodes: {...} or a value on the line: the full load reads it
    top = _TOP_LINE.search(t, eol)
    end = top.start() if top else len(t)
    block = t[eol:end + 1]  # with the newline that ends its last line
    head = (t[:at] + t[end:])[1:]
    first = _FIRST_CONTENT.search(block)
    if first is None:
        return Pieces(head, [])
    indent = len(first.group(1))
    # a content line indented less than the entries: a layout this module does not cut
    for width in range(1, indent):
        if re.search("\n" + " " * width + "[^ \n#]", block):
            return None
    starts = [m.start() + 1 for m in re.finditer("\n" + " " * indent + "[^ \n#]", block)]
    bounds = [*starts, len(block) + 1]
    return Pieces(head, [block[bounds[i]:bounds[i + 1]] for i in range(len(starts))])


@dataclass(frozen=True, slots=True)
class _Entry:
    """A node entry as validated: its MAC and its ``Node``."""

    mac: str
    node: Node


class _Vouch(Exception):
    """This text must take the full load (which decides values and errors)."""


class InventoryLoader:
    """``load_inventory`` with memory: keeps each entry's validated ``Node`` by its text,
    so the next load of a similar file validates only the new entries. One per daemon;
    ``reused``/``parsed`` say what the last load did (tests, logs)."""

    #: The snapshot's name in the daemon's state directory (a dot-file: no reload trigger).
    SNAPSHOT_NAME = ".inventory-snapshot.json"

    def __init__(self, snapshot: Path | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self._head: tuple[str, dict[str, Profile], bool] | None = None
        self._lock = threading.Lock()
        #: Where the first load looks for, and ``save_snapshot`` writes, the parsed content.
        self.snapshot = snapshot
        self._unsaved: tuple[str, Any] | None = None
        self.reused = 0
        self.parsed = 0
        self.from_snapshot = False  #: the last load validated the snapshot's content

    def load(self, path: Path, text: str) -> Inventory:
        """The inventory of ``text`` (nodes.yaml's content); raises ``ConfigError`` as
        ``load_inventory`` does."""
        with self._lock, paused_gc():
            pieces = cut(text)
            self.from_snapshot = False
            if pieces is not None and self._entries:
                try:
                    return self._incremental(path, pieces)
                except _Vouch:
                    pass
            inventory = self._first_load(path, text) if not self._entries else None
            if inventory is None:
                inventory = load_inventory(path, text)
            self._remember(text, pieces, inventory)
            self.reused, self.parsed = 0, len(inventory.nodes)
            return inventory

    def _first_load(self, path: Path, text: str) -> Inventory | None:
        """The inventory from the snapshot of this very text, or (none, or a stale one)
        from the text, its parsed content kept for ``save_snapshot``."""
        digest = _text_digest(text)
        data = _read_snapshot(self.snapshot, digest) if self.snapshot is not None else None
        if data is not None:
            with contextlib.suppress(Exception):  # a snapshot never decides an error
                inventory = inventory_from_data(path, data)
                self.from_snapshot = True
                return inventory
        data = load_yaml(path, text)
        inventory = inventory_from_data(path, data)
        if self.snapshot is not None:
            self._unsaved = (digest, data)
        return inventory

    def save_snapshot(self) -> None:
        """Write the content the first load parsed as the snapshot for the next start
        (in the caller's thread: off the start-up path), if JSON carries it exactly."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, None
        if unsaved is None or self.snapshot is None:
            return
        write_snapshot(self.snapshot, *unsaved)

    def _incremental(self, path: Path, pieces: Pieces) -> Inventory:
        entries = self._entries
        new = [p for p in pieces.entries if p not in entries]
        if len(new) > max(16, REPARSE_SHARE * len(pieces.entries)):
            raise _Vouch("too much changed")
        profiles, allow_shrink = self._profiles(pieces.head)
        fresh = {p: _entry_of(p) for p in new}
        nodes: dict[str, Node] = {}
        by_serial: dict[str, str] = {}
        for piece in pieces.entries:
            entry = entries.get(piece) or fresh[piece]
            if entry.mac in nodes:
                raise _Vouch("duplicate")
            node = entry.node
            nodes[entry.mac] = node
            if node.profile and node.profile not in profiles:
                raise _Vouch("unknown profile")
            if node.serial:
                if node.serial in by_serial:
                    raise _Vouch("duplicate serial")
                by_serial[node.serial] = entry.mac
        # what the next reload reuses; entries of earlier files are dropped once they
        # are as many as this file's (memory stays bounded by the fleet)
        entries.update(fresh)
        if len(entries) > 2 * len(pieces.entries) + 64:
            self._entries = {p: entries[p] for p in pieces.entries}
        self.reused, self.parsed = len(pieces.entries) - len(new), len(new)
        return Inventory(nodes=nodes, profiles=profiles, by_serial=by_serial, source=path,
                         allow_shrink=allow_shrink)

    def _profiles(self, head: str) -> tuple[dict[str, Profile], bool]:
        """Profiles and ``allow_shrink`` of the top-level part, validated (or as before)."""
        if self._head is not None and self._head[0] == head:
            return self._head[1], self._head[2]
        try:
            data = parse_yaml_text(head)
        except Exception as exc:
            raise _Vouch("head") from exc
        if data is None:
            data = LineDict()
        if not isinstance(data, dict) or "nodes" in data:
            raise _Vouch("head")
        try:
            parsed = InventoryFile.model_validate(data)
        except ValidationError as exc:
            raise _Vouch("head") from exc
        profiles = dict(parsed.profiles)
        profiles.setdefault(DEFAULT_PROFILE, Profile())
        if ambiguous_profiles(Path("-"), data, profiles):
            raise _Vouch("ambiguous")
        self._head = (head, profiles, parsed.allow_shrink)
        return profiles, parsed.allow_shrink

    def _remember(self, text: str, pieces: Pieces | None, inventory: Inventory) -> None:
        """After a full load: each entry's text with its validated node, matched by order
        (the full load keeps the file's order), when the cut agrees with it."""
        self._entries, self._head = {}, None
        if pieces is None or len(pieces.entries) != len(inventory.nodes):
            return
        try:  # the cut's top-level part must be what the full load found
            profiles, allow_shrink = self._profiles(pieces.head)
        except _Vouch:
            profiles, allow_shrink = {}, not inventory.allow_shrink
        if profiles != inventory.profiles or allow_shrink != inventory.allow_shrink:
            self._head = None
            return
        kept: dict[str, _Entry] = {}
        for piece, (mac, node) in zip(pieces.entries, inventory.nodes.items(), strict=True):
            if _mac_of_key_line(piece) != mac:
                return  # a layout the cut reads otherwise: learn it piece by piece
            kept[piece] = _Entry(mac, node)
        self._entries = kept


def _entry_of(piece: str) -> _Entry:
    """One node entry parsed and validated alone."""
    try:
        data = parse_yaml_text(piece)
    except Exception as exc:
        raise _Vouch("piece") from exc
    if not isinstance(data, dict) or len(data) != 1:
        raise _Vouch("piece")
    ((key, value),) = data.items()
    if not isinstance(value, dict) and value is not None:
        raise _Vouch("piece")
    try:
        mac = normalise_mac(str(key))
        node = Node.model_validate(value if value is not None else {})
    except (ValueError, ValidationError) as exc:
        raise _Vouch("piece") from exc
    return _Entry(mac, node)


_SNAPSHOT_FORMAT = "netbootd-inventory-1"
#: The code that made what a snapshot holds (the YAML parser): a snapshot another parser
#: made is not used. Validation is not in it: every start validates the content again,
#: so an upgrade that changes only the validation or anything else still starts warm.
_CODE_STAMP = hashlib.blake2b(
    b"".join(Path(__file__).with_name(n).read_bytes()
             for n in ("yamlfile.py", "inventorycache.py"))
    + yaml.__version__.encode() + str(getattr(yaml, "__with_libyaml__", "")).encode(),
    digest_size=16).hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _head(digest: str) -> dict[str, str]:
    """A snapshot's first line: its format, the parser that made it, the text's digest."""
    return {"format": _SNAPSHOT_FORMAT, "code": _CODE_STAMP, "text": digest}


def _read_snapshot(path: Path, digest: str, *, content: bool = True) -> Any:
    """The content saved for the text with ``digest`` by this parser, else None; with
    ``content=False`` only whether there is one (True), without reading it."""
    try:
        with path.open(encoding="utf-8") as f:
            if json.loads(f.readline()) != _head(digest):
                return None
            return json.loads(f.read()) if content else True
    except (OSError, ValueError):
        return None


def write_snapshot(path: Path, digest: str, data: Any) -> bool:
    """Save ``data`` (the parsed content of the text with ``digest``) at ``path``, if JSON
    carries it exactly; True when written."""
    try:
        body = json.dumps(data, separators=(",", ":"), allow_nan=False)
        if json.loads(body) != data:
            return False
    except (TypeError, ValueError):
        return False  # dates, binary, non-string keys: the YAML stays the only source
    head = json.dumps(_head(digest))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(head + "\n" + body, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def parse_ahead(inventory: Path, snapshot: Path) -> Callable[[], None]:
    """Start parsing nodes.yaml into its snapshot in a child process when no snapshot of
    its current text exists; returns the function that waits for that child.

    Why: on a start without a snapshot (the first one, or after the file or the parser
    changed) YAML parsing is a third of the start-up (0.3 s at 10,000 nodes), and the
    other big part, importing the services' modules, does not need the inventory. With
    two CPUs the child parses while the daemon imports; the daemon's own first load then
    finds the snapshot and only validates (as every start does). Nothing depends on the
    child: whatever it fails to write, the first load parses the text itself, with the
    same errors. On one CPU it would only compete, so nothing is started."""
    if len(os.sched_getaffinity(0)) < 2:
        return _nothing
    try:
        text = inventory.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return _nothing
    digest = _text_digest(text)
    if _read_snapshot(snapshot, digest, content=False):
        return _nothing
    try:
        snapshot.parent.mkdir(parents=True, exist_ok=True)  # the state directory
    except OSError:
        return _nothing
    pid = os.fork()
    if pid == 0:  # the child: parse, save, leave without running anything of the parent's
        code = 1
        try:
            with paused_gc():
                code = 0 if write_snapshot(snapshot, digest, load_yaml(inventory, text)) else 1
        finally:
            os._exit(code)

    def wait() -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return wait


def _nothing() -> None:
    return None


def _mac_of_key_line(piece: str) -> str | None:
    """The MAC an entry's first line names as its key (None: not a plain MAC key)."""
    first = piece.split("\n", 1)[0].strip()
    key = first[:-1] if first.endswith(":") else first.split(": ", 1)[0]
    try:
        return normalise_mac(key)
    except ValueError:
        return None
