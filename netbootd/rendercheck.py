"""The render check: every artefact of every node rendered once, and what is kept so the
next check renders only what changed.

StrictUndefined makes a template that names a missing variable a config error; the
check (``netbootd check``, start-up, every reload) finds it by rendering each artefact
for each node, never as a 500 in the middle of a boot (render.py).

What is kept (``CheckCache``), so that the cost follows the change, not the fleet:

- per node, keyed by its plan (everything it renders from, bar the boot's random
  session and token) under the settings, secrets and code (``results generation``),
  the outcome of each artefact with the *stamp* of the template it was rendered from
  (its source and those of the templates it includes, imports or extends). A template
  edit renders that artefact again for every node, and nothing else;
- the last check that found nothing (``CheckBase``): with the same templates, settings,
  profiles and store, only nodes whose nodes.yaml entry changed are planned again, so a
  one-node edit costs one node;
- on disk (``save``/``load``), the clean outcomes, so a restarted daemon starts warm.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import struct
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.meta

from . import __version__
from .inventory import Inventory
from .model import BootPlan, ClientFacts, ClientKind, ImageRef
from .render import ARTEFACTS, RenderError, ServerInfo, placeholder_secrets
from .yamlfile import Problem, paused_gc

if TYPE_CHECKING:
    from .render import Renderer

#: What failed rendering one artefact: (artefact, template, error text, line, message).
_Found = tuple[str, str, str, int, str]
#: One artefact's outcome: the stamp of the template it was rendered from, what failed.
_Outcome = tuple[bytes, tuple[_Found, ...]]
#: A plan's outcomes, one per artefact in ``ARTEFACTS`` order.
_Entry = tuple[_Outcome, ...]

_CHECK_SESSION = "c" * 12
_CHECK_TOKEN = "c" * 24
#: The machine that stands for every unknown one (the default profile) in a check.
_DEFAULT_MACHINE = "02:00:00:00:00:01"
#: What ``check`` renders a node with before any image exists.
_PLACEHOLDER_IMAGE = ImageRef(name="check", version="0", root=Path("/nonexistent"),
                              boot={"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "",
                                    "rootfs": "rootfs", "boot_tree": "boot"})
#: Changes whenever the code that builds a context or runs the check does: a persisted
#: result from older code is not trusted.
_CODE_STAMP = hashlib.blake2b(
    Path(__file__).read_bytes() + Path(__file__).with_name("render.py").read_bytes(),
    digest_size=8).hexdigest()


def check(renderer: Renderer, inventory: Inventory, images: Any,
          cache: CheckCache | None, *, with_default: bool = True) -> list[Problem]:
    """Every artefact for every node and (``with_default``) the default profile; the
    problems found.

    ``cache`` (updated in place): what earlier checks found; see the module docstring.
    ``renderer.check_renders`` / ``check_planned`` count the renders and plans done."""
    with paused_gc():  # yamlfile.paused_gc says why
        return _check(renderer, inventory, images, cache, with_default)


def check_forked(renderer: Renderer, inventory: Inventory, images: Any,
                 cache: CheckCache | None, *, processes: int, min_nodes: int = 2000
                 ) -> list[Problem]:
    """``check`` with the fleet split over ``processes`` forked copies of this process
    (each renders its share; rendering is CPU-bound and the GIL allows one thread at a
    time), for ``netbootd check``: a one-shot, single-threaded process. The problems are
    the same as ``check``'s, in the same order; ``cache`` is only read. Fewer nodes than
    ``min_nodes``, or one process, is a plain ``check``."""
    macs = list(inventory.nodes)
    if processes < 2 or len(macs) < min_nodes:
        return check(renderer, inventory, images, cache)
    size = -(-len(macs) // processes)
    shares = [macs[i:i + size] for i in range(0, len(macs), size)]
    last = len(shares) - 1  # checks the default profile too: it comes after every node
    readers = []
    for i, share in enumerate(shares[1:], start=1):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: check its share, send the problems, leave at once
            try:
                os.close(r)
                try:
                    found = check(renderer, _part(inventory, share), images,
                                  _read_only(cache), with_default=i == last)
                    data = pickle.dumps(found)
                except BaseException as exc:  # noqa: BLE001 - the parent checks this share
                    data = pickle.dumps(exc.__class__.__name__)
                with os.fdopen(w, "wb") as out:
                    out.write(data)
            finally:
                os._exit(0)  # never back into the parent's code, whatever happened
        os.close(w)
        readers.append((pid, r, share, i == last))
    answers: list[bytes] = []
    try:
        problems = check(renderer, _part(inventory, shares[0]), images, _read_only(cache),
                         with_default=last == 0)
    finally:  # every child is read and reaped, also when this process's share failed
        for pid, r, _share, _default in readers:
            with os.fdopen(r, "rb") as f:
                answers.append(f.read())
            os.waitpid(pid, 0)
    for (_pid, _r, share, with_default), data in zip(readers, answers, strict=True):
        try:
            found = pickle.loads(data)
        except Exception:  # noqa: BLE001 - a child that died: check its share here
            found = None
        if not isinstance(found, list):
            found = check(renderer, _part(inventory, share), images, _read_only(cache),
                          with_default=with_default)
        problems.extend(found)
    # each share reports a template problem once; the whole fleet, once too
    seen: set[tuple[str, int, str, str]] = set()
    out = []
    for p in problems:
        key = (p.file, p.line, p.field.split(" for ", 1)[0], p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _part(inventory: Inventory, macs: list[str]) -> Inventory:
    nodes = {m: inventory.nodes[m] for m in macs}
    return Inventory(nodes=nodes, profiles=inventory.profiles,
                     by_serial={s: m for s, m in inventory.by_serial.items() if m in nodes},
                     source=inventory.source, allow_shrink=inventory.allow_shrink)


def _read_only(cache: CheckCache | None) -> CheckCache | None:
    """A copy of what ``cache`` knows, for a check whose findings are not kept."""
    if cache is None:
        return None
    copy = CheckCache()
    copy.generation, copy.results = cache.generation, dict(cache.results)
    return copy


def _check(renderer: Renderer, inventory: Inventory, images: Any,
           cache: CheckCache | None, with_default: bool = True) -> list[Problem]:
    from .planner import NoImages, decide

    settings = renderer.settings
    resolver = images or NoImages()
    server = ServerInfo(ip="192.0.2.1", http_port=settings.http.port)
    results_gen = results_generation(renderer)
    generation = _full_generation(results_gen, renderer.sources)
    epoch = cache.images_epoch(resolver) if cache is not None else None
    base = cache.base_for(generation, epoch, inventory) if cache is not None else None
    known = cache.results_for(results_gen) if cache is not None else {}
    if base is not None:
        # Only nodes that differ from the last clean check can find anything new (or
        # whose outcome is no longer kept): templates, settings, profiles and store are
        # the same.
        old, old_keys = base.inventory.nodes, base.keys
        todo = [(m, n) for m, n in inventory.nodes.items()
                if ((o := old.get(m)) is not n and o != n) or old_keys.get(m) not in known]
        with_default = with_default and old_keys.get(_DEFAULT_MACHINE) not in known
    else:
        todo = list(inventory.nodes.items())
    machines = [ClientFacts(mac=m, serial=n.serial,
                            kind=ClientKind.RPI if n.serial else ClientKind.IPXE)
                for m, n in todo]
    if with_default:
        machines.append(ClientFacts(mac=_DEFAULT_MACHINE, kind=ClientKind.IPXE))
    resolver = StoreAnswers(resolver)
    # the default profile is checked too, as if unknown machines were booted
    as_default = settings.model_copy(
        update={"policy": settings.policy.model_copy(update={"unknown": "default"})})
    stamps = _Stamps(renderer)
    found: dict[bytes, _Entry] = {}
    keys: dict[str, bytes] = {}
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for facts in machines:
        # the session and token are random per boot: fixed here, so the key (and the
        # text rendered) is the node's content; templates are checked even before any
        # image exists
        plan = decide(facts, inventory, as_default, resolver, now=0.0,
                      session=_CHECK_SESSION, token=_CHECK_TOKEN)
        if plan.image is None:
            plan = replace(plan, image=_PLACEHOLDER_IMAGE)
        key = _plan_key(plan)
        entry = _entry_for(renderer, plan, server, found.get(key) or known.get(key), stamps)
        entry = stamps.shared(entry)
        found[key] = entry
        keys[facts.mac] = key
        for _stamp, failures in entry:
            for artefact, template, text, line, message in failures:
                if (template, text) in seen:
                    continue
                seen.add((template, text))
                problems.append(Problem(str(settings.paths.templates / template), line,
                                        f"{artefact} for {plan.node.hostname}", message))
    renderer.check_planned = len(machines)
    if cache is not None:
        if base is not None:
            # every node of this inventory: its new key, or the one it had; the base's
            # outcomes stay too while it is the base (a rejected edit undone costs none)
            keys = {m: keys.get(m) or base.keys[m]
                    for m in (*inventory.nodes, _DEFAULT_MACHINE)}
            results = {k: known[k] for k in (*base.keys.values(), *keys.values())
                       if k in known}
            results.update(found)
            found = results
        cache.update(results_gen, found)
        if not problems:
            cache.set_base(CheckBase(generation, epoch, inventory, keys))
    return problems


def _entry_for(renderer: Renderer, plan: BootPlan, server: ServerInfo,
               entry: _Entry | None, stamps: _Stamps) -> _Entry:
    """``entry`` (what an earlier check found for this plan) brought up to date: each
    artefact whose template stamp changed is rendered again, the others are kept.

    One context per node (user-data gets the secrets, as placeholders), built only if
    something is rendered."""
    names = [renderer.template_name(a, plan) for a in ARTEFACTS]
    want = [stamps(n) for n in names]
    if entry is not None and all(o[0] == w for o, w in zip(entry, want, strict=True)):
        return entry
    context: dict[str, Any] | None = None
    out: list[_Outcome] = []
    for i, artefact in enumerate(ARTEFACTS):
        if entry is not None and entry[i][0] == want[i]:
            out.append(entry[i])
            continue
        if context is None:
            # what jinja's render reads: the environment's globals under the context
            context = {**renderer.env.globals,
                       **renderer.context(plan, server, placeholders=True)}
        ctx = context
        if artefact == "user-data":
            ctx = dict(context)
            ctx["secrets"] = placeholder_secrets(renderer.settings)
        renderer.check_renders += 1
        try:
            renderer.render_checked(artefact, names[i], ctx)
        except RenderError as exc:
            text = str(exc)
            out.append((want[i], ((artefact, exc.template, text, exc.line,
                                   text.split(": ", 2)[-1]),)))
            continue
        out.append(stamps.clean(want[i]))
    return tuple(out)


class _Stamps:
    """Template name -> digest of its source and of every template it includes, imports
    or extends (all of them when a name is computed at render time); the renderer keeps
    them (``renderer.stamps``), so a renderer of the same sources reuses them."""

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer
        self._memo: dict[str, bytes] = renderer.stamps
        self._clean: dict[bytes, _Outcome] = {}
        self._entries: dict[_Entry, _Entry] = {}

    def __call__(self, name: str) -> bytes:
        stamp = self._memo.get(name)
        if stamp is None:
            stamp = self._memo[name] = self._compute(name)
        return stamp

    def clean(self, stamp: bytes) -> _Outcome:
        """The one shared outcome "rendered cleanly from ``stamp``"."""
        return self._clean.setdefault(stamp, (stamp, ()))

    def shared(self, entry: _Entry) -> _Entry:
        """One object for equal entries (most nodes: every artefact clean from the same
        templates), so a fleet's outcomes cost a pointer a node."""
        return self._entries.setdefault(entry, entry)

    def _compute(self, name: str) -> bytes:
        sources = self._renderer.sources
        used: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current in used:
                continue
            used.add(current)
            source = sources.get(current)
            if source is None:
                continue
            try:
                refs = list(jinja2.meta.find_referenced_templates(
                    self._renderer.env.parse(source)))
            except jinja2.TemplateSyntaxError:
                refs = []  # renders as a syntax error whatever else changes
            if None in refs:
                used |= set(sources)
                break
            todo.extend(r for r in refs if r is not None)
        h = hashlib.blake2b(digest_size=16)
        for n in sorted(used):
            source = sources.get(n)
            h.update(n.encode() + b"\0" + (b"\1" if source is None else source.encode())
                     + b"\0")
        return h.digest()


