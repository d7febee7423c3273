"""The HTTP boot path against a real server on 127.0.0.1, driven by curl and aiohttp:
the iPXE chain for every action, boot files (Range, HEAD, ETag, traversal), cloud-init
with per-node secrets and strict mode, the beacon and the booted callback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from netbootd.http.testkit import (
    NODE_A,
    NODE_B,
    NODE_C,
    SECRET_A,
    SECRET_B,
    UNKNOWN,
    ServerThread,
    give_address,
    make_app,
    write_version,
)
from netbootd.model import mac_dashes
from netbootd.render import Renderer


@pytest.fixture
def server(tmp_path: Path):
    app = make_app(tmp_path)
    with ServerThread(app) as srv:
        yield srv


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl -i: (status, lower-case headers, body) of the last response."""
    out = subprocess.run(["curl", "-s", "-S", "-i", "--max-time", "10", *args],
                         capture_output=True, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def ipxe_url(srv: ServerThread, mac: str, **extra: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"mac": mac_dashes(mac), **extra}.items())
    return f"{srv.url}/ipxe?{q}"


# -- chain -------------------------------------------------------------------------------
def test_boot_ipxe_chains_to_per_mac_script_on_the_host_asked(server):
    status, _headers, body = curl(f"{server.url}/boot.ipxe")
    assert status == 200
    text = body.decode()
    assert text.startswith("#!ipxe\n")
    assert (f"chain --autofree {server.url}/ipxe?mac=${{mac:hexhyp}}&uuid=${{uuid}}"
            "&arch=${buildarch}") in text
    # A public_url-less server echoes the Host it was reached at (validated)
    _, _, body = curl("-H", "Host: boot.example:8080", f"{server.url}/boot.ipxe")
    assert "http://boot.example:8080/ipxe?" in body.decode()
    for bad in ("evil.example/x;kernel", "evil example", "evil.example:99999999"):
        _, _, body = curl("-H", f"Host: {bad}", f"{server.url}/boot.ipxe")
        assert "evil" not in body.decode() and server.url in body.decode()


def test_netboot_script_names_the_planned_version_and_the_beacon(server):
    status, _, body = curl(ipxe_url(server, NODE_A, arch="x86_64", platform="efi"))
    text = body.decode()
    assert status == 200 and text.startswith("#!ipxe")
    assert f"kernel {server.url}/files/demo/1.0/boot/vmlinuz" in text
    assert f"initrd --name initrd.img {server.url}/files/demo/1.0/boot/initrd.img" in text
    assert f"ds=nocloud;s={server.url}/cloud-init/{mac_dashes(NODE_A)}/" in text
    plan = server.app.planner.current(NODE_A)
    assert plan is not None and plan.facts.arch == 7
    assert f"/api/v1/beacon/{mac_dashes(NODE_A)}?session={plan.session}" in text
    assert text.rstrip().endswith("boot")


def test_install_local_and_unknown_scripts(server):
    text = curl(ipxe_url(server, NODE_B))[2].decode()
    assert f"netbootd.install={server.url}/files/gold/1.0/disk.img" in text
    assert "installs gold 1.0" in text
    assert f"kernel {server.url}/files/installer/1.0/boot/vmlinuz" in text
    plan = server.app.planner.current(NODE_B)
    assert f"netbootd.token={plan.token}" in text and plan.disk.disk.uncompressed_sha256 in text
    text = curl(ipxe_url(server, NODE_C))[2].decode()
    assert "local disk" in text and text.rstrip().endswith("exit")
    status, _, body = curl(ipxe_url(server, UNKNOWN))
    assert status == 200 and body.decode().rstrip().endswith("exit")
    assert "not in the inventory" in body.decode()
    # a machine outside the fleet is counted and sampled, not given a node row
    assert server.app.events.timeline(UNKNOWN) == []
    total, sample = server.app.events.ignored()
    assert total >= 1 and UNKNOWN in dict(sample)


def test_unknown_machine_with_default_policy_netboots(tmp_path):
    app = make_app(tmp_path, policy="default")
    with ServerThread(app) as srv:
        text = curl(ipxe_url(srv, UNKNOWN))[2].decode()
    assert "boots demo 1.0" in text


