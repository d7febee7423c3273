"""REST API /api/v1 against a running server with the real image store: auth, nodes,
images (activate, rollback, pin, gc, upload), plan, reload, OpenAPI, metrics, readyz."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netbootd.http.testkit import (
    NODE_A,
    NODE_C,
    TOKEN,
    UNKNOWN,
    ServerThread,
    give_address,
    make_app,
    write_version,
)
from netbootd.model import mac_dashes

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(tmp_path: Path):
    app = make_app(tmp_path, real_store=True)
    with ServerThread(app) as srv:
        yield srv


def call(srv: ServerThread, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None, data: bytes | None = None
         ) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.request(
                method, srv.url + path, json=body, data=data, headers=headers or {}) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text
    return asyncio.run(go())


MUTATING = [
    ("POST", "/api/v1/images/demo/activate", {"version": "1.0", "channel": "dev"}),
    ("POST", "/api/v1/images/demo/rollback", {"channel": "prod"}),
    ("POST", f"/api/v1/nodes/{mac_dashes(NODE_A)}/pin", {"version": "1.0"}),
    ("DELETE", f"/api/v1/nodes/{mac_dashes(NODE_A)}/pin", None),
    ("POST", "/api/v1/images/gc", {"dry_run": True}),
    ("PUT", "/api/v1/images/demo/3.0", None),
    ("POST", "/api/v1/reload", None),
]


@pytest.mark.parametrize("method,path,body", MUTATING)
def test_mutating_calls_without_or_with_wrong_token_are_401(server, method, path, body):
    status, resp = call(server, method, path, body)
    assert status == 401 and "error" in resp
    status, _ = call(server, method, path, body, headers={"Authorization": "Bearer nope"})
    assert status == 401
    status, _ = call(server, method, path, body, headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    assert server.app.store.channels("demo") == {"prod": "1.0"}  # nothing changed


def test_mutating_calls_refused_when_no_token_configured(tmp_path):
    app = make_app(tmp_path, real_store=True, http={"api_token_file": None})
    with ServerThread(app) as srv:
        status, resp = call(srv, "POST", "/api/v1/reload", headers=AUTH)
    assert status == 403 and "not configured" in resp["error"]


def test_read_only_calls_open_by_default_and_closed_when_configured(tmp_path):
    app = make_app(tmp_path, real_store=True, http={"read_open": False})
    with ServerThread(app) as srv:
        assert call(srv, "GET", "/api/v1/nodes")[0] == 401
        assert call(srv, "GET", "/api/v1/nodes", headers=AUTH)[0] == 200
        assert call(srv, "GET", "/metrics")[0] == 401
        assert call(srv, "GET", "/")[0] == 401
        assert call(srv, "GET", "/", headers=AUTH)[0] == 200
        # nodes must reach these without a token
        assert call(srv, "GET", "/api/v1/openapi.json")[0] == 200
        assert call(srv, "GET", "/healthz")[0] == 200
        status, _ = call(srv, "POST", "/api/v1/events", {"mac": NODE_A, "phase": "joined"})
        assert status == 200


def test_nodes_list_and_detail_with_timeline(server):
    call(server, "GET", f"/ipxe?mac={mac_dashes(NODE_A)}")
    give_address(server.app, NODE_A, "127.0.0.1")  # its address (nodes.yaml ip)
    token = server.app.planner.current(NODE_A).token
    status, _ = call(server, "POST", "/api/v1/events",
                     {"mac": NODE_A, "phase": "booted", "message": "up", "token": token})
    assert status == 200
    # a machine policy ignores can report nothing (no proof, no row of its own) ...
    status, _ = call(server, "POST", "/api/v1/events", {"mac": UNKNOWN, "phase": "failed",
                                                        "message": "disk on fire"})
    assert status == 403
    # ... but what netbootd saw of it is listed
    server.app.events.record("dhcp", UNKNOWN, "proxy offer sent", outcome="ok")
    status, resp = call(server, "GET", "/api/v1/nodes")
    assert status == 200
    by_mac = {n["mac"]: n for n in resp["nodes"]}
    assert {NODE_A, NODE_C, UNKNOWN} <= set(by_mac)
    a = by_mac[NODE_A]
    assert (a["hostname"], a["phase"], a["version"], a["action"]) == \
        ("node-a", "booted", "1.0", "netboot")
    assert by_mac[NODE_C]["action"] == "local"
    u = by_mac[UNKNOWN]
    assert (u["known"], u["phase"], u["action"], u["message"]) == \
        (False, "dhcp", "ignore", "proxy offer sent")
    status, node = call(server, "GET", f"/api/v1/nodes/{mac_dashes(NODE_A)}")
    assert status == 200
    kinds = [e["kind"] for e in node["timeline"]]
    assert kinds[-2:] == ["http", "booted"]
    assert call(server, "GET", "/api/v1/nodes/02-00-00-00-00-99")[0] == 404
    assert call(server, "GET", "/api/v1/nodes/garbage")[0] == 400


def test_activate_rollback_and_plan(server):
    write_version(server.app.settings.paths.images, "demo", "2.0",
                  {"boot/vmlinuz": b"k2", "boot/initrd.img": b"i2", "disk.img": b"d2"})
    status, resp = call(server, "POST", "/api/v1/images/demo/activate",
                        {"version": "2.0", "channel": "prod"}, headers=AUTH)
    assert status == 200, resp
    status, plan = call(server, "GET", f"/api/v1/plan?mac={NODE_A}")
    assert status == 200
    assert (plan["action"], plan["version"], plan["hostname"]) == ("netboot", "2.0", "node-a")
    assert "/files/demo/2.0/boot/vmlinuz" in plan["ipxe"]
    status, resp = call(server, "POST", "/api/v1/images/demo/rollback", {"channel": "prod"},
                        headers=AUTH)
    assert status == 200 and resp["detail"]["version"] == "1.0"
    assert server.app.store.active("demo", "prod") == "1.0"
    # errors are 4xx JSON, never 500
    for body, code in (({"version": "9.9", "channel": "prod"}, 404),
                       ({"version": "../x", "channel": "prod"}, 400),
                       ({"channel": "prod"}, 400),
                       ({"version": "1.0", "channel": "prod", "extra": 1}, 400)):
        status, resp = call(server, "POST", "/api/v1/images/demo/activate", body, headers=AUTH)
        assert status == code and "error" in resp, (body, resp)
    status, resp = call(server, "POST", "/api/v1/images/nope/rollback", {"channel": "prod"},
                        headers=AUTH)
    assert status == 409, resp  # nothing active there
    status, resp = call(server, "POST", "/api/v1/images/demo/activate", data=b"{not json",
                        headers=AUTH)
    assert status == 400


def test_plan_for_unknown_and_bad_queries(server):
    status, plan = call(server, "GET", f"/api/v1/plan?mac={UNKNOWN}")
    assert status == 200 and plan["action"] == "ignore" and plan["ipxe"] is None
    for q in ("", "?mac=nope", f"?mac={NODE_A}&arch=x", f"?mac={NODE_A}&arch=70000",
              f"?mac={NODE_A}&kind=toaster", f"?mac={NODE_A}&serial=zz"):
        status, resp = call(server, "GET", f"/api/v1/plan{q}")
        assert status == 400 and "error" in resp, q


def test_pin_unpin_and_gc(server):
    write_version(server.app.settings.paths.images, "demo", "0.9",
                  {"boot/vmlinuz": b"k", "boot/initrd.img": b"i", "disk.img": b"d"})
    status, resp = call(server, "POST", f"/api/v1/nodes/{mac_dashes(NODE_A)}/pin",
                        {"version": "0.9"}, headers=AUTH)
    assert status == 200, resp
    status, plan = call(server, "GET", f"/api/v1/plan?mac={NODE_A}")
    assert plan["version"] == "0.9" and plan["pinned"] is True
    status, resp = call(server, "DELETE", f"/api/v1/nodes/{mac_dashes(NODE_A)}/pin",
                        headers=AUTH)
    assert status == 200
    status, resp = call(server, "DELETE", f"/api/v1/nodes/{mac_dashes(NODE_A)}/pin",
                        headers=AUTH)
    assert status == 409  # not pinned
    status, resp = call(server, "POST", "/api/v1/images/gc", {"dry_run": True}, headers=AUTH)
    assert status == 200 and isinstance(resp["detail"]["versions"], list)


def _tarball(name: str, version: str, files: dict[str, bytes], *, corrupt: bool = False
             ) -> bytes:
    arts = [{"path": p, "size": len(d),
             "sha256": ("0" * 64) if corrupt else hashlib.sha256(d).hexdigest()}
            for p, d in files.items()]
    manifest = {"image": name, "version": version, "created": "2026-11-23T13:00:00Z",
                "kind": "kernel+initrd", "boards": ["x86_64"],
                "boot": {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img"},
                "artefacts": arts}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in {"manifest.json": json.dumps(manifest).encode(), **files}.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_upload_streams_into_the_store_and_rejects_bad_builds(server):
    files = {"boot/vmlinuz": b"kernel-3", "boot/initrd.img": b"initrd-3"}
    status, resp = call(server, "PUT", "/api/v1/images/demo/3.0",
                        data=_tarball("demo", "3.0", files), headers=AUTH)
    assert status == 200, resp
    status, images = call(server, "GET", "/api/v1/images")
    versions = [v["version"] for v in images["images"][0]["versions"]]
    assert "3.0" in versions
    status, resp = call(server, "PUT", "/api/v1/images/demo/4.0",
                        data=_tarball("demo", "4.0", files, corrupt=True), headers=AUTH)
    assert status == 400 and "rejected" in resp["error"]
    status, images = call(server, "GET", "/api/v1/images")
    assert images["rejected"] and "reason" in images["rejected"][0]
    status, resp = call(server, "PUT", "/api/v1/images/demo/5.0", data=b"", headers=AUTH)
    assert 400 <= status < 500


def test_reload_reports_ok_and_rejections(server):
    assert call(server, "POST", "/api/v1/reload", headers=AUTH) == (200, {"ok": True,
                                                                         "error": None})
    inv = server.app.settings.paths.inventory
    inv.write_text(inv.read_text() + "\n  not-a-mac:\n    hostname: x\n")
    status, resp = call(server, "POST", "/api/v1/reload", headers=AUTH)
    assert status == 409 and "not-a-mac" in resp["error"]
    assert server.app.config_error


def test_openapi_document_lists_every_route(server):
    status, doc = call(server, "GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for p in ("/api/v1/nodes", "/api/v1/nodes/{mac}", "/api/v1/images/{name}/activate",
              "/api/v1/plan", "/api/v1/events", "/api/v1/reload", "/api/v1/images/gc",
              "/api/v1/images/{name}/{version}", "/api/v1/beacon/{mac}"):
        assert p in paths, p
    assert paths["/api/v1/images/{name}/activate"]["post"]["security"] == [{"bearer": []}]
    assert "ActivateIn" in doc["components"]["schemas"]
    # every $ref resolves
    refs = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "$ref" in x:
                refs.add(x["$ref"].rsplit("/", 1)[-1])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(doc)
    assert refs <= set(doc["components"]["schemas"])


def test_metrics_and_health(server):
    call(server, "GET", "/ipxe?mac=bad")
    call(server, "GET", f"/ipxe?mac={NODE_A}")
    status, text = call(server, "GET", "/metrics")
    assert status == 200
    assert 'netbootd_requests_total{outcome="ok",service="http"}' in text
    assert 'netbootd_malformed_inputs_total{service="http"}' in text
    assert call(server, "GET", "/healthz") == (200, {"ok": True})
    status, ready = call(server, "GET", "/readyz")
    assert status == 200 and ready["services"]["http"]["ok"] is True

    class Broken:  # a service reporting itself unhealthy (health() is the whole contract)
        name = "tftp"

        def health(self) -> dict:
            return {"ok": False, "error": "port 69 in use"}

    server.app.services["tftp"] = Broken()
    try:
        status, ready = call(server, "GET", "/readyz")
    finally:
        del server.app.services["tftp"]
    assert status == 503 and ready["reasons"] == ["tftp: port 69 in use"]


def test_unknown_api_path_and_method_are_json_errors(server):
    status, resp = call(server, "GET", "/api/v1/nothing")
    assert status == 404 and "error" in resp
    status, resp = call(server, "PATCH", "/api/v1/nodes")
    assert status == 405 and "error" in resp


def test_images_and_metrics_report_logical_and_physical_bytes(server):
    status, body = call(server, "GET", "/api/v1/images")
    assert status == 200
    [demo] = [i for i in body["images"] if i["name"] == "demo"]
    assert 0 < demo["physical_bytes"] <= demo["logical_bytes"]
    assert body["store"]["physical_bytes"] <= body["store"]["logical_bytes"]
    assert body["store"]["logical_bytes"] >= demo["logical_bytes"]
    status, text = call(server, "GET", "/metrics")
    assert status == 200
    [got] = [float(line.split()[-1]) for line in text.splitlines()
             if line.startswith('netbootd_store_bytes{kind="physical"}')]
    assert got == body["store"]["physical_bytes"]
    assert 'netbootd_image_bytes{image="demo",kind="logical"}' in text
    status, page = call(server, "GET", "/")
    assert status == 200 and 'id="store-bytes"' in page and "logical" in page
