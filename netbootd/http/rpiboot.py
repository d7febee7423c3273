"""Raspberry Pi HTTP boot: ``/<rpi.http_boot.path>[/<serial or MAC>]/boot.sig|boot.img``,
and the bootloader update files ``pieeprom.sig|pieeprom.upd`` beside them.

A Pi with ``BOOT_ORDER`` nibble 7 fetches ``boot.sig`` then ``boot.img`` from
``HTTP_HOST:HTTP_PORT/HTTP_PATH``. Both answers come from the node's boot plan (a
firmware request: the first one opens the boot session, the second continues it), so the
signature and the image always name the same version however a channel moves between
the two requests: a hot swap changes the next boot, never this one, and the image is
one file, so nothing inside it can mix versions.

The Pi is found by the last path component when it is an 8-hex serial or a MAC with
dashes (set ``HTTP_PATH`` per board to ``<path>/<serial>``), else by its address (DHCP
evidence and the neighbour table), like a TFTP request without prefix.

Images come from :class:`netbootd.rpi.bootimg.BootImages`: built when a version becomes
active (:class:`Prebuilder`, on every store change) for each inventory Pi with HTTP boot,
checked against their signature before each hand-out, served by ``FileResponse`` (Range,
HEAD, ETag). Each file served is an ``http`` event, like a TFTP transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from aiohttp import web

from ..model import BootPlan, ClientFacts, ClientKind, normalise_mac
from ..render import RenderError, ServerInfo
from ..rpi import eeprom
from ..rpi.bootimg import BootImages, BuildError, collect, enabled_for
from .context import HttpContext
from .files import ArtefactResponse
from .util import SERVICE, context, local_ip, server_info, who_is

log = logging.getLogger("netbootd.http.rpiboot")

NAMES = ("boot.img", "boot.sig", *eeprom.NAMES)
_SERIAL = re.compile(r"[0-9a-f]{8}")
_MAC_DASHED = re.compile(r"[0-9a-f]{2}(-[0-9a-f]{2}){5}")
NO_STORE = {"Cache-Control": "no-store"}


def _not_found(ctx: HttpContext, why: str) -> web.Response:
    log.debug("http-boot: %s", why)
    ctx.metrics.requests.labels(SERVICE, "not_found").inc()
    return web.Response(status=404, text="not found\n", headers=NO_STORE)


def _identify(ctx: HttpContext, ident: str | None, remote: str
              ) -> tuple[str | None, str | None]:
    """(mac, serial) of the asking Pi: from the path's last component, else its address."""
    if ident is not None:
        if _SERIAL.fullmatch(ident):
            return ctx.nodes.mac_for_serial(ident), ident
        if _MAC_DASHED.fullmatch(ident):
            return normalise_mac(ident), None
        return None, None
    return who_is(ctx, remote), None