def test_malformed_mac_is_400_and_counted(server):
    for bad in ("", "zz", "52-54-00-00-00", "52:54:00:00:00:0g" + "0" * 100):
        status, _, _ = curl(f"{server.url}/ipxe?mac={bad}")
        assert status == 400
    value = server.app.metrics.registry.get_sample_value(
        "netbootd_malformed_inputs_total", {"service": "http"})
    assert value >= 4


def test_session_pins_the_version_until_the_kernel_runs_then_next_boot_replans(server):
    app = server.app
    write_version(app.settings.paths.images, "demo", "2.0",
                  {"boot/vmlinuz": b"k2", "boot/initrd.img": b"i2", "disk.img": b"d2"})
    assert "demo 1.0" in curl(ipxe_url(server, NODE_A))[2].decode()
    app.planner.images.channels[("demo", "prod")] = "2.0"  # hot swap mid-boot
    assert "demo 1.0" in curl(ipxe_url(server, NODE_A))[2].decode()
    session = app.planner.current(NODE_A).session
    # a beacon without the boot's own session is recorded but ends nothing
    status, _, _ = curl(f"{server.url}/api/v1/beacon/{mac_dashes(NODE_A)}?session=bogus1")
    assert status == 200
    assert "demo 1.0" in curl(ipxe_url(server, NODE_A))[2].decode()
    # kernel handed over: the firmware session ends, the OS keeps its plan
    status, _, body = curl(f"{server.url}/api/v1/beacon/{mac_dashes(NODE_A)}?session={session}")
    assert status == 200 and body == b"ok\n"
    assert app.events.nodes[NODE_A].phase == "kernel"
    meta = curl(f"{server.url}/cloud-init/{mac_dashes(NODE_A)}/meta-data")[2].decode()
    assert "demo-1.0" in meta, "the booted OS sees the version it booted"
    give_address(app, NODE_A, "127.0.0.1")  # its address (nodes.yaml ip)
    status, _, body = curl("-X", "POST", "-H", "Content-Type: application/json", "--data",
                           json.dumps({"mac": mac_dashes(NODE_A), "phase": "booted",
                                       "message": "up", "token": app.planner.current(
                                           NODE_A).token}), f"{server.url}/api/v1/events")
    assert status == 200, body
    state = app.events.nodes[NODE_A]
    assert (state.phase, state.version, state.ip) == ("booted", "1.0", "127.0.0.1")
    # a power cycle: the next firmware request plans afresh
    assert "demo 2.0" in curl(ipxe_url(server, NODE_A))[2].decode()


def test_events_are_validated(server):
    url = f"{server.url}/api/v1/events"
    for body in ("not json", json.dumps({"mac": "nope", "phase": "booted"}),
                 json.dumps({"mac": NODE_A, "phase": "exploded"}),
                 json.dumps({"mac": NODE_A, "phase": "booted", "message": "x" * 5000}),
                 json.dumps({"mac": NODE_A, "phase": "failed", "message": "y" * 20000})):
        status, _, resp = curl("-X", "POST", "--data-binary", body, url)
        assert status in (400, 413), resp
        assert "error" in json.loads(resp)
    status, _, _ = curl(f"{server.url}/api/v1/beacon/not-a-mac")
    assert status == 400
    status, _, _ = curl(f"{server.url}/api/v1/beacon/{NODE_A}?session=a%20b")
    assert status == 400


# -- files -------------------------------------------------------------------------------
def kernel_bytes(srv: ServerThread) -> bytes:
    return (srv.app.settings.paths.images / "store/demo/1.0/boot/vmlinuz").read_bytes()


def test_file_full_head_and_cache_headers(server):
    data = kernel_bytes(server)
    status, h, body = curl(f"{server.url}/files/demo/1.0/boot/vmlinuz")
    assert status == 200 and body == data
    assert h["content-length"] == str(len(data))
    assert h["cache-control"] == "public, max-age=31536000, immutable"
    assert h["etag"] and h["last-modified"] and h["accept-ranges"] == "bytes"
    status, hh, body = curl("-I", f"{server.url}/files/demo/1.0/boot/vmlinuz")
    assert status == 200 and body == b""
    assert hh["content-length"] == str(len(data)) and hh["etag"] == h["etag"]
    sent = server.app.metrics.registry.get_sample_value("netbootd_bytes_sent_total",
                                                        {"service": "http"})
    assert sent == len(data)


