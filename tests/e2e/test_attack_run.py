"""The attack run (bench/attack/run.py) works end to end, shortened: every attack is
defended and every stop after one is clean. How fast the stops are and how much memory the
flood costs are figures for docs/security.md, measured by the full run, not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from netbootd.lab.tools import require

REPO = Path(__file__).resolve().parents[2]


def test_short_attack_run_is_defended_and_stops_clean(tmp_path: Path):
    # tftp-hpa is the honest client; it fetches Debian's ipxe.efi during the slot hog
    require(["ip", "tftp", "curl", "/usr/lib/ipxe/ipxe.efi"])
    out = tmp_path / "run.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "attack" / "run.py"),
                        "--flood-seconds", "5", "--rate", "1000", "--hog-seconds", "10",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    res, meta = data["results"], data["meta"]
    assert meta["namespaces_left"] == []
    for name, r in res.items():
        stop = r["stop"]
        assert stop["exit"] == 0, (name, stop)
        assert stop["workers_left"] == [] and stop["error_lines"] == [], (name, stop)

    flood = res["flood"]
    assert flood["generator"]["sent"] > 0 and flood["rss_peak_mb"] > 0
    assert all(code == 200 for code in flood["healthz"]), flood["healthz"]

    hog = res["hog"]
    assert hog["generator"]["rrqs"] >= 2048
    assert hog["fetches"] > 0 and hog["fetches_ok"] == hog["fetches"], hog

    bomb = res["bomb"]
    assert "bomb-1.tar.zst" in bomb["rejected"] and bomb["reason"], bomb
    assert not bomb["still_in_incoming"]

    secrets = res["secrets"]
    assert secrets["user_data_after"] == 403 and not secrets["secret_in_body"], secrets
    assert secrets["meta_data"] == 200  # the node is known: only its secrets are refused
    assert "| attack |" in p.stdout
