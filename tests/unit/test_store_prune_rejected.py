"""Rejected builds are kept for inspection, but only the newest few: a CI pushing a
broken build every minute must not fill the disk."""

import json

from netbootd.settings import StoreSettings
from netbootd.store.store import ImageStore


def test_only_the_newest_rejected_builds_are_kept(tmp_path):
    store = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings())
    rej = store.layout.rejected
    rej.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        (rej / f"bad-{i}").mkdir()
        (rej / f"bad-{i}" / "kernel").write_bytes(b"x" * 1000)
        (rej / f"bad-{i}.reason").write_text(json.dumps(
            {"reason": "bad checksum", "when": f"2026-11-23T10:0{i}:00Z"}))
    assert store.prune_rejected(2, dry_run=True) == ["bad-2", "bad-1", "bad-0"]
    assert len(store.rejected()) == 5, "a dry run deletes nothing"
    assert store.prune_rejected(2) == ["bad-2", "bad-1", "bad-0"]
    assert [r["name"] for r in store.rejected()] == ["bad-4", "bad-3"]
    assert sorted(p.name for p in rej.iterdir()) == ["bad-3", "bad-3.reason", "bad-4",
                                                      "bad-4.reason"]
    assert store.prune_rejected(2) == []