def test_range_206_and_416(server):
    data = kernel_bytes(server)
    url = f"{server.url}/files/demo/1.0/boot/vmlinuz"
    status, h, body = curl("-r", "100-199", url)
    assert status == 206 and body == data[100:200]
    assert h["content-range"] == f"bytes 100-199/{len(data)}"
    assert h["content-length"] == "100"
    status, h, body = curl("-H", "Range: bytes=-10", url)
    assert status == 206 and body == data[-10:]
    status, h, _ = curl("-H", f"Range: bytes={len(data)}-", url)
    assert status == 416 and h["content-range"] == f"bytes */{len(data)}"


def test_etag_if_none_match_304(server):
    url = f"{server.url}/files/demo/1.0/boot/initrd.img"
    etag = curl("-I", url)[1]["etag"]
    status, _, body = curl("-H", f"If-None-Match: {etag}", url)
    assert status == 304 and body == b""
    assert curl("-H", 'If-None-Match: "other"', url)[0] == 200


def test_precompressed_sibling_is_never_substituted(server):
    data = kernel_bytes(server)
    status, h, body = curl("-H", "Accept-Encoding: gzip, br",
                           f"{server.url}/files/demo/1.0/boot/vmlinuz")
    assert status == 200 and body == data and "content-encoding" not in h


@pytest.mark.parametrize("path", [
    "/files/demo/1.0/../../../../etc/passwd",
    "/files/demo/1.0/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/files/demo/1.0/boot/..%2f..%2f..%2fetc/passwd",
    "/files/demo/..%2f..%2f..%2f/etc/passwd",
    "/files/demo/1.0//etc/passwd",
    "/files/demo/1.0/secret.txt",          # exists, not in the manifest
    "/files/demo/1.0/manifest.json",       # not an artefact
    "/files/demo/1.0/boot/evil",           # in the manifest, symlink out of the version
    "/files/demo/9.9/boot/vmlinuz",        # no such version
    "/files/../store/demo/1.0/boot/vmlinuz",
])
def test_traversal_and_unlisted_paths_are_404(server, path):
    root = server.app.settings.paths.images / "store/demo/1.0"
    evil = root / "boot/evil"
    if not evil.is_symlink():
        evil.symlink_to("/etc/passwd")
        m = json.loads((root / "manifest.json").read_text())
        m["artefacts"].append({"path": "boot/evil", "size": 1, "sha256": "0" * 64})
        (root / "manifest.json").write_text(json.dumps(m))
        os.utime(root / "manifest.json", ns=(1, 1))  # new mtime: cache key changes
    status, _, body = curl("--path-as-is", server.url + path)
    assert status == 404, (path, body[:200])
    assert b"root:" not in body


def test_ipxe_binaries_whitelisted(server):
    status, h, _ = curl("-I", f"{server.url}/ipxe/snponly.efi")
    if not Path("/usr/lib/ipxe/snponly.efi").exists():
        pytest.fail("Debian's ipxe package is not installed: apt-get install ipxe",
                    pytrace=False)
    assert status == 200 and int(h["content-length"]) > 1000
    assert curl(f"{server.url}/ipxe/82540em.rom")[0] == 404
    assert curl("--path-as-is", f"{server.url}/ipxe/../../etc/passwd")[0] == 404


def test_parallel_downloads_with_aiohttp_client(server):
    data = kernel_bytes(server)

    async def fetch_all() -> list[bytes]:
        async with aiohttp.ClientSession() as s:
            async def one() -> bytes:
                async with s.get(f"{server.url}/files/demo/1.0/boot/vmlinuz") as r:
                    assert r.status == 200
                    return await r.read()
            return await asyncio.gather(*(one() for _ in range(16)))

    for body in asyncio.run(fetch_all()):
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    gauge = server.app.metrics.registry.get_sample_value("netbootd_active_transfers",
                                                         {"service": "http"})
    assert gauge == 0


