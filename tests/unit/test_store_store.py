"""Channels, activation history, rollback, pins, resolve, GC and start-up recovery."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from netbootd.errors import Conflict, Invalid, NetbootdError, NotFound
from netbootd.settings import StoreSettings
from netbootd.store.build import sample_build
from netbootd.store.store import ImageStore, StoreError

MAC = "d8:3a:dd:00:00:01"


def make_store(tmp_path: Path, **kw) -> ImageStore:
    s = ImageStore(tmp_path / "images", tmp_path / "state",
                   StoreSettings(**{"auto_activate": {}, **kw}))
    s.recover()
    return s


def add(store: ImageStore, version: str, image: str = "demo", kind: str = "kernel+initrd",
        created: str | None = None) -> None:
    name = f"{image}-{version}"
    sample_build(store.layout.incoming / name, image, version, kind,
                 created=created or f"2026-11-{10 + int(version.split('.')[0]):02d}T00:00:00Z")
    r = store.ingest_entry(name)
    assert r is not None and r.accepted, r


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = make_store(tmp_path)
    for v in ("1", "2", "3"):
        add(s, v)
    return s


def test_activate_rollback_history(store) -> None:
    changes = []
    store.on_change.append(lambda: changes.append(1))
    store.activate("demo", "1", "prod", by="cli", why="first")
    store.activate("demo", "2", "prod", by="api", why="new kernel")
    assert store.active("demo", "prod") == "2"
    h = store.history("demo")[-1]
    assert (h["version"], h["previous"], h["by"], h["why"], h["channel"]) == \
        ("2", "1", "api", "new kernel", "prod")
    assert store.rollback("demo", "prod") == "1"
    assert store.active("demo", "prod") == "1"
    assert store.history()[-1]["why"] == "rollback from 2"
    assert store.rollback("demo", "prod") == "2", "a second rollback undoes the first"
    assert len(changes) == 4
    assert store.resolve("demo", "prod", None).version == "2"


def test_user_mistakes_raise_typed_errors(store) -> None:
    with pytest.raises(NotFound, match="unknown version '9'"):
        store.activate("demo", "9", "prod")
    with pytest.raises(NotFound, match="unknown image 'nope'"):
        store.activate("nope", "1", "prod")
    with pytest.raises(Invalid, match="channel"):
        store.activate("demo", "1", "../x")
    with pytest.raises(Invalid, match="version"):
        store.activate("demo", "../1", "prod")
    with pytest.raises(Conflict, match="no version"):
        store.rollback("demo", "staging")
    store.activate("demo", "1", "prod")
    with pytest.raises(Conflict, match="nothing to roll back"):
        store.rollback("demo", "prod")
    with pytest.raises(Invalid, match="not a MAC"):
        store.pin("zz", "1")
    with pytest.raises(Conflict, match="not pinned"):
        store.unpin(MAC)
    with pytest.raises(Invalid):
        store.unpin("zz")
    store.activate("demo", "2", "prod")
    store.activate("demo", "3", "prod")
    (store.layout.version_dir("demo", "2") / "manifest.json").unlink()
    store.catalogue.forget("demo", "2")
    with pytest.raises(NotFound, match="no longer in the store"):
        store.rollback("demo", "prod")
    # every typed error is a StoreError (old callers) and a ValueError (older ones)
    assert StoreError is NetbootdError
    for cls in (NotFound, Conflict, Invalid):
        assert issubclass(cls, StoreError) and issubclass(cls, ValueError)


def test_pointer_is_one_file_replaced_atomically(store) -> None:
    store.activate("demo", "1", "prod")
    p = store.layout.pointer("demo", "prod")
    ino = p.stat().st_ino
    store.activate("demo", "2", "prod")
    assert p.read_text() == "2\n" and p.stat().st_ino != ino
    assert [e.name for e in p.parent.iterdir()] == ["prod"], "no temp files left"


def test_out_of_process_change_is_seen(store, tmp_path) -> None:
    store.activate("demo", "1", "prod")
    assert store.resolve("demo", "prod", None).version == "1"
    other = ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings())  # the CLI
    other.activate("demo", "3", "prod")
    other.pin(MAC, "2")
    assert store.resolve("demo", "prod", None).version == "3"
    ref = store.resolve("demo", "prod", None, mac=MAC.upper())
    assert ref.version == "2" and ref.pinned


def test_resolve_order_inventory_pin_then_store_pin_then_channel(store) -> None:
    store.activate("demo", "3", "prod")
    store.pin(MAC, "2", "demo")
    assert store.resolve("demo", "prod", "1", mac=MAC).version == "1"
    assert store.resolve("demo", "prod", None, mac=MAC).version == "2"
    assert store.resolve("demo", "prod", None, mac="aa:aa:aa:aa:aa:aa").version == "3"
    assert store.resolve("demo", "prod", "9") is None, "a missing pinned version is not guessed"
    assert store.resolve("demo", "nochannel", None) is None
    assert store.resolve("other", "prod", None, mac=MAC) is None, "pin is for image demo"
    store.unpin(MAC)
    assert store.resolve("demo", "prod", None, mac=MAC).version == "3"
    assert store.pins() == {}


def test_pin_infers_image_or_asks(store) -> None:
    add(store, "2", image="other")
    with pytest.raises(Invalid, match="name the image"):
        store.pin(MAC, "2")
    with pytest.raises(NotFound, match="no image has"):
        store.pin(MAC, "77")
    store.pin(MAC, "3")
    assert store.pins()[MAC]["image"] == "demo"


def test_list_images_and_rejected(store) -> None:
    store.activate("demo", "2", "prod")
    store.pin(MAC, "1", "demo")
    (store.layout.incoming / "broken").mkdir()
    store.ingest_entry("broken")
    [img] = store.list_images()
    json.dumps(img)
    assert img["name"] == "demo" and img["channels"] == {"prod": "2"}
    by_v = {v["version"]: v for v in img["versions"]}
    assert list(by_v) == ["1", "2", "3"]
    assert by_v["2"]["active_on"] == ["prod"] and by_v["1"]["pinned_by"] == [MAC]
    assert by_v["1"]["kind"] == "kernel+initrd" and by_v["1"]["size"] > 0
    assert img["history"][-1]["version"] == "2"
    [rej] = store.rejected()
    assert rej["name"] == "broken" and "manifest" in rej["reason"] and rej["when"]


def test_gc_keeps_newest_active_pinned_in_use_and_booted(tmp_path) -> None:
    st = make_store(tmp_path, keep=2, keep_booted_hours=1)
    for v in range(1, 9):
        add(st, str(v))
    st.activate("demo", "1", "prod")
    st.pin(MAC, "2", "demo")
    st.mark_used("demo", "4")
    st.flush_booted()
    plan = st.gc(dry_run=True, in_use={("demo", "3")})
    assert plan == [("demo", "5"), ("demo", "6")]
    assert st.layout.version_dir("demo", "5").exists(), "dry run deletes nothing"
    changes = []
    st.on_change.append(lambda: changes.append(sorted(st.versions("demo"))))
    assert st.gc(in_use={("demo", "3")}) == plan
    assert st.versions("demo") == ["1", "2", "3", "4", "7", "8"]
    assert changes[0] == st.versions("demo"), "exports re-applied before files are deleted"
    assert not list(st.layout.staging.iterdir())
    # an old "booted" mark does not keep a version forever
    data = json.loads(st.layout.booted_file.read_text())
    data["demo/4"] = time.time() - 7200
    st.layout.booted_file.write_text(json.dumps(data))
    st2 = make_store(tmp_path, keep=2, keep_booted_hours=1)
    assert st2.gc(dry_run=True) == [("demo", "3"), ("demo", "4")]


def test_recovery_after_crash(store, tmp_path) -> None:
    L = store.layout
    store.activate("demo", "2", "prod")
    # a crash mid-ingest: staging left behind; mid-consume: a .done- leftover;
    # mid-pointer-write: a temp file; pointer swapped but history not written
    (L.staging / "ingest-abc" / "build").mkdir(parents=True)
    (L.incoming / ".done-demo-9-1-2").mkdir()
    (L.channels / "demo" / ".prod.xyz.tmp").write_text("3")
    (L.pointer("demo", "prod")).write_text("3\n")
    (L.pointer("demo", "broken")).write_text("42\n")
    st = ImageStore(L.images, L.state, StoreSettings())
    done = st.recover()
    assert done, done
    assert not list(L.staging.iterdir())
    assert not (L.incoming / ".done-demo-9-1-2").exists()
    assert sorted(e.name for e in (L.channels / "demo").iterdir()) == ["prod"]
    h = [x for x in st.history("demo") if x["channel"] == "prod"][-1]
    assert (h["version"], h["previous"], h["by"]) == ("3", "2", "recovery")
    assert st.rollback("demo", "prod") == "2"


def test_torn_history_line_is_skipped(store) -> None:
    store.activate("demo", "1", "prod")
    with open(store.layout.history_file, "a") as fh:
        fh.write('{"when": "2026-')
    assert store.history()[-1]["version"] == "1"
    store.activate("demo", "2", "prod")  # appending after a torn line still works
    assert store.history()[-1]["version"] == "2"


def test_all_refs_for_exports(store) -> None:
    add(store, "1", image="pi", kind="pi-boot+rootfs")
    refs = {(r.name, r.version): r for r in store.all_refs()}
    assert set(refs) == {("demo", "1"), ("demo", "2"), ("demo", "3"), ("pi", "1")}
    assert refs[("pi", "1")].boot["rootfs"] == "rootfs"
    assert os.path.isdir(refs[("pi", "1")].root / "rootfs")


def test_history_pruning_keeps_what_rollback_recovery_and_auto_activate_read(tmp_path) -> None:
    st = make_store(tmp_path, keep=2, keep_booted_hours=0)
    for v in range(1, 7):
        add(st, str(v))
    for _ in range(3):  # toggle between versions: 3 x 6 activations on prod
        for v in range(1, 7):
            st.activate("demo", str(v), "prod")
    st.activate("demo", "6", "dev")
    st.activate("demo", "6", "prod")  # no-op: already active, no entry
    assert len(st.history()) == 19
    st.gc()  # deletes versions 1-4 (not newest, not active)
    assert st.versions("demo") == ["5", "6"]
    assert st.prune_history(2, dry_run=True) == 12
    assert len(st.history()) == 19, "a dry run changes nothing"
    assert st.prune_history(2) == 12
    left = [(h["channel"], h["version"]) for h in st.history()]
    # prod: entries of versions still stored (5, 6), whatever their age; dev: its one entry
    assert left == [("prod", "5"), ("prod", "6"), ("prod", "5"), ("prod", "6"),
                    ("prod", "5"), ("prod", "6"), ("dev", "6")]
    assert st.rollback("demo", "prod") == "5"
    assert st.recover() == [], "the last entry per channel still matches its pointer"
    assert st.prune_history(2) == 0
    with open(st.layout.history_file, "a") as fh:  # a crash tore the last line
        fh.write('{"when": "2026-')
    assert st.prune_history(2) == 1, "the torn line is dropped by the rewrite"
    assert len(st.history()) == 8 and st.active("demo", "prod") == "5"  # 7 + the rollback


def test_history_append_waiting_on_a_prune_lands_in_the_live_file(store) -> None:
    import threading

    from netbootd.store.layout import append_line, locked_file

    store.activate("demo", "1", "prod")
    path = store.layout.history_file
    line = json.dumps({"image": "demo", "version": "2", "channel": "dev"})
    with locked_file(path):  # a prune (any process) holds the lock ...
        writer = threading.Thread(target=append_line, args=(path, line))
        writer.start()  # ... an activation now waits for it ...
        time.sleep(0.2)
        replaced = path.with_name("history.new")
        replaced.write_text(path.read_text())
        os.replace(replaced, path)  # ... and the prune replaces the file
    writer.join(5)
    assert [h["version"] for h in store.history()] == ["1", "2"], \
        "the waiting append must reopen the new file, not write into the replaced one"


def test_resolve_records_nothing_so_gc_keeps_the_same(tmp_path) -> None:
    """Asking what a machine would get (CLI plan, API, peek) must not keep a version."""
    st = make_store(tmp_path, keep=1, keep_booted_hours=1)
    for v in ("1", "2", "3", "4"):
        add(st, v)
    st.activate("demo", "1", "prod")
    st.pin(MAC, "2", "demo")
    st.unpin(MAC)

    def ask() -> None:
        assert st.resolve("demo", "prod", "3").version == "3"  # inventory pin
        assert st.resolve("demo", "prod", None, mac=MAC).version == "1"
        assert st.resolve("demo", "prod", None).version == "1"

    ask()
    plan = st.gc_plan()
    assert plan == [("demo", "2"), ("demo", "3")]
    ask()
    assert not st.booted_dirty and not st.layout.booted_file.exists()
    assert st.gc() == plan, "resolve between plan and gc changed nothing"
    assert st.versions("demo") == ["1", "4"]


def test_mark_used_keeps_a_version_through_the_window(tmp_path) -> None:
    st = make_store(tmp_path, keep=1, keep_booted_hours=1)
    for v in ("1", "2", "3"):
        add(st, v)
    st.mark_used("demo", "1")  # a boot session on 1 started
    assert st.booted_dirty
    assert st.gc_plan() == [("demo", "2")]
    st.flush_booted()
    other = ImageStore(tmp_path / "images", tmp_path / "state",
                       StoreSettings(keep=1, keep_booted_hours=1))  # the CLI, later
    assert other.gc_plan() == [("demo", "2")]


def test_ref_carries_the_manifest_boards(store) -> None:
    add(store, "1", image="pi", kind="pi-boot+rootfs")
    assert store.ref("pi", "1").boards == ("rpi5",)
    assert store.ref("demo", "1").boards == ("x86_64",)
    store.activate("demo", "1", "prod")
    assert store.resolve("demo", "prod", None).boards == ("x86_64",)


def test_only_layout_builds_store_paths() -> None:
    """The directory layout is defined in one place: no other store module joins paths
    onto the layout's directories itself."""
    import re

    import netbootd.store as pkg

    pattern = re.compile(r"layout\.(images|state|incoming|staging|store|channels|rejected|"
                         r"state_dir)\s*/")
    for f in Path(pkg.__file__).parent.glob("*.py"):
        if f.name != "layout.py":
            assert not pattern.search(f.read_text()), f"{f.name} builds a store path"
