"""Shared fixtures: a throw-away config directory built from the shipped one."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# CI runs the property tests derandomized: the same examples every run, so a landing never
# depends on luck. Locally they stay random, which is how they find new bugs.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
hypothesis_settings.register_profile("dev", deadline=None, print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

REPO = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on right now (for tests on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A copy of config/ whose paths point into tmp_path (images, state)."""
    dst = tmp_path / "config"
    shutil.copytree(REPO / "config", dst)
    text = (dst / "netbootd.yaml").read_text()
    text = text.replace("images: ../images", f"images: {tmp_path / 'images'}")
    text = text.replace("state: ../images/state", f"state: {tmp_path / 'state'}")
    (dst / "netbootd.yaml").write_text(text)
    return dst