# -- cloud-init --------------------------------------------------------------------------
def test_cloud_init_each_node_gets_its_own_secret(server):
    app = server.app
    base = f"{server.url}/cloud-init"
    meta = curl(f"{base}/{mac_dashes(NODE_A)}/meta-data")[2].decode()
    assert "instance-id: node-a-demo-1.0" in meta and "local-hostname: node-a" in meta
    for artefact in ("vendor-data", "network-config"):
        status, h, _ = curl(f"{base}/{mac_dashes(NODE_A)}/{artefact}")
        assert status == 200 and h["cache-control"] == "no-store"

    give_address(app, NODE_A, "127.0.0.1")
    status, _, body = curl(f"{base}/{mac_dashes(NODE_A)}/user-data")
    assert status == 200
    text = body.decode()
    assert SECRET_A in text and SECRET_B not in text and "hostname: node-a" in text
    # strict mode: 127.0.0.1 is node A, so node B's user-data is refused to it
    status, _, body = curl(f"{base}/{mac_dashes(NODE_B)}/user-data")
    assert status == 403 and SECRET_B.encode() not in body

    give_address(app, NODE_B, "127.0.0.1")
    status, _, body = curl(f"{base}/{mac_dashes(NODE_B)}/user-data")
    assert status == 200
    assert SECRET_B in body.decode() and SECRET_A not in body.decode()
    assert curl(f"{base}/{mac_dashes(NODE_A)}/user-data")[0] == 403

    # secrets never reach the event log
    assert app.events.flush()
    log_text = (app.settings.paths.state / "events.jsonl").read_text()
    assert SECRET_A not in log_text and SECRET_B not in log_text
    # a refused attempt does not change the victim's state
    assert app.events.nodes[NODE_A].phase == "http"


def test_user_data_without_secrets_is_served_to_anyone(server):
    status, _, body = curl(f"{server.url}/cloud-init/{mac_dashes(NODE_C)}/user-data")
    assert status == 200 and b"hostname: node-c" in body


def test_strict_mode_off_serves_everyone(tmp_path):
    app = make_app(tmp_path, http={"strict_user_data": False})
    with ServerThread(app) as srv:
        status, _, body = curl(f"{srv.url}/cloud-init/{mac_dashes(NODE_B)}/user-data")
    assert status == 200 and SECRET_B.encode() in body


def test_cloud_init_bad_input(server):
    assert curl(f"{server.url}/cloud-init/xx/meta-data")[0] == 400
    assert curl(f"{server.url}/cloud-init/{mac_dashes(NODE_A)}/passwd")[0] == 404
    assert curl(f"{server.url}/cloud-init/{mac_dashes(UNKNOWN)}/meta-data")[0] == 404


def test_repeated_script_fetches_are_counted_but_logged_once_per_session(server):
    for _ in range(5):
        assert curl(ipxe_url(server, NODE_A))[0] == 200
    logged = [e for e in server.app.events.timeline(NODE_A) if e.fields.get("file") == "/ipxe"]
    assert len(logged) == 1
    ok = server.app.metrics.registry.get_sample_value(
        "netbootd_requests_total", {"service": "http", "outcome": "ok"})
    assert ok >= 5


def test_reload_invalidates_cached_scripts(server):
    app = server.app
    before = curl(ipxe_url(server, NODE_A))[2].decode()
    templates = app.settings.paths.templates
    # a private copy of the templates with a marker line, then a reload (new Renderer)
    copy = app.settings.paths.state.parent / "templates"
    shutil.copytree(templates, copy)
    ipxe = copy / "ipxe/node.ipxe.j2"
    ipxe.write_text(ipxe.read_text().replace("#!ipxe\n", "#!ipxe\necho marker-42\n", 1))
    app.settings = app.settings.model_copy(update={"paths": app.settings.paths.model_copy(
        update={"templates": copy})})
    app.render = Renderer(app.settings)
    after = curl(ipxe_url(server, NODE_A))[2].decode()
    assert "marker-42" not in before and "marker-42" in after