def results_generation(renderer: Renderer) -> bytes:
    """Digest of everything besides the plan and the templates that decides what a check
    finds: the settings, which secret files are readable, and the code that builds the
    context. Outcomes are kept per generation."""
    settings = renderer.settings
    h = hashlib.blake2b(digest_size=16)
    for part in (__version__, jinja2.__version__, _CODE_STAMP):
        h.update(part.encode() + b"\0")
    try:
        h.update(settings.model_dump_json().encode())
    except Exception:  # noqa: BLE001 - an unserialisable value: fall back to its repr
        h.update(repr(settings).encode())
    for name, path in sorted(settings.secrets.items()):
        ok = os.access(path, os.R_OK) and path.is_file()
        h.update(f"\0{name}={path}:{ok}".encode())
    return h.digest()


def _full_generation(results_gen: bytes, sources: dict[str, str]) -> bytes:
    """``results_gen`` and every template source: what a clean check's base holds for."""
    h = hashlib.blake2b(results_gen, digest_size=16)
    for name in sorted(sources):
        h.update(b"\0" + name.encode() + b"\0" + sources[name].encode())
    return h.digest()


def _plan_key(plan: BootPlan) -> bytes:
    """Digest of what a plan renders from: the node's effective content and the plan's
    decision (``repr`` covers every field, the image's ``boot`` section included)."""
    text = repr((plan.action, plan.reason, plan.stage, plan.facts, plan.node, plan.image,
                 plan.image.boot if plan.image else None, plan.disk,
                 plan.disk.boot if plan.disk else None))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class StoreAnswers:
    """The image store's answers for one pass over the fleet (a check): a machine the
    store pins nothing for gets what its image, channel and inventory pin say, asked of
    the store once per distinct question instead of once per node.

    Why: each ``resolve`` reads the store's pin table afresh (a stat and a copy), which
    for 10,000 nodes cost more than rendering them. A resolver without ``pins()`` is
    asked every time."""

    def __init__(self, images: Any) -> None:
        self._images = images
        pins = getattr(images, "pins", None)
        self._pinned: set[str] | None = set(pins()) if callable(pins) else None
        self._answers: dict[tuple[str, str, str | None], Any] = {}

    def resolve(self, image: str, channel: str, pin: str | None, *, mac: str | None = None
                ) -> ImageRef | None:
        if self._pinned is None or (mac is not None and mac in self._pinned):
            return self._images.resolve(image, channel, pin, mac=mac)
        key = (image, channel, pin)
        try:
            return self._answers[key]
        except KeyError:
            answer = self._answers[key] = self._images.resolve(image, channel, pin, mac=None)
            return answer