async def serve(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    hb = ctx.settings.rpi.http_boot
    images: BootImages | None = ctx.boot_images
    name = request.match_info["name"]
    where = request.match_info["where"].strip("/")
    base = hb.path.strip("/")
    if not hb.enabled or images is None:
        return _not_found(ctx, "rpi.http_boot.enabled is false")
    if where == base:
        ident = None
    elif where.startswith(base + "/") and "/" not in where[len(base) + 1:]:
        ident = where[len(base) + 1:].lower()
    else:
        return _not_found(ctx, f"/{where}/ is not under /{base}/")
    remote = request.remote or ""
    mac, serial = _identify(ctx, ident, remote)
    if mac is None:
        return _not_found(ctx, f"no node for {ident or remote}")
    plan = ctx.plans.plan(ClientFacts(mac=mac, kind=ClientKind.RPI, serial=serial,
                                      ip=remote or None))
    path = f"/{where}/{name}"
    if not plan.answers or plan.image is None:
        return _not_found(ctx, f"plan for {mac}: {plan.action.value} ({plan.reason})")
    if name in eeprom.NAMES:
        return await _pieeprom(request, ctx, plan, name, path)
    if not enabled_for(plan, ctx.settings):
        return _not_found(ctx, f"{mac}: vars.http_boot is not true")
    prebuilder: Prebuilder | None = request.app.get(PREBUILDER_KEY)
    if prebuilder is not None:
        prebuilder.arrived_on(local_ip(request))
    try:
        content = await asyncio.to_thread(collect, plan, ctx.artefacts, server_info(request))
        entry = await images.get(content)
    except RenderError as exc:
        log.error("http-boot: cannot render for %s: %s", mac, exc)
        ctx.events.record("http", mac, f"refused {path}: {exc}", file=path, ip=remote,
                          outcome="error")
        ctx.metrics.requests.labels(SERVICE, "error").inc()
        return web.Response(status=500, text="cannot render\n", headers=NO_STORE)
    except BuildError as exc:
        log.error("http-boot: cannot build boot.img for %s: %s", mac, exc)
        ctx.metrics.errors.labels(SERVICE).inc()
        return web.Response(status=503, text="boot.img unavailable\n", headers=NO_STORE)
    meta: dict[str, Any] = {"image": plan.image.name, "version": plan.image.version,
                            "ip": remote or None, "file": path}
    if name == "boot.sig":
        ctx.metrics.requests.labels(SERVICE, "ok").inc()
        ctx.events.record("http", mac, f"served {path}", bytes=len(entry.sig), outcome="ok",
                          **meta)
        return web.Response(text=entry.sig, headers=NO_STORE)
    return _file(request, ctx, plan, entry.image, meta)


def _file(request: web.Request, ctx: HttpContext, plan: BootPlan, real: Any,
          meta: dict[str, Any]) -> web.StreamResponse:
    """A whole file of this boot (boot.img, pieeprom.upd): holds the boot session while
    it runs and is recorded as an ``http`` event when it ends, like ``/files``."""
    mac, method = plan.mac, request.method

    def start() -> None:
        ctx.plans.hold(mac)

    def done(resp: ArtefactResponse, seconds: float, outcome: str) -> None:
        ctx.plans.release(mac)
        status = resp.status
        sent = (resp.content_length or 0) if status in (200, 206) and method != "HEAD" else 0
        if outcome == "ok" and status >= 400:
            outcome = "error"
        ctx.metrics.requests.labels(SERVICE, outcome).inc()
        if sent:
            ctx.metrics.bytes_sent.labels(SERVICE).inc(sent)
            ctx.metrics.transfer_seconds.labels(SERVICE).observe(seconds)
            ctx.events.record("http", mac, f"served {meta['file']}", bytes=sent,
                              seconds=round(seconds, 3), outcome=outcome, **meta)

    return ArtefactResponse(real, done, start, headers=NO_STORE)


async def _pieeprom(request: web.Request, ctx: HttpContext, plan: BootPlan, name: str,
                    path: str) -> web.StreamResponse:
    try:
        upd = await asyncio.to_thread(eeprom.update_for, plan, ctx.settings)
    except eeprom.NotOffered as exc:
        return _not_found(ctx, f"{path}: {exc}")
    assert plan.image is not None
    meta: dict[str, Any] = {"image": plan.image.name, "version": plan.image.version,
                            "ip": request.remote or None, "file": path,
                            "eeprom": upd.sha256[:12]}
    if name == "pieeprom.sig":
        ctx.metrics.requests.labels(SERVICE, "ok").inc()
        return web.Response(body=upd.sig, content_type="text/plain", headers=NO_STORE)
    return _file(request, ctx, plan, upd.path, meta)


class Prebuilder:
    """Builds the boot.img of every inventory Pi on HTTP boot ahead of its boot: at start,
    after every store change (a version activated, pinned, deleted) and every reload.

    The images are rendered for the addresses nodes reach us at: ``network.advertise``,
    else ``http.bind`` when it names one, else those HTTP-boot requests arrived on."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.local_ips: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._again = False
        self.runs = 0

    def arrived_on(self, ip: str) -> None:
        if ip and ip not in self.local_ips and len(self.local_ips) < 16:
            self.local_ips.add(ip)
            self.changed()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.changed()

    def changed(self) -> None:
        """Something the images depend on changed (any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._kick)

    async def stop(self) -> None:
        self._loop = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 0.5)

    def _kick(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="http-boot-prebuild")

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed build must not stop the next ones
                log.exception("http-boot: building boot.img ahead of time failed")
            self.runs += 1
            if not self._again:
                return

    def addresses(self) -> set[str]:
        s = self.ctx.settings
        if s.network.advertise:
            return {str(s.network.advertise)}
        out = set(self.local_ips)
        if s.http.bind and s.http.bind not in ("0.0.0.0", "::"):
            out.add(s.http.bind)
        return out

    async def _once(self) -> None:
        ctx, s = self.ctx, self.ctx.settings
        images = ctx.boot_images
        if images is None or not s.rpi.http_boot.enabled or s.rpi.http_boot.key_file is None:
            return
        if ctx.versions is not None:
            refs = ctx.versions.refs()
            if refs:
                await asyncio.to_thread(images.prune, {(r.name, r.version) for r in refs})
        ips = sorted(self.addresses())
        if not ips:
            log.info("http-boot: no address known to render boot.img for yet (set "
                     "network.advertise); images are built when Pis ask")
            return
        t0 = time.monotonic()
        # as many nodes at a time as builds may run: the first node's image is ready
        # first, not after every node's files were collected
        lanes = asyncio.Semaphore(images.parallel)

        async def one(mac: str, plan: BootPlan, server: ServerInfo) -> bool:
            async with lanes:
                try:
                    content = await asyncio.to_thread(collect, plan, ctx.artefacts, server)
                    await images.get(content)
                    return True
                except (RenderError, BuildError) as exc:
                    log.error("http-boot: boot.img for %s: %s", mac, exc)
                    return False

        jobs = []
        for mac in ctx.nodes.macs():
            facts = ctx.nodes.facts_for(mac)
            if facts.kind is not ClientKind.RPI:
                continue
            plan = ctx.plans.peek(facts)
            if not enabled_for(plan, s):
                continue
            jobs += [one(mac, plan, ServerInfo.for_arrival(s, ip)) for ip in ips]
        n = sum(await asyncio.gather(*jobs))
        if n:
            log.info("http-boot: %d boot.img ready (%.1f s)", n, time.monotonic() - t0)


PREBUILDER_KEY: web.AppKey[Prebuilder] = web.AppKey("netbootd_http_boot", Prebuilder)


def routes() -> list[web.RouteDef]:
    names = "|".join(re.escape(n) for n in NAMES)
    return [web.get(f"/{{where:.+}}/{{name:{names}}}", serve)]
