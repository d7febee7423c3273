"""Hot reload through the real watcher (watchfiles) on real files in a copy of config/.

What went wrong in the field, each pinned here:
- ``: > nodes.yaml`` was loaded as 0 nodes (DHCP went silent for the whole fleet);
- a file written in two steps was loaded after the first (one node of two);
- a write cut mid-value was loaded with hostname ``x86-w``;
- a template a reload had rejected went live anyway (jinja's auto_reload read it);
- a template error put a secret's value into ``config_error`` (/readyz, status page,
  log, events.jsonl).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netbootd.daemon import build_app
from netbootd.model import ClientFacts, ClientKind, ImageRef
from netbootd.planner import decide
from netbootd.reload import SettleProbe, watch_config
from netbootd.render import Renderer, RenderError, ServerInfo
from netbootd.settings import load_settings

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

X86 = "52:54:00:a0:00:01"
SERVER = ServerInfo("10.231.0.2", 8080)


class OneImage:
    """Every machine gets one fixed version (the planner's resolver interface)."""

    def resolve(self, image, channel, pin, *, mac=None):
        return ImageRef(name=image or "demo", version="1", root=Path("/srv/store/demo/1"),
                        boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                              "cmdline": "", "rootfs": "rootfs"})


async def until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for a condition; the bound is generous (a loaded machine), never the test."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def reloads(app, outcome: str) -> float:
    return app.metrics.config_reloads.labels(outcome)._value.get()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Watching:
    """The app plus its config watcher task, and what the watcher reported."""

    def __init__(self, app) -> None:
        self.app = app
        self.probe = SettleProbe()
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    @property
    def inventory_file(self) -> Path:
        return self.app.settings.paths.inventory

    def hostname(self, mac: str) -> str | None:
        node = self.app.inventory.nodes.get(mac)
        return node.hostname if node else None


@pytest.fixture
async def watching(config_dir: Path, request):
    settle = getattr(request, "param", 0.2)
    os.environ["NETBOOTD_RELOAD__SETTLE_SECONDS"] = str(settle)
    try:
        settings = load_settings(config_dir / "netbootd.yaml")
    finally:
        del os.environ["NETBOOTD_RELOAD__SETTLE_SECONDS"]
    app = build_app(settings)
    app.planner.images = OneImage()
    w = Watching(app)
    w.task = asyncio.create_task(watch_config(app, w.stop, w.probe))
    # the watcher is live once a change it sees leads to a reload: touch until it does
    probe = config_dir / "probe.txt"
    deadline = time.monotonic() + 60
    while reloads(app, "ok") == 0:
        assert time.monotonic() < deadline, "the config watcher never started"
        probe.write_text(str(time.monotonic()))
        await asyncio.sleep(0.1)
    try:
        yield w
    finally:
        w.stop.set()
        await asyncio.wait_for(w.task, 30)
        app.events.close()


async def settled_after(w: Watching, before_ok: float, before_rejected: float) -> None:
    await until(lambda: reloads(w.app, "ok") > before_ok
                or reloads(w.app, "rejected") > before_rejected, "the reload to finish")


async def test_emptied_inventory_is_refused_and_the_fleet_keeps_booting(watching: Watching):
    w = watching
    nodes = len(w.app.inventory.nodes)
    assert nodes >= 2
    ok, rejected = reloads(w.app, "ok"), reloads(w.app, "rejected")
    os.truncate(w.inventory_file, 0)  # `: > nodes.yaml`
    await until(lambda: reloads(w.app, "rejected") > rejected, "the empty file's rejection")
    assert reloads(w.app, "ok") == ok
    assert len(w.app.inventory.nodes) == nodes
    assert "has no nodes at all" in w.app.config_error
    assert "allow_shrink" in w.app.config_error


@pytest.mark.parametrize("watching", [2.0], indirect=True)
@pytest.mark.parametrize("cut", ["between nodes", "mid-value"])
async def test_file_written_in_two_steps_is_loaded_only_when_complete(
        watching: Watching, cut: str):
    """The first part is renamed into place, the watcher starts settling on it, then the
    rest is appended: only the complete file may ever be in force."""
    w = watching
    full = w.inventory_file.read_text()
    full += ("  02:00:00:00:00:42:\n    hostname: newcomer-42\n"
             "  02:00:00:00:00:43:\n    hostname: newcomer-43\n")
    split = (full.index("  02:00:00:00:00:43:") if cut == "between nodes"
             else full.index("x86-worker-1") + len("x86-w"))
    first, rest = full[:split], full[split:]
    rejected = reloads(w.app, "rejected")
    seen: list[tuple[int, str | None]] = []
    w.app.on_reload.append(lambda: seen.append((len(w.app.inventory.nodes),
                                                w.hostname(X86))))
    w.probe.changed.clear()
    write_atomically(w.inventory_file, first)
    # the watcher has read the first part and waits for it to settle: now finish it
    await until(lambda: w.probe.waiting_on == first, "settling on the first part")
    fd = os.open(w.inventory_file, os.O_WRONLY | os.O_APPEND)
    os.write(fd, rest.encode())
    os.close(fd)
    await until(lambda: w.app.inventory.nodes.get("02:00:00:00:00:43") is not None,
                "the complete file to be loaded")
    assert w.hostname(X86) == "x86-worker-1"
    assert w.probe.changed.is_set()
    assert reloads(w.app, "rejected") == rejected
    assert all(n == len(w.app.inventory.nodes) and h == "x86-worker-1" for n, h in seen), seen


