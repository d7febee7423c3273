"""test-output/ stays bounded: the oldest lab artefacts go first."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.conftest import prune_output


def test_prune_keeps_the_newest_within_budget(tmp_path: Path) -> None:
    for i, name in enumerate(("old", "mid", "new")):
        d = tmp_path / name
        d.mkdir()
        (d / "serial.log").write_bytes(b"x" * 1000)
        os.utime(d, (1000 + i, 1000 + i))
    (tmp_path / "shot.png").write_bytes(b"p" * 10)
    removed = prune_output(tmp_path, budget=2100)
    assert [p.name for p in removed] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new", "shot.png"]
    assert prune_output(tmp_path, budget=10**9) == []
