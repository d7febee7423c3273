"""The status page in a real browser: headless Debian chromium loads / of a daemon with
a few nodes and images, the DOM has their rows, and a screenshot is kept as a CI artefact
(test-output/http-status-page.png)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("netbootd.store.store")

from netbootd.http.testkit import (
    NODE_A,
    NODE_B,
    NODE_C,
    UNKNOWN,
    ServerThread,
    make_app,
    populate,
)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")]


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
    with ServerThread(app) as srv:
        dump = chromium(srv.url + "/", "--dump-dom")
        assert dump.returncode == 0, dump.stderr.decode()[-2000:]
        out_dir = REPO / "test-output"
        out_dir.mkdir(exist_ok=True)
        shot = out_dir / "http-status-page.png"
        shot.unlink(missing_ok=True)
        res = chromium(srv.url + "/", f"--screenshot={shot}")
        assert res.returncode == 0 and shot.stat().st_size > 10_000

    rows = Rows()
    rows.feed(dump.stdout.decode())
    assert set(rows.nodes) == {NODE_A, NODE_B, NODE_C, UNKNOWN}
    a = rows.nodes[NODE_A]
    assert a[0].startswith("node-a") and a[1] == NODE_A and a[2] == "10.231.0.10"
    assert a[3] == "joined" and a[4] == "demo 1.1" and "dhcp" in a[6] and "joined" in a[6]
    assert rows.nodes[NODE_B][3] == "failed"
    assert rows.nodes[NODE_C][7] == "local"
    assert "not in inventory" in rows.nodes[UNKNOWN][0] and rows.nodes[UNKNOWN][7] == "ignore"
    assert rows.versions.count("2.0") == 1 and "2026.11.20-1" in rows.versions
    html = dump.stdout.decode()
    assert "active · prod" in html and "pinned · 1" in html and "rejected" in html
    # node-supplied text is escaped: the hostile message is text, never an element
    assert rows.scripts == 0
    assert "<title>netbootd" in html  # the onerror payload did not run
