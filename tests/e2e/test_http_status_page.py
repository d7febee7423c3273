"""The status page in a real browser: headless Debian chromium loads / of a daemon with
a few nodes and images, the DOM has their rows, and a screenshot is kept as a CI artefact
(test-output/http-status-page.png)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from netbootd.http.testkit import (
    NODE_A,
    NODE_B,
    NODE_C,
    UNKNOWN,
    ServerThread,
    make_app,
    populate,
)
from netbootd.nodestate import NodeRecord, Stage

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _chromium_installed() -> None:
    if CHROMIUM is None:
        pytest.fail("chromium not installed: apt-get install chromium", pytrace=False)


def chromium(url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="netbootd-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--window-size=1400,900", "--hide-scrollbars", *extra, url],
            capture_output=True, timeout=90, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Rows(HTMLParser):
    """Collects the text of every ``tr[data-mac]`` and ``tr[data-version]`` cell."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, list[str]] = {}
        self.versions: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-mac" in a:
            self._row = self.nodes.setdefault(a["data-mac"], [])
        elif tag == "tr" and "data-version" in a:
            self.versions.append(a["data-version"])
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag in ("script", "img") and self._row is not None:
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_status_page_shows_nodes_images_and_escapes_node_text(tmp_path):
    app = make_app(tmp_path, real_store=True)
    populate(app)
    hostile = '<img src=x onerror="document.title=1">'
    app.events.record("failed", UNKNOWN, hostile, outcome="ok")
    # an install in progress, and a crowd of unknown machines (summarised, not listed)
    app.node_state.put(NodeRecord(mac=NODE_B, stage=Stage.INSTALLING, progress=42,
                                  image="gold", version="1.0", by="node"))
    strangers = [f"02:00:00:00:01:{i:02x}" for i in range(12)]
    for mac in strangers:
        for _ in range(4):  # enough events that the panel has to cut at 50
            app.events.record("dhcp", mac, "unknown machine asked", outcome="ok")
    # machines the daemon ignored: no rows, a count and the latest few
    for i in range(3):
        app.events.record("dhcp", f"02:00:00:00:02:{i:02x}", "ignored", outcome="ignored")
    with ServerThread(app) as srv:
        dump = chromium(srv.url + "/", "--dump-dom")
        assert dump.returncode == 0, dump.stderr.decode()[-2000:]
        out_dir = REPO / "test-output"
        out_dir.mkdir(exist_ok=True)
        shot = out_dir / "http-status-page.png"
        shot.unlink(missing_ok=True)
        res = chromium(srv.url + "/", f"--screenshot={shot}", "--window-size=1400,1800")
        assert res.returncode == 0 and shot.stat().st_size > 10_000
        filtered = chromium(srv.url + f"/?node={NODE_A}", "--dump-dom")
        everyone = chromium(srv.url + "/?unknown=all", "--dump-dom")

    rows = Rows()
    rows.feed(dump.stdout.decode())
    # inventory nodes, then the 5 most recent unknown machines (the rest is a count)
    assert {NODE_A, NODE_B, NODE_C} <= set(rows.nodes)
    assert len([m for m in rows.nodes if m not in (NODE_A, NODE_B, NODE_C)]) == 5
    a = rows.nodes[NODE_A]
    assert a[0].startswith("node-a") and a[1] == NODE_A and a[2] == "10.231.0.10"
    assert a[3] == "joined" and a[5] == "demo 1.1" and "dhcp" in a[7] and "joined" in a[7]
    b = rows.nodes[NODE_B]
    assert b[3] == "failed" and b[4].startswith("installing") and "42%" in b[4]
    assert "gold 1.0" in b[4]
    assert rows.nodes[NODE_C][8] == "local" and "own disk" in rows.nodes[NODE_C][0]
    html = dump.stdout.decode()
    assert "Unknown machines: 13 seen" in html and "show all" in html
    ignored = app.events.ignored()[0] if hasattr(app.events, "ignored") else 0
    if ignored:
        assert f"{ignored} requests from machines not in the fleet ignored" in html
    for mac, row in rows.nodes.items():
        if mac not in (NODE_A, NODE_B, NODE_C):
            assert "unknown machine" in row[0] and "default" not in row[0], row
    assert rows.versions.count("2.0") == 1 and "2026.11.20-1" in rows.versions
    assert "active · prod" in html and "pinned · 1" in html and "rejected" in html
    # honest NFS: pi-os is active with an NFS root and nothing exports it
    assert 'id="nfs-warning"' in html and "nothing exports" in html
    # sizes in SI units, as the CLI prints them
    assert " MB<" in html or " kB<" in html
    assert "MiB" not in html and "KiB" not in html
    # recent events: the last 50 of everyone, or one machine's with ?node=
    assert 'id="events"' in html and html.count('data-kind="') == 50
    fhtml = filtered.stdout.decode()
    kinds = re.findall(r'<tr class="ev-[^"]*" data-kind="([^"]+)"', fhtml)
    assert kinds and set(kinds) <= {"dhcp", "tftp", "http", "kernel", "booted", "joined"}
    assert f"of <span class=\"mono\">{NODE_A}</span>" in fhtml
    all_rows = Rows()
    all_rows.feed(everyone.stdout.decode())
    assert set(strangers) | {UNKNOWN} <= set(all_rows.nodes)
    # node-supplied text is escaped: the hostile message is text, never an element
    assert rows.scripts == 0
    assert "<title>netbootd" in html  # the onerror payload did not run
