"""The boot chain over HTTP: /boot.ipxe -> /ipxe (per node), iPXE binaries, the beacon,
and the per-node cloud-init NoCloud seed.

Every handler turns the request into ``ClientFacts`` once, asks the planner, and
renders with ``ctx.render``; nothing here knows the inventory file or the store.
"""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web

from .. import bootfiles
from ..model import Action, ClientFacts, ClientKind, mac_dashes
from ..render import RenderError
from .context import HttpContext
from .util import SERVICE, base_url, context, malformed, parse_mac, server_info, who_is

log = logging.getLogger("netbootd.http.boot")

#: iPXE ``${buildarch}`` (+ ``${platform}``) -> DHCP client architecture (RFC 4578 / IANA),
#: the number profile selectors match on. Unknown values give ``None``, never an error.
_ARCH_EFI = {"i386": 6, "x86_64": 7, "arm32": 10, "arm64": 11, "riscv32": 25,
             "riscv64": 27, "loong64": 39}
_UUID_RE = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_SESSION_RE = re.compile(r"[0-9A-Za-z]{1,64}")

CLOUD_INIT = ("meta-data", "user-data", "vendor-data", "network-config")
#: A client fetching the same script again within this many seconds of the same boot
#: session is a retry (or a flood): counted in metrics, not logged again as an event.
EVENT_REPEAT_WINDOW = 2.0


class ScriptCache:
    """Rendered iPXE scripts per (boot session, base URL).

    A plan is fixed for its session, so its script is too; rendering once per session
    instead of per request roughly doubles /ipxe throughput (docs/http.md). An entry is
    valid only for the Renderer that made it: a config reload swaps ``ctx.render`` and
    so invalidates everything. Also remembers when each MAC's script was last logged.
    """

    def __init__(self, size: int = 10000) -> None:
        self._size = size
        self._scripts: dict[tuple[str, str], tuple[object, str]] = {}
        self._logged: dict[str, tuple[str, float]] = {}

    def get(self, key: tuple[str, str], renderer: object) -> str | None:
        hit = self._scripts.get(key)
        return hit[1] if hit is not None and hit[0] is renderer else None

    def put(self, key: tuple[str, str], renderer: object, text: str) -> None:
        if len(self._scripts) >= self._size:
            self._scripts.clear()  # sessions are short; a full reset is cheap and bounded
        self._scripts[key] = (renderer, text)

    def should_log(self, mac: str, session: str, now: float) -> bool:
        last = self._logged.get(mac)
        if last is not None and last[0] == session and now - last[1] < EVENT_REPEAT_WINDOW:
            return False
        if len(self._logged) >= self._size:
            self._logged.clear()
        self._logged[mac] = (session, now)
        return True


SCRIPTS_KEY: web.AppKey[ScriptCache] = web.AppKey("netbootd_scripts", ScriptCache)
_TEXT = "text/plain"
_NO_STORE = {"Cache-Control": "no-store"}


def client_arch(buildarch: str, platform: str) -> int | None:
    """DHCP arch number for what iPXE reports. BIOS builds (``pcbios``) are 0 whatever the
    CPU; without ``platform`` (older chain URLs) i386 is taken as BIOS, the rest as EFI."""
    if platform == "pcbios" or (buildarch == "i386" and platform != "efi"):
        return 0
    return _ARCH_EFI.get(buildarch)


async def boot_ipxe(request: web.Request) -> web.Response:
    """The first script every iPXE client fetches: chain to its own per-MAC script.

    The firmware fills in its identity, so one static script serves the fleet.
    """
    ctx = context(request)
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    text = (
        "#!ipxe\n"
        f"chain --autofree {base_url(request)}/ipxe?mac=${{mac:hexhyp}}&uuid=${{uuid}}"
        "&arch=${buildarch}&platform=${platform} ||\n"
        "echo netbootd: chain failed, retrying in 10 seconds\n"
        "sleep 10\n"
        "chain --autofree ${cwuri} ||\n"
    )
    return web.Response(text=text, content_type=_TEXT, headers=_NO_STORE)


