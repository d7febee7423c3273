"""`netbootd lab` as a newcomer runs it: ends with a booted guest and a clean teardown; the
status page forward reaches into the lab from the host's loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from netbootd.lab.forward import Forwarder
from netbootd.lab.netns import namespaces
from netbootd.lab.tools import GUEST_TOOLS, LAB_TOOLS, NFS_TOOLS, REPO, lab_problem, require

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_netbootd_lab_boots_a_guest_and_cleans_up(lab_out: Path) -> None:
    require(LAB_TOOLS + GUEST_TOOLS)
    proc = subprocess.run(
        [sys.executable, "-m", "netbootd", "lab", "--once", "--ui-port", str(_free_port()),
         "--out", str(lab_out), "--timeout", "90"],
        capture_output=True, text=True, timeout=240, cwd=REPO, check=False)
    (lab_out / "demo.stdout.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    phase = "provisioned" if lab_problem(NFS_TOOLS) is None else "booted"
    assert f"guest booted: phase {phase}" in proc.stdout
    assert "status page: http://127.0.0.1:" in proc.stdout
    name = re.search(r"lab (nbd-[0-9a-f]{6}):", proc.stdout).group(1)
    assert not [ns for ns in namespaces() if ns.startswith(name + "-")]


def test_forwarder_reaches_a_server_inside_the_lab(netlab, lab_out: Path) -> None:
    events = lab_out / "events.jsonl"
    netlab.popen("srv", [sys.executable, "-m", "netbootd.lab.sink", "--port", "8080", "--out",
                         str(events)], log_file=lab_out / "sink.log", cwd=str(REPO))
    port = _free_port()
    fwd = Forwarder(netlab.ns("srv"), (netlab.ip("srv"), 8080), port).start()
    try:
        body = json.dumps({"mac": "52:54:00:00:00:01", "phase": "booted"}).encode()
        deadline = time.monotonic() + 10
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/events",
                                             data=body, method="POST")
                with urllib.request.urlopen(req, timeout=5) as resp:
                    assert resp.status == 202
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the sink is still starting
    finally:
        fwd.stop()
    got = [json.loads(line) for line in events.read_text().splitlines()]
    assert got[-1]["phase"] == "booted" and got[-1]["_peer"] == netlab.ip("srv")
