"""What tools built for other netboot servers ask, with curl against a running server:
matchbox's ``/metadata`` and stable channel URLs for "the current prod image"."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from netbootd.http.testkit import NODE_A, NODE_C, ServerThread, make_app, write_version
from tests.integration.test_http_boot import curl


@pytest.fixture
def server(tmp_path: Path):
    app = make_app(tmp_path, real_store=True)
    with ServerThread(app) as srv:
        yield srv


def test_matchbox_metadata_by_mac_uuid_and_hostname(server):
    status, headers, body = curl(f"{server.url}/metadata?mac=52-54-00-00-00-0a&foo=bar")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = dict(line.split("=", 1) for line in body.decode().splitlines())
    assert lines["MAC"] == NODE_A and lines["HOSTNAME"] == "node-a"
    assert lines["JOIN"] == "k3s" and lines["K3S_SERVER"] == "https://10.0.0.10:6443"
    assert (lines["IMAGE"], lines["VERSION"]) == ("demo", "1.0")
    assert lines["REQUEST_QUERY_MAC"] == NODE_A and lines["REQUEST_QUERY_FOO"] == "bar"
    assert lines["REQUEST_RAW_QUERY"] == "mac=52-54-00-00-00-0a&foo=bar"
    assert "SECRET" not in body.decode().upper().replace("K3S_SERVER", "")
    status, _, body = curl("-H", "Accept: application/json",
                           f"{server.url}/metadata?hostname=node-c")
    assert status == 200 and json.loads(body)["MAC"] == NODE_C
    assert curl(f"{server.url}/metadata?hostname=nobody")[0] == 404
    assert curl(f"{server.url}/metadata?mac=not-a-mac")[0] == 400
    assert curl(f"{server.url}/metadata?mac=52:54:00:00:00:ff")[0] == 404  # policy: ignore


def test_channel_url_redirects_to_the_immutable_version(server):
    url = f"{server.url}/files/demo/channels/prod/boot/vmlinuz"
    status, headers, _ = curl(url)
    assert status == 302 and headers["location"] == "/files/demo/1.0/boot/vmlinuz"
    body = subprocess.run(["curl", "-sSfL", "--max-time", "10", url], capture_output=True,
                          check=True).stdout
    want = (server.app.settings.paths.images / "store/demo/1.0/boot/vmlinuz").read_bytes()
    assert body == want
    write_version(server.app.settings.paths.images, "demo", "2.0",
                  {"boot/vmlinuz": b"k2", "boot/initrd.img": b"i2", "disk.img": b"d2"})
    server.app.store.activate("demo", "2.0", "prod", by="test")
    assert curl(url)[1]["location"] == "/files/demo/2.0/boot/vmlinuz"
    assert curl(f"{server.url}/files/demo/channels/nope/boot/vmlinuz")[0] == 404
