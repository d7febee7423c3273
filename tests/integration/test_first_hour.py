"""The first hour of a new user, as commands: the shipped config, the embedded demo
images, flags where people type them, and a plan that says what is real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from netbootd.cli import build_parser
from netbootd.lab.tools import REPO

PI_MAC, PI_SERIAL = "d8:3a:dd:12:34:56", "a1b2c3d4"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO)


def test_global_flags_before_or_after_the_subcommand() -> None:
    p = build_parser()
    for argv in (["--config", "a.yaml", "serve"], ["serve", "--config", "a.yaml"],
                 ["serve", "-c", "a.yaml"], ["images", "list", "--config", "a.yaml"]):
        assert p.parse_args(argv).config == "a.yaml", argv
    assert p.parse_args(["serve"]).config is None
    assert p.parse_args(["plan", "aa:bb:cc:dd:ee:ff", "--log-level", "DEBUG"]).log_level == \
        "DEBUG"
    # after the subcommand wins over before it
    assert p.parse_args(["--config", "a", "check", "--config", "b"]).config == "b"


def test_shipped_config_serves_what_is_dropped() -> None:
    """A fresh user's drop must be what machines boot: auto-activation on the channel
    machines use when they name none."""
    cfg = yaml.safe_load((REPO / "config/netbootd.yaml").read_text())
    default_channel = cfg["boot"]["default_channel"]
    assert cfg["store"]["auto_activate"]["*"] == default_channel
    nodes = yaml.safe_load((REPO / "config/nodes.yaml").read_text())
    assert nodes["profiles"]["pi5-workers"]["image"] == "pi-demo"


def test_demo_images_both_kinds_and_plan_says_demo(config_dir: Path, tmp_path: Path) -> None:
    config = str(config_dir / "netbootd.yaml")
    for extra, name in (([], "demo"), (["--pi", "--pi-scale", "0.01"], "pi-demo")):
        out = tmp_path / name
        r = run("images/build_image.py", "--name", name, "--version", "1", "--out", str(out),
                *extra, timeout=600)
        assert r.returncode == 0, r.stderr
        built = Path(r.stdout.strip().splitlines()[-1])
        r = run("-m", "netbootd", "images", "ingest", str(built), "--config", config)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"accepted: {name} 1" in r.stdout and "active on prod" in r.stdout

    r = run("-m", "netbootd", "plan", PI_MAC, "--serial", PI_SERIAL, "--config", config)
    assert r.returncode == 0, r.stderr
    assert "pi-demo" in r.stdout and "DEMO" in r.stdout, r.stdout
    assert "192.0.2.1, a placeholder" in r.stdout
    r = run("-m", "netbootd", "plan", "52:54:00:a0:00:01", "--arch", "7", "--config", config,
            "--server", "10.231.0.1")
    assert r.returncode == 0, r.stderr
    assert "image:     demo" in r.stdout and "DEMO" in r.stdout
    assert "placeholder" not in r.stdout and "http://10.231.0.1:8080/" in r.stdout
    r = run("-m", "netbootd", "plan", PI_MAC, "--serial", PI_SERIAL, "--json", "--config",
            config)
    assert '"server_placeholder": true' in r.stdout and '"demo": "netbootd DEMO' in r.stdout
