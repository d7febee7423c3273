"""Per-node text from jinja2 templates: iPXE script, Pi cmdline.txt/config.txt, cloud-init.

StrictUndefined everywhere: a template that names a missing variable is a
config error that ``netbootd check`` (and every reload) finds by rendering
every artefact for every node, never a 500 in the middle of a boot.

Secrets (cluster join tokens, SSH keys) are read from the files named in
``settings.secrets`` only while rendering ``user-data``; no other artefact can
see them, and they are never logged.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from .inventory import Inventory
from .model import Action, BootPlan, ClientFacts, ClientKind, ImageRef, mac_dashes
from .settings import Settings
from .yamlfile import Problem

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


class _Secrets:
    """Lazy secret lookup: a file is read only when a template asks for that name."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files
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
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise jinja2.UndefinedError(f"secret {name!r}: cannot read {path}: {exc.strerror}")

    def __contains__(self, name: str) -> bool:
        return name in self._files


class Renderer:
    """Renders artefacts for a plan. Templates are re-read when they change on disk."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(settings.paths.templates)),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
            auto_reload=True,
        )
        self.env.filters["shquote"] = shlex.quote
        self.env.filters["mac_dashes"] = mac_dashes

    def template_name(self, artefact: str, plan: BootPlan) -> str:
        if artefact not in DEFAULT_TEMPLATES:
            raise RenderError(artefact, "-", f"unknown artefact {artefact!r}")
        return plan.node.templates.get(artefact, DEFAULT_TEMPLATES[artefact])

    def context(self, plan: BootPlan, server: ServerInfo, *, secrets: bool = False
                ) -> dict[str, Any]:
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
            "secrets": _Secrets(s.secrets if secrets else {}),
        }

    def render(self, artefact: str, plan: BootPlan, server: ServerInfo) -> str:
        """Render one artefact; raises ``RenderError`` naming template, line and artefact."""
        name = self.template_name(artefact, plan)
        try:
            template = self.env.get_template(name)
            text = template.render(self.context(plan, server, secrets=artefact == "user-data"))
        except jinja2.TemplateNotFound as exc:
            raise RenderError(artefact, name, f"template not found: {exc.name}") from exc
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(artefact, exc.filename or name, exc.message or "syntax error",
                              exc.lineno) from exc
        except (jinja2.UndefinedError, TypeError, ValueError, KeyError) as exc:
            raise RenderError(artefact, name, str(exc), _template_line(exc, name)) from exc
        if artefact == "cmdline.txt":  # the Pi reads exactly one line
            text = " ".join(text.split()) + "\n"
        return text

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

    def check(self, inventory: Inventory, images: Any = None) -> list[Problem]:
        """Render every artefact for every node and the default profile; collect problems.

        Secrets are checked for presence of the file, not rendered into anything kept.
        """
        from .planner import NoImages, decide

        resolver = images or NoImages()
        server = ServerInfo(ip="192.0.2.1", http_port=self.settings.http.port)
        machines = [ClientFacts(mac=m, serial=n.serial,
                                kind=ClientKind.RPI if n.serial else ClientKind.IPXE)
                    for m, n in inventory.nodes.items()]
        machines.append(ClientFacts(mac="02:00:00:00:00:01", kind=ClientKind.IPXE))
        # the default profile is checked too, as if unknown machines were booted
        as_default = self.settings.model_copy(
            update={"policy": self.settings.policy.model_copy(update={"unknown": "default"})})
        problems: list[Problem] = []
        seen: set[tuple[str, str]] = set()
        for facts in machines:
            plan = decide(facts, inventory, as_default, resolver)
            if plan.image is None:  # check templates even before any image exists
                plan = _with_placeholder_image(plan)
            for artefact in ARTEFACTS:
                try:
                    self.render(artefact, plan, server)
                except RenderError as exc:
                    key = (exc.template, str(exc))
                    if key in seen:
                        continue
                    seen.add(key)
                    problems.append(Problem(
                        str(self.settings.paths.templates / exc.template), exc.line,
                        f"{artefact} for {plan.node.hostname}", str(exc).split(": ", 2)[-1]))
        return problems


def _with_placeholder_image(plan: BootPlan) -> BootPlan:
    from dataclasses import replace

    ref = ImageRef(name="check", version="0", root=Path("/nonexistent"),
                   boot={"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "",
                         "rootfs": "rootfs", "boot_tree": "boot"})
    return replace(plan, image=ref)


def _template_line(exc: BaseException, name: str) -> int:
    """Line in the template where rendering failed, from the traceback jinja2 rewrites."""
    tb = exc.__traceback__
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
