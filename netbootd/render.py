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

import functools
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from .inventory import Inventory
from .model import Action, BootPlan, mac_dashes
from .settings import Settings
from .yamlfile import Problem

if TYPE_CHECKING:
    from .rendercheck import CheckCache

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


def placeholder_secrets(settings: Settings) -> _Secrets:
    """The ``secrets`` a check renders with: ``<secret:NAME>`` for each readable file."""
    return _Secrets(settings.secrets, placeholders=True)


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
        self._node_state_dir = str(settings.node_state_dir)
        if check_cache is None:
            from .rendercheck import CheckCache

            check_cache = CheckCache()
        #: What ``check`` found per node; a reload hands it from renderer to renderer.
        self.check_cache = check_cache
        if sources is None:
            sources = template_sources(settings.paths.templates)
        self.sources: dict[str, str] = dict(sources)
        #: Artefacts rendered by ``check`` (a node found in its cache costs none).
        self.check_renders = 0
        #: Machines ``check`` planned (an unchanged node of a clean check costs none).
        self.check_planned = 0
        #: Templates ``check`` found (the environment's lookup, once per name).
        self._compiled: dict[str, jinja2.Template] = {}
        if (previous is not None and previous.sources == self.sources
                and previous.settings.paths.templates == settings.paths.templates):
            # the same sources: the templates ``previous`` compiled are these (a reload
            # of nodes.yaml alone compiles nothing)
            self.env, self.stamps = previous.env, previous.stamps
            return
        #: Template name -> digest of its source and the templates it uses (rendercheck).
        self.stamps: dict[str, bytes] = {}
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
        rootfs = _joined(image.root, image.boot["rootfs"]) if image and image.boot.get("rootfs") else ""
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
                # a hostname is DNS labels: joined as pathlib would, without its cost
                "state": os.path.join(self._node_state_dir, node.hostname),
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
            template = self._compiled.get(name) if fast else None
            if template is None:
                template = self._compiled[name] = self.env.get_template(name)
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

    def check(self, inventory: Inventory, images: Any = None, *,
              cache: CheckCache | None = None) -> list[Problem]:
        """Render every artefact for every node and the default profile; collect problems
        (``rendercheck.check``; ``cache``: what earlier checks found, updated in place).

        Secrets are checked for presence of the file, not rendered into anything kept."""
        from .rendercheck import check

        return check(self, inventory, images, cache)

    def render_checked(self, artefact: str, name: str, context: dict[str, Any]) -> None:
        """Render template ``name`` as ``artefact`` over ``context`` (which already holds
        the environment's globals) for the check; raises ``RenderError`` as ``render``."""
        self._render_in(artefact, name, lambda: context, fast=True)


@functools.lru_cache(maxsize=4096)
def _joined(directory: Path, name: str) -> str:
    """``str(directory / name)``, remembered: a check builds 10,000 contexts from a few
    image roots."""
    return str(directory / name)


def _template_line(exc: BaseException, name: str) -> int:
    """Line in the template where rendering failed, from the traceback jinja2 rewrites."""
    tb = exc.__traceback__
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
