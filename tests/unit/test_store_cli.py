"""``netbootd images ...`` against a store on disk (what an operator types)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netbootd.cli import main
from netbootd.settings import StoreSettings
from netbootd.store.build import sample_build
from netbootd.store.store import ImageStore

MAC = "d8:3a:dd:12:34:56"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "nodes.yaml").write_text(
        f"nodes:\n  {MAC}: {{hostname: pi-01, image: demo, channel: prod}}\n")
    c = tmp_path / "netbootd.yaml"
    c.write_text("paths:\n  images: images\n  state: state\n  inventory: nodes.yaml\n"
                 "store:\n  keep: 1\n  keep_booted_hours: 0\n")
    st = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings())
    for v in ("1", "2", "3"):
        sample_build(st.layout.incoming / v, "demo", v, created=f"2026-11-2{v}T00:00:00Z")
        assert st.ingest_entry(v).accepted
    return c


def cli(cfg: Path, *args: str) -> int:
    return main(["-c", str(cfg), "images", *args])


def test_activate_rollback_pin_gc(cfg, capsys) -> None:
    assert cli(cfg, "activate", "demo", "2", "--channel", "prod", "--why", "test") == 0
    assert cli(cfg, "activate", "demo", "3", "--channel", "prod") == 0
    assert cli(cfg, "rollback", "demo", "--channel", "prod") == 0
    assert "rolled back to 2" in capsys.readouterr().out
    assert cli(cfg, "pin", "pi-01", "1") == 0, "hostname -> MAC, image from the inventory"
    assert f"{MAC} pinned to demo 1" in capsys.readouterr().out
    assert cli(cfg, "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    [img] = data["images"]
    assert img["channels"] == {"dev": "3", "prod": "2"}
    assert data["pins"][MAC]["version"] == "1"
    assert 0 < img["physical_bytes"] <= img["logical_bytes"]
    assert data["store"] == {"logical_bytes": img["logical_bytes"],
                             "physical_bytes": img["physical_bytes"]}
    assert cli(cfg, "gc", "--dry-run") == 0
    assert "nothing to delete" in capsys.readouterr().out  # 1 pinned, 2 prod, 3 dev/newest
    assert cli(cfg, "unpin", MAC.upper()) == 0
    assert cli(cfg, "gc") == 0
    assert "deleted demo 1" in capsys.readouterr().out
    assert cli(cfg, "list") == 0
    out = capsys.readouterr().out
    assert "active:prod" in out and "demo  (dev=3, prod=2)" in out
    assert "MB on disk" in out and "\nstore: " in out


def test_user_mistakes_exit_2_with_a_message(cfg, capsys) -> None:
    assert cli(cfg, "activate", "demo", "9", "--channel", "prod") == 2
    assert "unknown version '9'" in capsys.readouterr().out
    assert cli(cfg, "pin", "no-such-host", "1") == 2
    assert "neither a MAC" in capsys.readouterr().out
    assert cli(cfg, "rollback", "demo", "--channel", "prod") == 2


def test_plan_twice_around_a_gc_leaves_the_gc_result_unchanged(cfg, capsys) -> None:
    """Asking what a machine would get is no use of a version: GC is not swayed by it."""
    assert cli(cfg, "activate", "demo", "3", "--channel", "prod") == 0
    templates = Path(__file__).resolve().parents[2] / "config" / "templates"
    cfg.write_text(cfg.read_text().replace("paths:\n", f"paths:\n  templates: {templates}\n"))
    store = ImageStore(cfg.parent / "images", cfg.parent / "state", StoreSettings(
        keep=1, keep_booted_hours=24))
    before = store.gc_plan()
    for _ in range(2):
        assert main(["-c", str(cfg), "plan", MAC, "--kind", "ipxe"]) == 0
        assert "demo 3 active" in capsys.readouterr().out
    after = ImageStore(cfg.parent / "images", cfg.parent / "state", StoreSettings(
        keep=1, keep_booted_hours=24)).gc_plan()
    assert before == after and ("demo", "3") not in after
    assert not (cfg.parent / "state" / "lifecycle").exists(), "plan writes nothing"