async def test_losing_most_nodes_needs_allow_shrink(watching: Watching):
    w = watching
    text = w.inventory_file.read_text()
    head, _, _ = text.partition("\nnodes:\n")
    one = head + "\nnodes:\n  52:54:00:a0:00:01:\n    hostname: x86-worker-1\n"
    assert len(w.app.inventory.nodes) >= 3
    ok, rejected = reloads(w.app, "ok"), reloads(w.app, "rejected")
    write_atomically(w.inventory_file, one)
    await until(lambda: reloads(w.app, "rejected") > rejected, "the shrink's rejection")
    assert len(w.app.inventory.nodes) >= 3
    assert "reload.max_node_loss" in w.app.config_error

    write_atomically(w.inventory_file, "allow_shrink: true\n" + one)
    await until(lambda: reloads(w.app, "ok") > ok, "the allowed shrink")
    assert list(w.app.inventory.nodes) == [X86]
    assert w.app.config_error is None


async def test_rejected_template_never_goes_live(watching: Watching):
    w = watching
    plan = decide(ClientFacts(mac=X86, kind=ClientKind.IPXE), w.app.inventory, w.app.settings,
                  OneImage())

    def ipxe_for(app) -> str:
        return app.render.render("ipxe", plan, SERVER)

    before = ipxe_for(w.app)
    template = w.app.settings.paths.templates / "ipxe" / "node.ipxe.j2"
    rejected = reloads(w.app, "rejected")
    write_atomically(template, template.read_text() + "\n{{ nope.x }}\n")
    await until(lambda: reloads(w.app, "rejected") > rejected, "the broken template's rejection")
    assert "node.ipxe.j2" in w.app.config_error
    assert ipxe_for(w.app) == before  # the validated template is still the one rendered

    # a good edit goes live through the watcher
    ok = reloads(w.app, "ok")
    write_atomically(template, template.read_text().replace("\n{{ nope.x }}\n", "\n# edited\n"))
    await until(lambda: reloads(w.app, "ok") > ok, "the fixed template's reload")
    assert ipxe_for(w.app).endswith("# edited\n")


LEAKY = "{{ vars[secrets.k3s_token] }}\n"  # the lookup error quotes the key: the token


async def test_template_error_never_publishes_a_secret(watching: Watching, caplog):
    w = watching
    token = w.app.settings.secrets["k3s_token"].read_text().strip()
    assert len(token) >= 8
    template = w.app.settings.paths.templates / "cloud-init" / "user-data.j2"
    rejected = reloads(w.app, "rejected")
    with caplog.at_level(logging.INFO):
        write_atomically(template, template.read_text() + LEAKY)
        await until(lambda: reloads(w.app, "rejected") > rejected, "the rejection")
    assert w.app.config_error and "user-data.j2" in w.app.config_error
    assert token not in w.app.config_error
    assert "<secret:k3s_token>" in w.app.config_error
    assert token not in caplog.text
    assert w.app.events.flush()
    events = (w.app.settings.paths.state / "events.jsonl").read_text()
    assert "reload rejected" in events and token not in events


def test_render_error_at_serve_time_is_scrubbed(config_dir: Path):
    """Rendering for a node uses the real secret; its error text names it, not its value."""
    settings = load_settings(config_dir / "netbootd.yaml")
    app = build_app(settings)
    token = settings.secrets["k3s_token"].read_text().strip()
    sources = dict(app.render.sources)
    sources["cloud-init/user-data.j2"] = LEAKY
    renderer = Renderer(settings, sources)
    plan = decide(ClientFacts(mac=X86, kind=ClientKind.IPXE), app.inventory, settings,
                  OneImage())
    with pytest.raises(RenderError) as exc:
        renderer.render("user-data", plan, SERVER)
    assert token not in str(exc.value) and "<secret:k3s_token>" in str(exc.value)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    app.events.close()
