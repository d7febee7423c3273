"""`netbootd serve` as a user runs it: subprocess, high ports, hot reload, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netbootd", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, check=False)



def config_events(state: Path) -> list[dict]:
    f = state / "events.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev["kind"] == "config":
            out.append(ev)
    return out


@pytest.fixture
def daemon(config_dir: Path, tmp_path: Path):
    http_port = free_port()
    cmd = [sys.executable, "-m", "netbootd", "--config", str(config_dir / "netbootd.yaml"),
           "serve", "--no-dhcp", "--no-tftp", "--bind", "127.0.0.1",
           "--http-port", str(http_port)]
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (tmp_path / "daemon.log").read_text().count("netbootd serving") > 0
                 or proc.poll() is not None, 30, "daemon start")
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        yield proc, config_dir, tmp_path / "state", http_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_sigterm_stops_within_two_seconds(daemon):
    proc = daemon[0]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert proc.returncode == 0


def test_inventory_replaced_by_rename_takes_effect_and_bad_edit_is_kept_out(daemon):
    proc, config_dir, state, _ = daemon
    nodes = config_dir / "nodes.yaml"
    good = nodes.read_text() + "\n  02:00:00:00:00:42:\n    hostname: newcomer\n"
    tmp = config_dir / ".nodes.yaml.tmp"
    tmp.write_text(good)
    os.replace(tmp, nodes)
    # generous bounds: a loaded machine is slow, not wrong (reload.settle_seconds applies)
    wait_for(lambda: any(e["fields"].get("outcome") == "ok" for e in config_events(state)),
             60.0, "reload of a valid inventory")

    tmp.write_text(good + "\n  not-a-mac: {}\n")
    os.replace(tmp, nodes)
    wait_for(lambda: any(e["fields"].get("outcome") == "error" for e in config_events(state)),
             60.0, "rejection of an invalid inventory")
    err = [e for e in config_events(state) if e["fields"].get("outcome") == "error"][-1]
    assert "nodes.yaml:" in err["fields"]["error"] and "not-a-mac" in err["fields"]["error"]
    assert proc.poll() is None, "a bad edit must not stop the daemon"


def test_check_on_shipped_config_exits_0():
    r = run_cli("check")
    assert r.returncode == 0, r.stderr
    assert "ok:" in r.stdout


BROKEN = {
    "duplicate MAC": ("nodes:\n  aa:bb:cc:dd:ee:01: {}\n  AA-BB-CC-DD-EE-01: {}\n",
                      "nodes.yaml:3: nodes.AA-BB-CC-DD-EE-01"),
    "malformed MAC": ("nodes:\n  aa:bb:cc:dd:ee:zz: {}\n", "nodes.yaml:2: nodes.aa:bb:cc:dd:ee:zz"),
    "unknown profile": ("nodes:\n  aa:bb:cc:dd:ee:01:\n    profile: gone\n",
                        "nodes.yaml:3: nodes.aa:bb:cc:dd:ee:01.profile"),
    "YAML syntax": ("nodes:\n  aa:bb:cc:dd:ee:01: [\n", "nodes.yaml:"),
    "ambiguous tie": ("profiles:\n  a: {selectors: {kind: rpi}}\n  b: {selectors: {kind: rpi}}\n",
                      "nodes.yaml:3: profiles.b.selectors"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_on_broken_inventory_names_file_line_field(case, config_dir):
    text, expected = BROKEN[case]
    (config_dir / "nodes.yaml").write_text(text)
    r = run_cli("--config", str(config_dir / "netbootd.yaml"), "check")
    assert r.returncode == 1, r.stdout
    assert expected in r.stderr, r.stderr


def test_check_finds_undefined_template_variable(config_dir):
    (config_dir / "templates" / "ipxe" / "node.ipxe.j2").write_text("#!ipxe\necho {{ oops }}\n")
    r = run_cli("--config", str(config_dir / "netbootd.yaml"), "check")
    assert r.returncode == 1
    assert "node.ipxe.j2:2:" in r.stderr and "oops" in r.stderr


def test_serve_answers_before_its_render_check_and_stops_when_it_fails(config_dir, tmp_path):
    """``serve`` answers once nodes.yaml is parsed and validated; the render check of
    every node follows, and a config that fails it stops the daemon with status 1 and
    the template's file, line and node, as a refusal to start did."""
    (config_dir / "templates" / "ipxe" / "node.ipxe.j2").write_text("#!ipxe\necho {{ oops }}\n")
    http_port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "netbootd", "--config", str(config_dir / "netbootd.yaml"),
             "serve", "--no-dhcp", "--no-tftp", "--bind", "127.0.0.1", "--http-port",
             str(http_port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert proc.returncode == 1, text
    assert "netbootd serving" in text
    assert "config rejected, stopping" in text and "node.ipxe.j2:2: ipxe for " in text, text


def test_readyz_waits_for_the_render_check(daemon):
    """Once the check of the started config passed, /readyz says so (it said "templates
    not yet checked" until then)."""
    import urllib.request

    port = daemon[3]

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(ready, 60, "/readyz 200")
    log = (daemon[2].parent / "daemon.log").read_text()
    assert "config checked: every template renders" in log


@pytest.fixture
def demo_in_store(config_dir: Path) -> str:
    """Version 2026.11.23-1 of the demo image ingested and active on prod, as after
    ``./setup.sh serve`` built and the daemon ingested it."""
    from netbootd.settings import load_settings
    from netbootd.store.build import sample_build
    from netbootd.store.store import ImageStore

    settings = load_settings(config_dir / "netbootd.yaml")
    store = ImageStore(settings.paths.images, settings.paths.state, settings.store)
    sample_build(store.layout.incoming / "demo-2026.11.23-1", "demo", "2026.11.23-1")
    result = store.ingest_entry("demo-2026.11.23-1")
    assert result is not None and result.accepted, result
    if store.active("demo", "prod") != "2026.11.23-1":
        store.activate("demo", "2026.11.23-1", "prod", by="test")
    # the example Pi's profile names the Pi demo image (a Pi needs a Pi boot tree)
    sample_build(store.layout.incoming / "pi-demo-1", "pi-demo", "2026.11.23-1",
                 "pi-boot+rootfs")
    result = store.ingest_entry("pi-demo-1")
    assert result is not None and result.accepted, result
    if store.active("pi-demo", "prod") != "2026.11.23-1":
        store.activate("pi-demo", "2026.11.23-1", "prod", by="test")
    return "2026.11.23-1"


@pytest.mark.parametrize("mac,action,profile", [
    ("d8:3a:dd:12:34:56", "netboot", "pi5-workers"),
    ("52:54:00:a0:00:01", "netboot", "x86-uefi"),
    ("52:54:00:a0:00:02", "local", "default"),
    ("02:00:00:00:00:99", "ignore", "default"),
])
def test_plan_for_example_nodes(mac, action, profile, config_dir, demo_in_store):
    r = run_cli("--config", str(config_dir / "netbootd.yaml"), "plan", mac, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["action"], out["profile"]) == (action, profile)
    expected_version = demo_in_store if action == "netboot" else None
    assert out["version"] == expected_version
    if action == "netboot":
        assert out["image"] == ("pi-demo" if profile == "pi5-workers" else "demo")
        if profile == "pi5-workers":  # a Pi boots a boot tree: its cmdline names the root
            assert f"/store/pi-demo/{demo_in_store}/rootfs" in out["cmdline"]
        else:
            assert f"/files/demo/{demo_in_store}/" in out["ipxe"]


def test_check_finds_missing_secret_file_and_missing_template(config_dir):
    (config_dir / "secrets" / "k3s-token").unlink()
    nodes = config_dir / "nodes.yaml"
    nodes.write_text(nodes.read_text().replace(
        "    profile: pi5-workers\n",
        "    profile: pi5-workers\n    templates: {config.txt: rpi/gone.txt.j2}\n", 1))
    r = run_cli("--config", str(config_dir / "netbootd.yaml"), "check")
    assert r.returncode == 1
    assert "secrets.k3s_token: file not found" in r.stderr, r.stderr
    assert "gone.txt.j2" in r.stderr and "template not found" in r.stderr, r.stderr
