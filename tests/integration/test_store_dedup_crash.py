"""kill -9 while an ingest shares files with stored versions, and while GC deletes
versions that share files, 20 times each; then start-up recovery: every version is
complete and links its pool objects, and no object is left that no version links."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from netbootd.settings import StoreSettings
from netbootd.store.ingest import validate_build
from netbootd.store.layout import is_ignored_name
from netbootd.store.objects import Meta
from netbootd.store.store import ImageStore

RUNS = 20

#: The child ingests rootfs builds that share most files with the one before (directory
#: and tar.zst drops in turn) and runs GC after each; it says "ingest" / "gc" just before
#: each step, so the parent can kill it inside the step it aims at.
CHILD = r"""
import os, random, sys
from pathlib import Path
from netbootd.settings import StoreSettings
from netbootd.store.build import pack, write_manifest
from netbootd.store.store import ImageStore

images, state, ci, run = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
st = ImageStore(images, state, StoreSettings(keep=2, keep_booted_hours=0))
rnd = random.Random(int(run))
T0 = 1_700_000_000

def build(root, v):
    for i in range(120):
        p = root / f"rootfs/usr/share/p{i % 12}/f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        # a few files change per version, the rest are the same package files
        tag = v if i % 40 == int(run) % 40 else "base"
        p.write_bytes(f"{tag} {i}\n".encode() * (20 + 30 * (i % 7)))
        os.utime(p, (T0, T0))
    (root / "rootfs/etc").mkdir(parents=True, exist_ok=True)
    (root / "rootfs/etc/version").write_text(v)
    write_manifest(root, "demo", v, "rootfs", boot={"rootfs": "rootfs"})

print("ready", flush=True)
for i in range(1000):
    v = f"{run}.{i}"
    src = ci / f"b-{v}"
    build(src, v)
    if i % 2:
        pack(src, ci / f"demo-{v}.tar.zst", compression="zst")
        name = f"demo-{v}.tar.zst"
        os.rename(ci / name, images / "incoming" / name)
    else:
        name = f"demo-{v}"
        os.rename(src, images / "incoming" / name)
    print("ingest", flush=True)
    st.ingest_entry(name)
    print("gc", flush=True)
    st.gc(in_use=set())
"""


def check_consistent(images: Path, state: Path) -> None:
    st = ImageStore(images, state, StoreSettings(keep=2, keep_booted_hours=0))
    st.recover()
    L = st.layout
    assert not list(L.staging.iterdir()), "staging cleaned"
    check_pool(st)
    # a build still in incoming/ ingests now, sharing with what is stored
    for name in [e.name for e in L.incoming.iterdir() if not is_ignored_name(e.name)]:
        r = st.ingest_entry(name)
        assert r is not None and r.accepted, (name, r)
    assert not st.rejected(), st.rejected()
    check_pool(st)


def check_pool(st: ImageStore) -> None:
    """Every version complete and linking its objects; every object linked by a version."""
    L = st.layout
    temps = [p for d in L.objects.iterdir() for p in d.iterdir() if p.name.startswith(".")]
    assert not temps, f"temp objects left: {temps}"
    objects = {p: s for p, s in st.pool.objects()}
    linked: set[Path] = set()
    for v in st.versions("demo"):
        root = L.version_dir("demo", v)
        m = validate_build(root)  # every checksum
        for a in m.artefacts:
            obj = st.pool.path(a.sha256, Meta.of_file(root / a.path))
            assert os.lstat(obj).st_ino == os.lstat(root / a.path).st_ino, (v, a.path)
            linked.add(obj)
    orphans = sorted(str(p) for p in set(objects) - linked)
    assert not orphans, f"objects no version links: {orphans[:5]}"
    assert all(s.st_nlink >= 2 for s in objects.values())
    if (L.store / "demo").is_dir():
        hidden = [d for d in (L.store / "demo").iterdir() if d.name.startswith(".")]
        assert not hidden, hidden


def kill_during(step: str, tmp_path: Path, seed: int) -> None:
    images, state, ci = tmp_path / "images", tmp_path / "state", tmp_path / "ci"
    ci.mkdir()
    ImageStore(images, state, StoreSettings())  # creates the layout
    rnd = random.Random(seed)
    hit = 0
    for run in range(RUNS):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(images), str(state),
                                 str(ci), str(run)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            # the n-th time the child enters the step (the first ones have little to
            # share or to delete), then a random point inside it: not a deadline
            want = 2 if run == 0 else rnd.randint(1, 2)
            seen = 0
            for line in proc.stdout:
                seen += line.strip() == step
                if seen == want:
                    break
            time.sleep(rnd.uniform(0.0, 0.15))
            hit += proc.poll() is None
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(120)  # reaping a SIGKILLed child; generous for a loaded machine
            proc.stdout.close()
        check_consistent(images, state)
    assert hit == RUNS, "the child died on its own"
    st = ImageStore(images, state, StoreSettings())
    assert len(st.versions("demo")) >= 2, "the test never got to sharing"


def test_kill_9_during_a_shared_ingest(tmp_path: Path) -> None:
    kill_during("ingest", tmp_path, 1515)


def test_kill_9_during_gc_of_shared_versions(tmp_path: Path) -> None:
    kill_during("gc", tmp_path, 2727)
