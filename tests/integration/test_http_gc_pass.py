"""``POST /api/v1/images/gc`` runs the daemon's own GC pass (the one its timer runs: with
replicas, the leader's shared decision), and the command line refuses a GC of one replica's
own with the etcd backend."""

from __future__ import annotations

import argparse
import socket
import textwrap
from pathlib import Path

import aiohttp

from netbootd.daemon import Daemon, build_app
from netbootd.settings import load_settings
from netbootd.store import cli as store_cli
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "api-token-for-gc-tests"


async def test_the_api_gc_is_the_daemons_own_pass(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "api-token").write_text(TOKEN + "\n")
    (cfg / "nodes.yaml").write_text("nodes: {}\n")
    port = free_port()
    (cfg / "netbootd.yaml").write_text(textwrap.dedent(f"""
        dhcp: {{enabled: false}}
        tftp: {{enabled: false}}
        dns: {{enabled: false}}
        nfs: {{backend: none}}
        http: {{bind: 127.0.0.1, port: {port}, api_token_file: {cfg / 'api-token'}}}
        paths: {{images: {tmp_path / 'images'}, state: {tmp_path / 'state'},
                 inventory: {cfg / 'nodes.yaml'}, templates: {REPO / 'config' / 'templates'}}}
        """))
    app = build_app(load_settings(cfg / "netbootd.yaml"))
    daemon = Daemon(app)
    await daemon.start()
    try:
        assert not daemon.failed, daemon.failed
        store = app.services["store"]
        assert store.health()["last_gc"] is None
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/api/v1/images/gc", json={"dry_run": True},
                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200, await r.text()
        assert store.health()["last_gc"]["dry_run"] is True
    finally:
        await daemon.stop()


def test_the_command_line_refuses_gc_with_the_etcd_backend(tmp_path: Path, capsys) -> None:
    settings = load_settings(None, {
        "paths": {"images": str(tmp_path / "images"), "state": str(tmp_path / "state")},
        "cluster": {"backend": "etcd", "name": "pxe1",
                    "etcd": {"endpoints": [f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}"]}},
    }, use_default_path=False)
    args = argparse.Namespace(images_command="gc", dry_run=False)
    assert store_cli.run(args, settings) == 2
    out = capsys.readouterr().out
    assert "leader" in out and "POST /api/v1/images/gc" in out
    assert not any((tmp_path / "images").glob("store/*/*"))
