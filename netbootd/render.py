"""Per-node text from jinja2 templates: iPXE script, Pi cmdline.txt/config.txt, cloud-init.

StrictUndefined everywhere: a template that names a missing variable is a
config error that ``netbootd check`` (and every reload) finds by rendering
every artefact for every node, never a 500 in the middle of a boot.

Secrets (cluster join tokens, SSH keys) are read from the files named in
``settings.secrets`` only while rendering ``user-data``; no other artefact can
see them, and they are never logged.

The templates in force are the ones that were validated: a ``Renderer`` reads every
template source into memory when it is built (``template_sources``) and renders only
from that snapshot, so a broken edit on disk that a reload rejected never goes live.
Validation (``check``) renders secrets as placeholders, and every error text leaving
this module has secret values replaced by ``<secret:NAME>`` (``scrub``): a template
error ends up in ``config_error``, which /readyz, the status page, the log and the
event files publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2

from . import __version__
from .inventory import Inventory
from .model import Action, BootPlan, ClientFacts, ClientKind, ImageRef, mac_dashes
from .settings import Settings
from .yamlfile import Problem, paused_gc

#: artefact -> default template file (relative to paths.templates); a profile or node
#: overrides one with ``templates: {artefact: file}``.
DEFAULT_TEMPLATES: dict[str, str] = {
    "ipxe": "ipxe/node.ipxe.j2",
    "cmdline.txt": "rpi/cmdline.txt.j2",
    "config.txt": "rpi/config.txt.j2",
    "meta-data": "cloud-init/meta-data.j2",
    "user-data": "cloud-init/user-data.j2",
    "vendor-data": "cloud-init/vendor-data.j2",
    "network-config": "cloud-init/network-config.j2",
    "extlinux.conf": "uboot/extlinux.conf.j2",
    "boot.scr": "uboot/boot.scr.j2",
    "grub.cfg": "grub/grub.cfg.j2",
}
ARTEFACTS = tuple(DEFAULT_TEMPLATES)


class RenderError(Exception):
    """A template could not be rendered for a node: a configuration problem."""

    def __init__(self, artefact: str, template: str, message: str, line: int = 0) -> None:
        self.artefact, self.template, self.line = artefact, template, line
        super().__init__(f"{template}:{line}: {artefact}: {message}")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """How the node reaches us, as seen on the interface its request arrived on."""

    ip: str
    http_port: int = 8080
    public_url: str | None = None

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.ip}]" if ":" in self.ip else self.ip  # an IPv6 literal in a URL
        return f"http://{host}:{self.http_port}"

    @classmethod
    def for_arrival(cls, settings: Settings, local_ip: str) -> ServerInfo:
        """The one place that says how a node reaches us: ``network.advertise`` if set,
        else the address its request arrived on; ``http.public_url`` overrides URLs.
        DHCP, TFTP rendering and HTTP all build their ServerInfo here."""
        ip = str(settings.network.advertise) if settings.network.advertise else local_ip
        ip = ip.removeprefix("::ffff:")
        if ip in ("", "0.0.0.0", "::"):
            ip = "127.0.0.1"
        return cls(ip=ip, http_port=settings.http.port, public_url=settings.http.public_url)


def secret_values(settings: Settings) -> dict[str, str]:
    """Every secret value the daemon knows of, by name: the files named under
    ``secrets`` and the API token. Unreadable or empty files are left out."""
    files: dict[str, Path] = dict(settings.secrets)
    if settings.http.api_token_file is not None:
        files.setdefault("api_token", settings.http.api_token_file)
    out: dict[str, str] = {}
    for name, path in files.items():
        try:
            value = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if value.strip():
            out[name] = value
    return out


def scrub(text: str, settings: Settings) -> str:
    """``text`` with every secret value replaced by ``<secret:NAME>``.

    Both the value as templates see it (stripped) and as Python's repr escapes it
    (an exception message quoting it with ``'...'``) are replaced, longest first, so a
    secret that contains another is never half-replaced.
    """
    if not text:
        return text
    forms: list[tuple[str, str]] = []
    for name, raw in secret_values(settings).items():
        for v in {raw, raw.strip(), repr(raw.strip())[1:-1], repr(raw)[1:-1]}:
            if v:
                forms.append((v, f"<secret:{name}>"))
    for value, mark in sorted(forms, key=lambda f: -len(f[0])):
        text = text.replace(value, mark)
    return text


class _Secrets:
    """Lazy secret lookup: a file is read only when a template asks for that name.

    ``placeholders``: answer ``<secret:NAME>`` instead of the value (validation), after
    checking the file is readable, so a check never has a secret in hand to leak.
    """

    def __init__(self, files: dict[str, Path], *, placeholders: bool = False) -> None:
        self._files = files
        self._placeholders = placeholders
        self.read: set[str] | None = None  #: names asked for, when tracking

    def __getattr__(self, name: str) -> str:
        return self[name]

    def __getitem__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        path = self._files.get(name)
        if self.read is not None:
            self.read.add(name)
            return "<secret>"
        if path is None:
            raise jinja2.UndefinedError(f"secret {name!r} is not configured (settings.secrets)")
        if self._placeholders:
            if not os.access(path, os.R_OK) or not path.is_file():
                raise jinja2.UndefinedError(f"secret {name!r}: cannot read {path}")
            return f"<secret:{name}>"
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise jinja2.UndefinedError(f"secret {name!r}: cannot read {path}: {exc.strerror}")

    def __contains__(self, name: str) -> bool:
        return name in self._files


def is_source_name(name: str) -> bool:
    """Files in the template directory that are templates (not editor droppings)."""
    return not (name.startswith(".") or name.endswith(("~", ".swp", ".tmp")))


def template_sources(directory: Path) -> dict[str, str]:
    """Every template under ``directory`` as ``{relative/posix/name: source}``."""
    out: dict[str, str] = {}
    if not directory.is_dir():
        return out
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not is_source_name(n):
                continue
            path = Path(root) / n
            try:
                data = path.read_bytes()
            except OSError:
                continue  # vanished meanwhile: a template that is used is then "not found"
            out[path.relative_to(directory).as_posix()] = data.decode("utf-8", "replace")
    return out


class _SnapshotLoader(jinja2.BaseLoader):
    """Template sources from memory, named by their path in the template directory (so
    errors and ``_template_line`` still name the file); never stale, never re-read."""

    def __init__(self, directory: Path, sources: dict[str, str]) -> None:
        self._dir = directory
        self._sources = sources

    def get_source(self, environment: jinja2.Environment, template: str
                   ) -> tuple[str, str, Any]:
        try:
            source = self._sources[template]
        except KeyError:
            raise jinja2.TemplateNotFound(template) from None
        return source, str(self._dir / template), lambda: True

    def list_templates(self) -> list[str]:
        return sorted(self._sources)


class Renderer:
    """Renders artefacts for a plan from the template sources it was built with.

    ``sources`` (name -> text) is the snapshot a reload validated; when omitted, the
    template directory is read once, now. Nothing is read from disk afterwards: an
    edit takes effect only through a reload that validates it.
    """

    def __init__(self, settings: Settings, sources: dict[str, str] | None = None, *,
                 check_cache: CheckCache | None = None, previous: Renderer | None = None
                 ) -> None:
        self.settings = settings
        #: What ``check`` found per node; a reload hands it from renderer to renderer.
        self.check_cache = check_cache if check_cache is not None else CheckCache()
        if sources is None:
            sources = template_sources(settings.paths.templates)
        self.sources: dict[str, str] = dict(sources)
        #: Artefacts rendered by ``check`` (a node found in its cache costs none).
        self.check_renders = 0
        #: Machines ``check`` planned (an unchanged node of a clean check costs none).
        self.check_planned = 0
        if (previous is not None and previous.sources == self.sources
                and previous.settings.paths.templates == settings.paths.templates):
            # the same sources: the templates ``previous`` compiled are these (a reload
            # of nodes.yaml alone compiles nothing)
            self.env = previous.env
            return
        self.env = jinja2.Environment(
            loader=_SnapshotLoader(settings.paths.templates, self.sources),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
            auto_reload=False,
        )
        self.env.filters["shquote"] = shlex.quote
        self.env.filters["mac_dashes"] = mac_dashes

    def template_name(self, artefact: str, plan: BootPlan) -> str:
        if artefact not in DEFAULT_TEMPLATES:
            raise RenderError(artefact, "-", f"unknown artefact {artefact!r}")
        return plan.node.templates.get(artefact, DEFAULT_TEMPLATES[artefact])

    def context(self, plan: BootPlan, server: ServerInfo, *, secrets: bool = False,
                placeholders: bool = False) -> dict[str, Any]:
        """Everything a template may use; see docs/templates.md."""
        s = self.settings
        node, image = plan.node, plan.image
        if image is None and plan.action is Action.LOCAL and plan.disk is not None:
            # A node that runs from its disk runs the disk image it installed: its
            # cloud-init (user-data names the image, instance-id the version) sees that.
            image = plan.disk
        base = server.base_url
        dashed = mac_dashes(node.mac)
        files = f"{base}/files/{image.name}/{image.version}" if image else ""
        nfs_server = str(s.nfs.server) if s.nfs.server else server.ip
        rootfs = str(image.root / image.boot["rootfs"]) if image and image.boot.get("rootfs") else ""
        nfs_opts = "vers=3,tcp,nolock" if s.nfs.vers == "3" else f"vers={s.nfs.vers},proto=tcp"
        cloud_init = f"{base}/cloud-init/{dashed}/"
        kernel_args = image.boot.get("cmdline", "") if image else ""
        disk = plan.disk
        raw = disk.disk if disk is not None else None
        disk_url = f"{base}/files/{disk.name}/{disk.version}/{raw.path}" if disk and raw else ""
        # TFTP names of the version's files for U-Boot's pxe (it fetches over TFTP only):
        # netbootd/<mac>/<image>/<version>/<artefact>, served by tftp/vfs.py.
        tftp_base = f"netbootd/{dashed}/{image.name}/{image.version}" if image else ""
        boot = image.boot if image else {}
        return {
            "node": node,
            "plan": plan,
            "action": plan.action.value,
            "image": image,
            "version": image.version if image else "",
            "server": {"ip": server.ip, "http": base, "http_port": server.http_port},
            "urls": {
                "files": files,
                "kernel": f"{files}/{image.boot['kernel']}" if image and image.boot.get("kernel") else "",
                "initrd": f"{files}/{image.boot['initrd']}" if image and image.boot.get("initrd") else "",
                "disk": disk_url,
                "cloud_init": cloud_init,
                "events": f"{base}/api/v1/events",
                "beacon": f"{base}/api/v1/beacon/{dashed}?session={plan.session}",
            },
            "tftp": {
                "base": tftp_base,
                "kernel": f"{tftp_base}/{boot['kernel']}" if boot.get("kernel") else "",
                "initrd": f"{tftp_base}/{boot['initrd']}" if boot.get("initrd") else "",
                "fdt": f"{tftp_base}/{boot['fdt']}" if boot.get("fdt") else "",
                "fdtdir": f"{tftp_base}/{boot['fdtdir']}" if boot.get("fdtdir") else "",
            },
            "nfs": {
                # exports are only managed (so a root can only be mounted) with a backend
                "enabled": s.nfs.backend != "none",
                "server": nfs_server,
                "root": rootfs,
                "root_spec": f"{nfs_server}:{rootfs},{nfs_opts}" if rootfs else "",
                "state": str(s.node_state_dir / node.hostname),
                "vers": s.nfs.vers,
            },
            "kernel_args": kernel_args,
            #: Proof of this boot for lifecycle reports; only in this node's own files.
            "token": plan.token,
            "disk": {"image": disk.name if disk else "", "version": disk.version if disk else "",
                     "url": disk_url, "compression": raw.compression if raw else "",
                     "size": raw.size if raw else 0, "sha256": raw.sha256 if raw else "",
                     "uncompressed_size": raw.uncompressed_size if raw else 0,
                     "uncompressed_sha256": raw.uncompressed_sha256 if raw else ""},
            "datasource": f"ds=nocloud;s={cloud_init}",
            "instance_id": f"{node.hostname}-{image.name}-{image.version}" if image else node.hostname,
            "vars": node.vars,
            "secrets": _Secrets(s.secrets if secrets else {}, placeholders=placeholders),
        }

    def render(self, artefact: str, plan: BootPlan, server: ServerInfo, *,
               placeholders: bool = False) -> str:
        """Render one artefact; raises ``RenderError`` naming template, line and artefact.

        ``placeholders``: secrets render as ``<secret:NAME>`` (validation). The error
        text never carries a secret's value (``scrub``).
        """
        name = self.template_name(artefact, plan)
        return self._render_in(artefact, name, lambda: self.context(
            plan, server, secrets=artefact == "user-data", placeholders=placeholders))

    def _render_in(self, artefact: str, name: str, make_context: Any, *,
                   fast: bool = False) -> str:
        """Render template ``name`` as ``artefact`` with the context ``make_context()``
        builds; every failure becomes a ``RenderError`` (the one place that says how).

        ``fast`` (``check``): the context already holds the environment's globals and
        is used as it is (jinja never writes to it) instead of a copy per render."""
        try:
            template = self.env.get_template(name)
            if fast and not template.globals.maps[0]:  # no globals of its own
                text = self._render_shared(template, make_context())
            else:
                text = template.render(make_context())
        except jinja2.TemplateNotFound as exc:
            raise RenderError(artefact, name, f"template not found: {exc.name}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(artefact, exc.filename or name,
                              scrub(exc.message or "syntax error", self.settings),
                              exc.lineno) from None
        except Exception as exc:  # noqa: BLE001 - any template failure is a config problem
            known = isinstance(exc, (jinja2.UndefinedError, TypeError, ValueError, KeyError))
            message = str(exc) if known else f"{type(exc).__name__}: {exc}"
            # ``from None``: the original exception (whose message may quote a secret)
            # must not ride along into a traceback in the log.
            raise RenderError(artefact, name, scrub(message, self.settings),
                              _template_line(exc, name)) from None
        if artefact == "cmdline.txt":  # the Pi reads exactly one line
            text = " ".join(text.split()) + "\n"
        return text

    def _render_shared(self, template: jinja2.Template, context: dict[str, Any]) -> str:
        """``template.render`` over ``context`` as jinja's read-only parent, without the
        copy jinja's own render makes. Errors are rewritten to template lines exactly
        as ``render`` does."""
        jctx = template.new_context(context, shared=True)
        try:
            return self.env.concat(template.root_render_func(jctx))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - rewritten and re-raised, as jinja's render does
            self.env.handle_exception()

    def has_secrets(self, plan: BootPlan) -> bool:
        """Whether this node's user-data reads any secret (strict mode serves it only to
        the node's own address)."""
        name = self.template_name("user-data", plan)
        ctx = self.context(plan, ServerInfo(ip="192.0.2.1", http_port=self.settings.http.port))
        tracker = _Secrets({k: v for k, v in self.settings.secrets.items()})
        tracker.read = set()
        ctx["secrets"] = tracker
        try:
            self.env.get_template(name).render(ctx)
        except Exception:  # noqa: BLE001 - a broken template: be strict, treat as secret
            return True
        return bool(tracker.read)

    def generation(self) -> bytes:
        """Digest of everything besides the plan that decides what a check finds: the
        template sources, the settings, which secret files are readable, and the code
        that builds the context. Two checks with the same generation and the same plan
        find the same problems."""
        h = hashlib.blake2b(digest_size=16)
        for part in (__version__, jinja2.__version__, _CODE_STAMP):
            h.update(part.encode() + b"\0")
        try:
            h.update(self.settings.model_dump_json().encode())
        except Exception:  # noqa: BLE001 - an unserialisable value: fall back to its repr
            h.update(repr(self.settings).encode())
        for name in sorted(self.sources):
            h.update(b"\0" + name.encode() + b"\0" + self.sources[name].encode())
        for name, path in sorted(self.settings.secrets.items()):
            ok = os.access(path, os.R_OK) and path.is_file()
            h.update(f"\0{name}={path}:{ok}".encode())
        return h.digest()

    def check(self, inventory: Inventory, images: Any = None, *,
              cache: CheckCache | None = None) -> list[Problem]:
        """Render every artefact for every node and the default profile; collect problems.

        Secrets are checked for presence of the file, not rendered into anything kept.

        ``cache``: what earlier checks found, per node, keyed by the renderer's
        ``generation`` and the node's plan (everything it renders from, bar the boot's
        random session and token). A node whose key is there is not rendered again, so
        a reload after a one-node edit renders that node only; the cache is updated in
        place with this check's nodes. ``check_renders`` counts the renders done.
        """
        with paused_gc():  # yamlfile.paused_gc says why
            return self._check(inventory, images, cache)

    def _check(self, inventory: Inventory, images: Any,
               cache: CheckCache | None) -> list[Problem]:
        from .planner import NoImages, decide

        resolver = images or NoImages()
        server = ServerInfo(ip="192.0.2.1", http_port=self.settings.http.port)
        generation = self.generation()
        epoch = cache.images_epoch(resolver) if cache is not None else None
        base = cache.base_for(generation, epoch, inventory) if cache is not None else None
        if base is not None:
            # Only nodes that differ from the last clean check can find anything new: the
            # templates, settings, profiles and images are the same (see CheckCache.base).
            old_nodes = base.inventory.nodes
            machines = [ClientFacts(mac=m, serial=n.serial,
                                    kind=ClientKind.RPI if n.serial else ClientKind.IPXE)
                        for m, n in inventory.nodes.items()
                        if (o := old_nodes.get(m)) is not n and o != n]
        else:
            machines = [ClientFacts(mac=m, serial=n.serial,
                                    kind=ClientKind.RPI if n.serial else ClientKind.IPXE)
                        for m, n in inventory.nodes.items()]
            machines.append(ClientFacts(mac=_DEFAULT_MACHINE, kind=ClientKind.IPXE))
        # the default profile is checked too, as if unknown machines were booted
        as_default = self.settings.model_copy(
            update={"policy": self.settings.policy.model_copy(update={"unknown": "default"})})
        known = cache.results_for(generation) if cache is not None else {}
        found: dict[bytes, tuple[_Found, ...]] = {}
        keys: dict[str, bytes] = {}
        problems: list[Problem] = []
        seen: set[tuple[str, str]] = set()
        for facts in machines:
            plan = decide(facts, inventory, as_default, resolver)
            # check templates even before any image exists; the session and token are
            # random per boot: fixed here, so the key (and the text rendered) is the
            # node's content only
            plan = replace(plan, session=_CHECK_SESSION, token=_CHECK_TOKEN, created=0.0,
                           image=plan.image or _PLACEHOLDER_IMAGE)
            if cache is None:
                errors = self._check_plan(plan, server)
            else:
                key = _plan_key(plan)
                errors = known.get(key)
                if errors is None:
                    errors = found.get(key)
                if errors is None:
                    errors = self._check_plan(plan, server)
                found[key] = errors
                keys[facts.mac] = key
            for artefact, template, text, line, message in errors:
                dedup = (template, text)
                if dedup in seen:
                    continue
                seen.add(dedup)
                problems.append(Problem(
                    str(self.settings.paths.templates / template), line,
                    f"{artefact} for {plan.node.hostname}", message))
        self.check_planned = len(machines)
        if cache is not None:
            if base is not None:
                # every node of this inventory: its new key, or the clean one it had
                keys = {m: keys.get(m) or base.keys[m] for m in (*inventory.nodes,
                                                                 _DEFAULT_MACHINE)}
                results = dict.fromkeys(keys.values(), ())
                results.update(found)
                found = results
            cache.update(generation, found)
            if not problems:
                cache.set_base(CheckBase(generation, epoch, inventory, keys))
        return problems

    def _check_plan(self, plan: BootPlan, server: ServerInfo) -> tuple[_Found, ...]:
        """Every artefact of one plan rendered once, as ``check`` reports failures.

        Cheaper than ``render`` per artefact, with the same outcome: one context per
        node (user-data gets the secrets, as placeholders), and each template rendered
        over that context plus the environment's globals without jinja copying both
        into a new dict per render."""
        # what jinja's render reads: the environment's globals under the context
        context = {**self.env.globals, **self.context(plan, server, placeholders=True)}
        out: list[_Found] = []
        for artefact in ARTEFACTS:
            self.check_renders += 1
            name = self.template_name(artefact, plan)
            if artefact == "user-data":
                ctx = dict(context)
                ctx["secrets"] = _Secrets(self.settings.secrets, placeholders=True)
            else:
                ctx = context
            try:
                self._render_in(artefact, name, lambda c=ctx: c, fast=True)
            except RenderError as exc:
                out.append((artefact, exc.template, str(exc), exc.line,
                            str(exc).split(": ", 2)[-1]))
        return tuple(out)