@dataclass(frozen=True)
class CheckBase:
    """The last check that found nothing: what it checked, and each machine's plan key.

    A later check with the same ``generation`` (templates, settings, secrets, code), the
    same ``images_epoch`` (no store change since) and the same profiles plans and renders
    only the nodes whose entry differs from this inventory's: nothing else a node's
    templates see can have changed."""

    generation: bytes
    images_epoch: Any
    inventory: Inventory
    keys: dict[str, bytes]  #: MAC (and the default machine) -> plan key


class CheckCache:
    """What checks found, kept across reloads (and, through ``save``/``load``, across
    restarts): plan key -> each artefact's outcome, for one results generation (a
    settings or secret edit starts afresh), and the last clean check. Thread-safe
    enough for one reload at a time plus readers."""

    #: File format marker; a file without it is ignored.
    MAGIC = b"netbootd-check-2\n"
    #: Its name in the daemon's state directory (a dot-file: never a reload trigger).
    FILE_NAME = ".render-check.cache"

    def __init__(self) -> None:
        self.generation: bytes | None = None
        self.results: dict[bytes, _Entry] = {}
        self._lock = threading.Lock()
        self._base: CheckBase | None = None
        self._watched: Any = None  #: weak reference to the image store counted
        self._store_changes = 0

    def images_epoch(self, images: Any) -> Any:
        """A value that stays the same while ``images`` does not change: the store's
        change count (its ``on_change`` listeners), or None for a resolver that cannot
        say (then every check plans every node)."""
        from .planner import NoImages

        if type(images) is NoImages:
            return "no images"
        hooks = getattr(images, "on_change", None)
        if not isinstance(hooks, list):
            return None
        with self._lock:
            watched = self._watched() if self._watched is not None else None
            if watched is not images:
                try:
                    self._watched = weakref.ref(images)
                except TypeError:
                    return None
                hooks.append(self._store_changed)
                self._store_changes += 1
            return (id(images), self._store_changes)

    def _store_changed(self) -> None:
        with self._lock:
            self._store_changes += 1

    def base_for(self, generation: bytes, epoch: Any, inventory: Inventory
                 ) -> CheckBase | None:
        """The last clean check, if a check of ``inventory`` may start from it."""
        with self._lock:
            base = self._base
        if (base is None or epoch is None or base.generation != generation
                or base.images_epoch != epoch
                or base.inventory.profiles != inventory.profiles):
            return None
        return base

    def set_base(self, base: CheckBase) -> None:
        with self._lock:
            self._base = base

    def results_for(self, generation: bytes) -> dict[bytes, _Entry]:
        with self._lock:
            return self.results if generation == self.generation else {}

    def update(self, generation: bytes, results: dict[bytes, _Entry]) -> None:
        """Keep ``results`` (one check's nodes) as what is known for ``generation``."""
        with self._lock:
            self.generation, self.results = generation, results

    def save(self, path: Path) -> None:
        """Write the clean outcomes (nodes whose every artefact rendered) to ``path``
        atomically; a failure to write costs only the next start-up's time.

        Format: MAGIC, generation (16 bytes), the number of distinct stamps (2 bytes)
        and the stamps (16 bytes each), then per node its plan key (16 bytes) and one
        byte per artefact: the index of its stamp."""
        with self._lock:
            generation, results = self.generation, self.results
        if generation is None:
            return
        index: dict[bytes, int] = {}
        encoded: dict[int, bytes | None] = {}  # per distinct entry (most nodes share one)
        rows = []
        for key, entry in results.items():
            row = encoded.get(id(entry), b"")
            if row == b"":
                row = None
                if len(entry) == len(ARTEFACTS) and not any(f for _, f in entry):
                    for stamp, _ in entry:
                        index.setdefault(stamp, len(index))
                    if len(index) > 255:
                        return
                    row = bytes(index[stamp] for stamp, _ in entry)
                encoded[id(entry)] = row
            if row is not None:
                rows.append(key + row)
        head = self.MAGIC + generation + struct.pack("<H", len(index)) + b"".join(index)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(head + b"".join(rows))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load(self, path: Path) -> None:
        """Take the clean outcomes ``save`` wrote (nothing, if absent or malformed)."""
        try:
            data = path.read_bytes()
        except OSError:
            return
        at = len(self.MAGIC)
        if not data.startswith(self.MAGIC) or len(data) < at + 18:
            return
        generation = data[at:at + 16]
        (count,) = struct.unpack_from("<H", data, at + 16)
        at += 18
        outcomes = [(data[i:i + 16], ()) for i in range(at, at + 16 * count, 16)]
        at += 16 * count
        width = 16 + len(ARTEFACTS)
        if len(outcomes) != count or (len(data) - at) % width:
            return
        shared: dict[bytes, _Entry] = {}
        results: dict[bytes, _Entry] = {}
        try:
            for i in range(at, len(data), width):
                row = data[i + 16:i + width]
                entry = shared.get(row)
                if entry is None:
                    entry = shared[row] = tuple(outcomes[j] for j in row)
                results[data[i:i + 16]] = entry
        except IndexError:
            return
        with self._lock:
            if self.generation is None:
                self.generation, self.results = generation, results
