"""kill -9 while the store ingests hostile and careless builds (zip bombs, a build too
large to keep in rejected/, hard-linked directory drops rewritten afterwards, uploads
that stop at the free-space reserve, valid uploads), then start-up recovery: no orphaned
staging, no store dot-files left in incoming/, every stored version matches its
manifest, every refusal has its reason, and no complete valid build is lost or refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from netbootd.settings import StoreSettings
from netbootd.store.ingest import validate_build
from netbootd.store.store import ImageStore

RUNS = 20
SETTINGS = {"keep": 2, "keep_booted_hours": 0, "max_unpacked_bytes": 4 << 20,
            "keep_rejected_max_bytes": 256 << 10}

CHILD = r"""
import asyncio, os, random, shutil, sys
from pathlib import Path
from netbootd.errors import TooLarge
from netbootd.settings import StoreSettings
from netbootd.store.build import pack, sample_build
from netbootd.store.store import ImageStore
from tests.integration.test_store_hostile import write_bomb

images, state, ci, run = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
settings = dict(keep=2, keep_booted_hours=0, max_unpacked_bytes=4 << 20,
                keep_rejected_max_bytes=256 << 10)
st = ImageStore(images, state, StoreSettings(**settings))
incoming = images / "incoming"
dropped = open(ci / "dropped.txt", "a")
full = open(ci / "full.txt", "a")
print("ready", flush=True)
rnd = random.Random(int(run))

def chunks(path):
    with open(path, "rb") as fh:
        while True:
            b = fh.read(64 << 10)
            if not b:
                return
            yield b

def zeros():
    for _ in range(64):
        yield bytes(1 << 20)

for i in range(1000):
    v = f"{run}.{i}"
    what = rnd.choice(["bomb", "dir", "upload", "bad", "full"])
    if what == "bomb":
        b = write_bomb(ci / f"bomb-{v}.tar.zst", ci, unpacked=128 << 20, version=v,
                       manifest_first=rnd.random() < 0.5)
        os.rename(b, incoming / b.name)
        st.ingest_entry(b.name)
    elif what == "dir":  # hard-linked drop, source rewritten in place afterwards
        out = ci / f"out-{v}"
        sample_build(out, "demo", v, payload=rnd.choice([4096, 200_000]))
        shutil.copytree(out, incoming / f".demo-{v}.tmp", copy_function=os.link)
        os.rename(incoming / f".demo-{v}.tmp", incoming / f"demo-{v}")
        dropped.write(v + "\n"); dropped.flush()
        st.ingest_entry(f"demo-{v}")
        with open(out / "boot" / "initrd.img", "r+b") as fh:
            fh.write(b"REWRITTEN")
    elif what == "upload":
        out = ci / f"up-{v}"
        sample_build(out, "demo", v, payload=100_000)
        pack(out, ci / f"up-{v}.tar.zst", compression="zst")
        asyncio.run(st.ingest_upload("demo", v, chunks(ci / f"up-{v}.tar.zst")))
    elif what == "bad":  # too large to keep: reason + manifest only
        out = ci / f"bad-{v}"
        sample_build(out, "demo", v, payload=400_000)
        k = out / "boot" / "vmlinuz"
        k.write_bytes(k.read_bytes()[::-1])
        os.rename(out, incoming / f"bad-{v}")
        st.ingest_entry(f"bad-{v}")
    else:  # the reserve sits 2 MiB below the free space now: 64 MiB of zeros stop
        full.write(v + "\n"); full.flush()
        sv = os.statvfs(images)
        tight = ImageStore(images, state, StoreSettings(**settings, min_free_bytes=max(
            1, sv.f_bavail * sv.f_frsize - (2 << 20))))
        try:
            asyncio.run(tight.ingest_upload("demo", v, zeros()))
        except TooLarge:
            pass
"""


def check_consistent(images: Path, state: Path, ci: Path) -> None:
    st = ImageStore(images, state, StoreSettings(**SETTINGS))
    st.recover()
    L = st.layout
    assert not list(L.staging.iterdir()), "staging cleaned"
    assert not [e for e in L.incoming.iterdir() if e.name.startswith(".")], \
        sorted(e.name for e in L.incoming.iterdir())
    assert not [e for e in L.rejected.iterdir() if e.name.startswith(".")]
    for e in L.rejected.glob("*.manifest.json"):
        assert L.reason_file(e.name[: -len(".manifest.json")]).exists(), f"orphan {e.name}"
    for image in st.images():
        for v in st.versions(image):
            validate_build(L.version_dir(image, v))  # every sha256 matches its manifest
    # whatever is still in incoming/ is a complete drop: it ingests (or is refused) now
    for name in [e.name for e in L.incoming.iterdir()]:
        if not name.endswith(".ready"):
            assert st.ingest_entry(name) is not None, name
    assert not [e for e in L.incoming.iterdir()], "incoming/ drained"
    # an upload of zeros refused for its content: free space grew past the 2 MiB margin
    # (other processes on this machine) and it was stored whole
    full = (ci / "full.txt").read_text().split() if (ci / "full.txt").exists() else []
    zeros = tuple(f"demo-{v}.tar" for v in full)
    for r in st.rejected():
        assert r["reason"], r
        src = json.loads(L.reason_file(r["name"]).read_text())["source"]
        assert src.startswith(("bomb-", "bad-")) or src in zeros, \
            f"a valid build was refused: {r}"
    dropped = (ci / "dropped.txt").read_text().split() if (ci / "dropped.txt").exists() else []
    seen = {h.get("version") for h in st.history()} | set(st.versions("demo"))
    assert not [v for v in dropped if v not in seen], "builds lost"


def test_kill_9_while_ingesting_hostile_builds(tmp_path: Path) -> None:
    images, state, ci = tmp_path / "images", tmp_path / "state", tmp_path / "ci"
    ci.mkdir()
    ImageStore(images, state, StoreSettings())
    rnd = random.Random(4321)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    for run in range(RUNS):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(images), str(state),
                                 str(ci), str(run)], stdout=subprocess.PIPE, text=True,
                                env=env)
        try:
            assert proc.stdout.readline().strip() == "ready"
            # a random point: wait for the child to get that far (no fixed deadline)
            try:
                proc.wait(rnd.uniform(0.0, 1.5))
            except subprocess.TimeoutExpired:
                pass
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        check_consistent(images, state, ci)
    st = ImageStore(images, state, StoreSettings(**SETTINGS))
    assert st.versions("demo") and st.rejected(), "the child never got far: proved nothing"