#: What ``check`` found for one plan: (artefact, template, error text, line, message) each.
_Found = tuple[str, str, str, int, str]
_CHECK_SESSION = "c" * 12
#: The machine that stands for every unknown one (the default profile) in a check.
_DEFAULT_MACHINE = "02:00:00:00:00:01"
_CHECK_TOKEN = "c" * 24
#: Changes whenever this module's code does: a persisted check result from older code
#: (a context built differently) is not trusted.
_CODE_STAMP = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=8).hexdigest()


def _plan_key(plan: BootPlan) -> bytes:
    """Digest of what a plan renders from: the node's effective content and the plan's
    decision (``repr`` covers every field, the image's ``boot`` section included)."""
    text = repr((plan.action, plan.reason, plan.stage, plan.facts, plan.node, plan.image,
                 plan.image.boot if plan.image else None, plan.disk,
                 plan.disk.boot if plan.disk else None))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


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
    """Per-node results of ``Renderer.check``, kept across reloads (and, through
    ``save``/``load``, across restarts): plan key -> problems found (none, mostly).

    Only results of one generation are kept: a template, setting or secret edit
    starts it afresh. Thread-safe enough for one reload at a time plus readers.
    """

    #: File format marker; a file without it is ignored.
    MAGIC = b"netbootd-check-1\n"

    def __init__(self) -> None:
        self.generation: bytes | None = None
        self.results: dict[bytes, tuple[_Found, ...]] = {}
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

    def results_for(self, generation: bytes) -> dict[bytes, tuple[_Found, ...]]:
        with self._lock:
            return self.results if generation == self.generation else {}

    def update(self, generation: bytes, results: dict[bytes, tuple[_Found, ...]]) -> None:
        """Keep ``results`` (one check's nodes) as what is known for ``generation``."""
        with self._lock:
            self.generation, self.results = generation, results

    def save(self, path: Path) -> None:
        """Write the clean results (keys of nodes that rendered without a problem) to
        ``path`` atomically; a failure to write costs only the next start-up's time."""
        with self._lock:
            generation = self.generation
            clean = [k for k, v in self.results.items() if not v]
        if generation is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(self.MAGIC + generation + b"".join(clean))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load(self, path: Path) -> None:
        """Take the clean results ``save`` wrote (nothing, if absent or malformed)."""
        try:
            data = path.read_bytes()
        except OSError:
            return
        head = len(self.MAGIC)
        if not data.startswith(self.MAGIC) or (len(data) - head) % 16:
            return
        generation = data[head:head + 16]
        keys = [data[i:i + 16] for i in range(head + 16, len(data), 16)]
        with self._lock:
            if self.generation is None:
                self.generation, self.results = generation, dict.fromkeys(keys, ())


#: What ``check`` renders a node with before any image exists.
_PLACEHOLDER_IMAGE = ImageRef(name="check", version="0", root=Path("/nonexistent"),
                              boot={"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "",
                                    "rootfs": "rootfs", "boot_tree": "boot"})


def _template_line(exc: BaseException, name: str) -> int:
    """Line in the template where rendering failed, from the traceback jinja2 rewrites."""
    tb = exc.__traceback__
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