async def node_ipxe(request: web.Request) -> web.Response:
    """The per-node iPXE script from the boot plan (netboot / install / local / none).

    ``ignore`` (an unknown machine under ``policy.unknown: ignore``) gets a script that
    says so and ``exit``s, so the firmware falls through to its next boot device at once;
    a 404 would do the same after an error message and a retry, which is noisier.
    """
    ctx = context(request)
    q = request.query
    mac = parse_mac(q.get("mac", ""))
    if mac is None:
        return malformed(request, "query parameter mac must be a MAC address")
    uuid = q.get("uuid", "")
    facts = ClientFacts(
        mac=mac, kind=ClientKind.IPXE, ip=request.remote,
        uuid=uuid.lower() if _UUID_RE.fullmatch(uuid) else None,
        arch=client_arch(q.get("arch", ""), q.get("platform", "")))
    plan = ctx.plans.plan(facts)
    # Log key: the session for a real boot; for "nothing to boot" plans the outcome itself,
    # so a machine retrying every 30 s (or a flood) is not logged per request. (Such
    # plans are never held by the planner: the script's retry plans afresh.)
    log_key = plan.session if plan.image else f"{plan.action.value}:{plan.reason}"
    fields = {"ip": request.remote, "file": "/ipxe", "hostname": plan.node.hostname,
              "action": plan.action.value}
    if plan.image:
        fields.update(image=plan.image.name, version=plan.image.version)
    cache = request.app[SCRIPTS_KEY]
    if plan.action is Action.IGNORE:
        ctx.metrics.requests.labels(SERVICE, "ignored").inc()
        if cache.should_log(mac, log_key, time.monotonic()):
            ctx.events.record("http", mac, "iPXE script: ignored (unknown machine)",
                              outcome="ignored", **fields)
        text = ("#!ipxe\n"
                f"echo netbootd: {mac} is not in the inventory (policy.unknown: ignore)\n"
                "exit\n")
        return web.Response(text=text, content_type=_TEXT, headers=_NO_STORE)
    server = server_info(request)
    key = (plan.session, server.base_url)
    renderer = ctx.renderer
    text = cache.get(key, renderer)
    if text is None:
        try:
            text = renderer.render("ipxe", plan, server)
        except RenderError as exc:
            ctx.metrics.errors.labels(SERVICE).inc()
            ctx.events.record("http", mac, f"iPXE script failed to render: {exc}",
                              outcome="error", **fields)
            log.error("ipxe render failed for %s: %s", mac, exc)
            return web.Response(status=503, content_type=_TEXT,
                                text=f"#!ipxe\necho netbootd: configuration error for {mac}\n"
                                     "sleep 30\nreboot\n")
        cache.put(key, renderer, text)
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    if cache.should_log(mac, log_key, time.monotonic()):
        ctx.events.record("http", mac, f"iPXE script: {plan.action.value}", outcome="ok",
                          **fields)
    return web.Response(text=text, content_type=_TEXT, headers=_NO_STORE)


async def ipxe_binary(request: web.Request) -> web.StreamResponse:
    """iPXE binaries for UEFI HTTP-boot clients (the DHCP answer names this URL)."""
    ctx = context(request)
    name = request.match_info["name"]
    if name not in bootfiles.ipxe_names(ctx.settings):
        return malformed(request, f"no such iPXE binary: {name}", status=404)
    path = bootfiles.find_ipxe(ctx.settings, name)
    if path is None:
        ctx.metrics.requests.labels(SERVICE, "not_found").inc()
        return web.json_response({"error": f"{name} not found in the iPXE directories"},
                                 status=404)
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    ctx.events.record("http", who_is(ctx, request.remote or ""),
                      f"iPXE binary {name}", ip=request.remote, file=f"/ipxe/{name}",
                      outcome="ok")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


async def beacon(request: web.Request) -> web.Response:
    """Fetched by the iPXE script right before ``boot``: the kernel was handed over."""
    ctx = context(request)
    mac = parse_mac(request.match_info["mac"])
    if mac is None:
        return malformed(request, "not a MAC address")
    session = request.query.get("session", "")
    if session and not _SESSION_RE.fullmatch(session):
        return malformed(request, "session must be alphanumeric")
    fields: dict = {"ip": request.remote, "session": session or None}
    plan = ctx.plans.current(mac)
    if plan and plan.image:
        fields.update(image=plan.image.name, version=plan.image.version)
    if plan is not None and session == plan.session:
        # The firmware is done: its session ends, so a power cycle from here plans afresh,
        # while the OS now starting keeps seeing this plan. Only the boot's own script
        # knows its session, so a stranger cannot end another machine's boot this way.
        ctx.plans.handed_over(mac)
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    ctx.events.record("kernel", mac, "kernel handed over", outcome="ok", **fields)
    return web.Response(text="ok\n", content_type=_TEXT, headers=_NO_STORE)