def test_nothing_to_boot_is_not_kept_as_a_session_so_the_retry_sees_a_new_image(server):
    app = server.app
    app.planner.images.channels.pop(("demo", "prod"))
    text = curl(ipxe_url(server, NODE_A))[2].decode()
    assert "nothing to boot" in text and "chain --autofree" in text
    assert app.planner.current(NODE_A) is None
    app.planner.images.channels[("demo", "prod")] = "1.0"  # an image arrives
    app.planner.changed()  # what the store tells the planner on every activation
    assert "boots demo 1.0" in curl(ipxe_url(server, NODE_A))[2].decode()


def test_stop_is_quick_with_a_download_in_flight(tmp_path):
    # 32 MiB: more than loopback socket buffers hold, so the transfer is really in flight
    with ServerThread(make_app(tmp_path, kernel_size=32 << 20)) as server:
        _stop_during_download(server)


def _stop_during_download(server: ServerThread) -> None:
    slow = subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--limit-rate", "1M",
                             f"{server.url}/files/demo/1.0/boot/vmlinuz"])
    try:
        deadline = time.monotonic() + 5
        gauge = {"service": "http"}
        while time.monotonic() < deadline and not server.app.metrics.registry.get_sample_value(
                "netbootd_active_transfers", gauge):
            time.sleep(0.05)
        assert server.app.metrics.registry.get_sample_value("netbootd_active_transfers", gauge)
        t0 = time.monotonic()
        server.call(server.service.stop())
        assert time.monotonic() - t0 < 1.0
    finally:
        slow.kill()
        slow.wait()


class StepClock:
    """The planner's clock, moved by the test: a 400 s boot without waiting 400 s."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_400_s_ipxe_boot_gets_cloud_init_of_its_version_after_a_hot_swap(tmp_path):
    app = make_app(tmp_path)
    clock = StepClock()
    app.planner._clock = clock  # session_ttl is 300 s by default
    write_version(app.settings.paths.images, "demo", "2.0",
                  {"boot/vmlinuz": b"k2", "boot/initrd.img": b"i2", "disk.img": b"d2"})
    give_address(app, NODE_A, "127.0.0.1")
    with ServerThread(app) as srv:
        assert "demo 1.0" in curl(ipxe_url(srv, NODE_A))[2].decode()
        session = app.planner.current(NODE_A).session
        app.planner.images.channels[("demo", "prod")] = "2.0"  # hot swap
        for step, path in ((150, "boot/vmlinuz"), (140, "boot/initrd.img")):
            clock.now += step
            assert curl(f"{srv.url}/files/demo/1.0/{path}")[0] == 200
        clock.now += 10
        curl(f"{srv.url}/api/v1/beacon/{mac_dashes(NODE_A)}?session={session}")
        clock.now += 100  # 400 s after the boot started
        meta = curl(f"{srv.url}/cloud-init/{mac_dashes(NODE_A)}/meta-data")[2].decode()
        assert "demo-1.0" in meta
        assert "demo 2.0" in curl(ipxe_url(srv, NODE_A))[2].decode(), "next boot: N+1"


async def test_a_download_in_progress_holds_the_session_past_its_ttl(tmp_path):
    # far more than loopback's socket buffers hold: the download is still being sent
    app = make_app(tmp_path, kernel_size=64 << 20)
    clock = StepClock()
    app.planner._clock = clock
    write_version(app.settings.paths.images, "demo", "2.0",
                  {"boot/vmlinuz": b"k2", "boot/initrd.img": b"i2", "disk.img": b"d2"})
    give_address(app, NODE_A, "127.0.0.1")
    with ServerThread(app) as srv:
        async with aiohttp.ClientSession() as http:
            async with http.get(ipxe_url(srv, NODE_A)) as r:
                assert "demo 1.0" in await r.text()
            app.planner.images.channels[("demo", "prod")] = "2.0"
            async with http.get(f"{srv.url}/files/demo/1.0/boot/vmlinuz") as r:
                await r.content.readexactly(64 * 1024)  # under way, and held
                clock.now += 400  # longer than session_ttl
                async with http.get(ipxe_url(srv, NODE_A)) as again:
                    assert "demo 1.0" in await again.text(), "the same boot stays on N"
                await r.read()
            clock.now += 301  # released at the end: slides from there, then expires
            async with http.get(ipxe_url(srv, NODE_A)) as r:
                assert "demo 2.0" in await r.text()
