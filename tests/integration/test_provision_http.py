"""The provisioning lifecycle over real HTTP, as a node's installer and an operator meet
it: install -> installing -> installed -> local, failures, reinstall, and proof.

The installer's side is what its busybox script does: GET /api/v1/events with query
parameters; the disk OS's side is cloud-init asking /cloud-init/by-address/.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlencode

import pytest

from netbootd.http.testkit import (
    NODE_B,
    TOKEN,
    ServerThread,
    give_address,
    make_app,
    write_disk_version,
)
from netbootd.model import mac_dashes
from tests.integration.test_http_boot import curl, ipxe_url

AUTH = ("-H", f"Authorization: Bearer {TOKEN}")


@pytest.fixture
def server(tmp_path: Path):
    app = make_app(tmp_path)
    with ServerThread(app) as srv:
        yield srv


def report(srv: ServerThread, phase: str, *, token: str | None, source: str = "127.0.0.1",
           **extra: object) -> int:
    q = {"mac": mac_dashes(NODE_B), "phase": phase, **extra}
    if token is not None:
        q["token"] = token
    return curl("--interface", source, f"{srv.url}/api/v1/events?{urlencode(q)}")[0]


def node(srv: ServerThread) -> dict:
    return json.loads(curl(f"{srv.url}/api/v1/nodes/{mac_dashes(NODE_B)}")[2])


def install_script(srv: ServerThread) -> tuple[str, str]:
    text = curl(ipxe_url(srv, NODE_B))[2].decode()
    assert "installs gold 1.0 to disk" in text, text
    token = srv.app.planner.current(NODE_B).token
    assert f"netbootd.token={token}" in text
    return text, token


def test_install_then_hand_the_node_to_its_disk(server):
    app = server.app
    _, token = install_script(server)
    # no proof: no token, or the token from another address -> 403, nothing changes
    assert report(server, "installing", token=None, progress=10) == 403
    assert report(server, "installing", token=token, progress=10) == 403  # address unknown
    give_address(app, NODE_B, "127.0.0.1")  # its address (nodes.yaml ip)
    assert report(server, "installing", token=token, source="127.0.0.2", progress=10) == 403
    assert report(server, "installed", token="0" * 24) == 403
    assert node(server).get("lifecycle") is None
    # the installer's own reports
    for pct in (0, 5, 50, 100):
        assert report(server, "installing", token=token, progress=pct) == 200
        assert node(server)["progress"] == pct
    assert node(server)["lifecycle"] == "installing"
    assert report(server, "installed", token=token) == 200
    n = node(server)
    assert (n["lifecycle"], n["installed"], n["action"]) == ("installed", "gold 1.0", "local")
    # it reboots: netbootd is silent (the iPXE script exits to the next boot device)
    text = curl(ipxe_url(server, NODE_B))[2].decode()
    assert "local disk" in text and text.rstrip().endswith("exit")
    # the disk OS asks for its identity by address only
    status, _, body = curl(f"{server.url}/cloud-init/by-address/meta-data")
    assert status == 200 and "node-b" in body.decode()
    status, _, body = curl(f"{server.url}/cloud-init/by-address/user-data")
    assert status == 200 and "kubeadm-secret-for-tests-BBBB" in body.decode()
    assert node(server)["lifecycle"] == "local"
    # a stranger's address is nobody
    status, _, _ = curl("--interface", "127.0.0.3", f"{server.url}/cloud-init/by-address/user-data")
    assert status == 404


def test_a_failed_install_is_never_installed_and_is_retried(server):
    give_address(server.app, NODE_B, "127.0.0.1")
    _, token = install_script(server)
    assert report(server, "installing", token=token, progress=50) == 200
    assert report(server, "failed", token=token, reason="sha256 mismatch") == 200
    n = node(server)
    assert (n["lifecycle"], n["action"]) == ("install-failed", "install")
    assert "sha256 mismatch" in json.dumps(n["timeline"])
    _, second = install_script(server)  # the next boot installs again, with a new token
    assert second != token
    assert report(server, "installed", token=token) == 403, "an old boot's token is void"


def test_power_cut_mid_install_reinstalls(server):
    give_address(server.app, NODE_B, "127.0.0.1")
    _, token = install_script(server)
    assert report(server, "installing", token=token, progress=45) == 200
    server.app.planner.forget(NODE_B)  # the machine lost power: its session is gone
    install_script(server)
    assert node(server)["lifecycle"] == "installing", "never reported installed"


def test_operator_reinstall_over_the_api(server):
    give_address(server.app, NODE_B, "127.0.0.1")
    _, token = install_script(server)
    assert report(server, "installed", token=token) == 200
    url = f"{server.url}/api/v1/nodes/{mac_dashes(NODE_B)}/action"
    body = ("-X", "POST", "-H", "Content-Type: application/json", "--data",
            json.dumps({"action": "reinstall"}))
    assert curl(*body, url)[0] == 401
    status, _, resp = curl(*AUTH, *body, url)
    assert status == 200, resp
    assert node(server)["lifecycle"] == "install"
    install_script(server)
    status, _, _ = curl(*AUTH, "-X", "POST", "-H", "Content-Type: application/json", "--data",
                        json.dumps({"action": "explode"}), url)
    assert status == 400


def test_an_auto_upgrade_shows_as_install_in_the_node_api(server):
    """``install.upgrade: auto``: once the channel names another disk version than the
    node's, the API says ``install`` (what its next boot gets), not ``local``; a rollback
    to the installed version makes it ``local`` again."""
    app = server.app
    inv = app.inventory
    b = inv.nodes[NODE_B]
    nodes = {**inv.nodes, NODE_B: b.model_copy(update={
        "install": b.install.model_copy(update={"upgrade": "auto"})})}
    app.inventory = replace(inv, nodes=nodes)
    give_address(app, NODE_B, "127.0.0.1")
    _, token = install_script(server)
    assert report(server, "installed", token=token) == 200
    assert (node(server)["installed"], node(server)["action"]) == ("gold 1.0", "local")
    write_disk_version(app.settings.paths.images, "gold", "2.0", b"version two" * 100)
    app.planner.images.channels[("gold", "prod")] = "2.0"  # activated
    n = node(server)
    assert (n["lifecycle"], n["installed"], n["action"]) == ("installed", "gold 1.0", "install")
    text = curl(ipxe_url(server, NODE_B))[2].decode()
    assert "installs gold 2.0 to disk" in text, text
    app.planner.forget(NODE_B)  # that boot never happened
    app.planner.images.channels[("gold", "prod")] = "1.0"  # rolled back
    assert node(server)["action"] == "local"