async def cloud_init(request: web.Request) -> web.Response:
    """NoCloud seed for one node: meta-data, user-data, vendor-data, network-config."""
    mac = parse_mac(request.match_info["mac"])
    if mac is None:
        return malformed(request, "not a MAC address")
    return await _seed(request, mac, request.match_info["artefact"], by_address=False)


async def cloud_init_by_address(request: web.Request) -> web.Response:
    """The same seed, for a node that does not know its MAC-specific URL: a golden disk
    image carries ``ds=nocloud;s=http://<server>/cloud-init/by-address/`` unchanged
    for every node, and the requester's address says who it is (what DHCP learnt, the
    kernel neighbour table, or nodes.yaml ``ip``)."""
    ctx = context(request)
    remote = request.remote or ""
    # Who it probably is (the secrets in user-data still need ownership: _seed checks).
    mac = who_is(ctx, remote)
    if mac is None:
        ctx.metrics.requests.labels(SERVICE, "not_found").inc()
        return web.json_response({"error": f"no machine known at {remote}"}, status=404)
    return await _seed(request, mac, request.match_info["artefact"], by_address=True)


async def _seed(request: web.Request, mac: str, artefact: str, *, by_address: bool
                ) -> web.Response:
    """Rendered from the plan of the boot the node is in (the version it runs), else
    from what it would get now. Only a booted OS fetches these, so the firmware part
    of its boot is over: the firmware session ends here for boot paths without a beacon
    (the Raspberry Pi). Strict mode: user-data that reads secrets goes only to the
    node's own address; anyone else gets 403. The body is never logged.
    """
    ctx = context(request)
    if artefact not in CLOUD_INIT:
        return malformed(request, f"unknown cloud-init file {artefact!r}", status=404)
    current = ctx.plans.current(mac)
    plan = current or ctx.plans.peek(ctx.nodes.facts_for(mac, request.remote))
    if plan.action is Action.IGNORE:
        ctx.metrics.requests.labels(SERVICE, "ignored").inc()
        return web.json_response({"error": "unknown machine"}, status=404)
    remote = request.remote or ""
    owner = _owns(ctx, mac, remote)
    where = f"/cloud-init/{'by-address' if by_address else mac_dashes(mac)}/{artefact}"
    if (artefact == "user-data" and ctx.settings.http.strict_user_data
            and ctx.renderer.has_secrets(plan) and not owner):
        ctx.metrics.requests.labels(SERVICE, "forbidden").inc()
        # Recorded as a daemon event (mac=None): a stranger's attempt must not change the
        # node's own state (phase, IP, last seen) on the status page.
        ctx.events.record("http", None, f"user-data for {mac} refused to {remote} (strict)",
                          node=mac, client=remote, outcome="error", file=where)
        log.warning("strict mode: user-data for %s refused to %s", mac, remote)
        return web.json_response(
            {"error": f"user-data for {mac} is only served to that machine's address"},
            status=403)
    try:
        text = ctx.renderer.render(artefact, plan, server_info(request))
    except RenderError as exc:
        ctx.metrics.errors.labels(SERVICE).inc()
        log.error("cloud-init %s render failed for %s: %s", artefact, mac, exc)
        return web.json_response({"error": f"configuration error rendering {artefact}"},
                                 status=503)
    if owner:
        if current is not None:
            ctx.plans.handed_over(mac)
        ctx.lifecycle.seen_on_disk(mac)  # an installed node now runs from its disk
    ctx.metrics.requests.labels(SERVICE, "ok").inc()
    ctx.metrics.bytes_sent.labels(SERVICE).inc(len(text))
    ctx.events.record("http", mac, f"cloud-init {artefact}", ip=remote, file=where,
                      outcome="ok",
                      **({"image": plan.image.name, "version": plan.image.version}
                         if plan.image else {}))
    return web.Response(text=text, content_type=_TEXT, headers=_NO_STORE)


def _owns(ctx: HttpContext, mac: str, ip: str) -> bool:
    """Is ``ip`` the address of machine ``mac`` (DHCP/neighbours, or inventory ``ip``)?"""
    return ctx.lifecycle.owns(mac, ip)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/boot.ipxe", boot_ipxe),
        web.get("/ipxe", node_ipxe),
        web.get("/ipxe/{name}", ipxe_binary),
        web.get("/api/v1/beacon/{mac}", beacon),
        web.get("/cloud-init/by-address/{artefact}", cloud_init_by_address),
        web.get("/cloud-init/{mac}/{artefact}", cloud_init),
    ]

