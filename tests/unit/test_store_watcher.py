"""When is a dropped build complete? The watcher's rules on the event shapes measured
with watchfiles (rename = one top-level ``added``; in-place writes = ``modified`` or deep
events; a marker makes a build due at once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from watchfiles import Change

from netbootd.settings import StoreSettings
from netbootd.store.store import ImageStore
from netbootd.store.watcher import IncomingWatcher


@pytest.fixture
def w(tmp_path: Path) -> IncomingWatcher:
    st = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings())
    return IncomingWatcher(st, settle=1.0)


def touch(w: IncomingWatcher, name: str, d: bool = False) -> Path:
    p = w.store.layout.incoming / name
    if d:
        p.mkdir()
    else:
        p.write_bytes(b"x")
    return p


def test_rename_drop_is_due_after_settle(w) -> None:
    p = touch(w, "demo-1", d=True)
    assert w.note(Change.added, p, now=10.0) is False
    assert w.due(10.5) == []
    assert w.due(11.0) == ["demo-1"]


def test_written_in_place_waits_for_the_marker(w) -> None:
    p = touch(w, "demo-2.tar")
    w.note(Change.added, p, 10.0)
    w.note(Change.modified, p, 10.2)
    assert w.due(100.0) == [], "quiet is not complete when it was written in place"
    d = touch(w, "demo-3", d=True)
    w.note(Change.added, d, 10.0)
    w.note(Change.added, d / "boot", 10.1)
    assert "demo-3" in w.in_place
    marker = touch(w, "demo-3.ready")
    w.note(Change.added, marker, 11.0)
    assert w.due(11.0) == ["demo-3"], "the marker makes it due at once"


def test_ignored_names_and_deletions(w) -> None:
    for n in (".x.tmp", "b.partial", "c.tmp", ".hidden"):
        w.note(Change.added, touch(w, n), 1.0)
    assert w.pending == {}
    p = touch(w, "gone")
    w.note(Change.added, p, 1.0)
    w.note(Change.deleted, p, 1.1)
    assert w.pending == {}


def test_stale_entries_are_dropped(w) -> None:
    p = touch(w, "demo-4.tar")
    w.note(Change.modified, p, 1.0)  # e.g. a late event after the build was consumed
    p.unlink()
    assert w.due(50.0) == [] and w.pending == {} and w.in_place == set()


def test_pointer_and_pin_changes_are_external(w) -> None:
    L = w.store.layout
    assert w.note(Change.added, L.channels / "demo" / "prod", 1.0) is True
    assert w.note(Change.added, L.channels / "demo" / ".prod.abc.tmp", 1.0) is False
    assert w.note(Change.modified, L.pins_file, 1.0) is True
    assert w.note(Change.modified, L.history_file, 1.0) is False


def test_startup_scan(w) -> None:
    touch(w, "a", d=True)
    touch(w, "b.tar.gz")
    touch(w, ".c.tmp")
    w.scan(now=5.0)
    assert w.due(5.0) == [], "no event history: nothing says it is complete yet"
    assert sorted(w.due(6.0)) == ["a", "b.tar.gz"], "unchanged over the settle window"


def test_a_change_restarts_the_quiet_window(w) -> None:
    """A rename-looking drop whose content changes (a writer inotify did not report: a
    file made in a new directory before its watch existed) is not due until it stays
    unchanged for a whole settle window."""
    d = touch(w, "demo-5", d=True)
    w.note(Change.added, d, 10.0)
    (d / "manifest.json").write_bytes(b"{}")  # no event for it
    assert w.due(11.0) == [], "changed since it was seen: the window starts again"
    assert w.due(11.5) == []
    assert w.due(12.0) == ["demo-5"]


def test_a_scanned_file_still_growing_is_not_due(w) -> None:
    p = touch(w, "demo-6.tar")
    w.scan(now=1.0)
    with open(p, "ab") as fh:
        fh.write(b"more")
    assert w.due(2.0) == [] and w.due(2.5) == []
    assert w.due(3.0) == ["demo-6.tar"]
