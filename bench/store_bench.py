#!/usr/bin/env python3
"""Image store benchmark: ingest throughput, sharing between versions, activation latency.

- sharing (the content pool): a Debian minbase rootfs made with debootstrap as version N,
  the same plus one package as N+1 (bench/rootfs_trees.py, cached in images/cache), each
  as a directory drop and as a tar.zst drop: the physical bytes N+1 adds to a store that
  holds N (target <= 10 % of a full copy), and its ingest time against a full ingest of
  the same build into an empty store (target <= 0.5x);
- ingest throughput: MB/s of one build (a big file + a rootfs of many small files) from
  drop to promoted, *verification included* (unpack + sha256 of every byte + fsync),
  for each drop format: directory (hard links), tar, tar.gz, tar.zst;
- activation latency: "build complete -> pointer swapped" = promotion + auto-activation
  after verification (target: median < 200 ms), and a CLI/API ``activate`` on its own;
- end to end through the watcher: rename into incoming/ -> version active (small build,
  includes the settle time and verification).

Prints progress to stderr and a markdown table to stdout. Usage:

    flock /tmp/netbootd-bench.lock .venv/bin/python bench/store_bench.py \
        [--mb 128] [--runs 15] [--dir /var/tmp] [--no-rootfs]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netbootd.settings import StoreSettings
from netbootd.store.build import pack, sample_build, write_manifest
from netbootd.store.store import ImageStore
from netbootd.store.watcher import IncomingWatcher


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def big_build(root: Path, version: str, mb: int, small_files: int) -> int:
    """A rootfs-like build: one big file of ``mb`` MiB + ``small_files`` small ones."""
    (root / "rootfs/usr/lib").mkdir(parents=True)
    # half random, half text: compresses about 2:1 like a real rootfs, so tar.gz/tar.zst
    # pay their real decompression cost
    text = (b"netbootd image store benchmark line %d\n" * 12000)[: 1 << 19]
    with open(root / "rootfs/usr/lib/big.img", "wb") as fh:
        fh.writelines(os.urandom(1 << 19) + text for _ in range(mb))
    for i in range(small_files):
        d = root / f"rootfs/usr/share/f{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"x{i}").write_bytes(os.urandom(2048))
    (root / "rootfs/boot").mkdir()
    (root / "rootfs/boot/vmlinuz").write_bytes(b"K" * 4096)
    write_manifest(root, "bench", version, "rootfs", boot={"rootfs": "rootfs"})
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def bench_ingest(base: Path, mb: int, small: int) -> list[tuple[str, int, float, float]]:
    rows = []
    st = ImageStore(base / "images", base / "state", StoreSettings(auto_activate={"*": "dev"}))
    for fmt in ("dir", "tar", "tar.gz", "tar.zst"):
        version = f"ingest-{fmt.replace('.', '-')}"
        src = base / "ci" / version
        say(f"building {fmt} ({mb} MiB + {small} small files) ...")
        size = big_build(src, version, mb, small)
        if fmt == "dir":
            name = version
            os.rename(src, st.layout.incoming / name)
        else:
            comp = {"tar": "none", "tar.gz": "gz", "tar.zst": "zst"}[fmt]
            out = base / "ci" / f"{version}.{fmt}"
            pack(src, out, compression=comp)
            shutil.rmtree(src)
            name = out.name
            os.rename(out, st.layout.incoming / name)
        os.sync()
        say(f"ingesting {name} ...")
        r = st.ingest_entry(name)
        assert r is not None and r.accepted, r
        rows.append((fmt, size, r.seconds, r.swap_seconds))
        say(f"  {size / r.seconds / 1e6:.1f} MB/s, swap {r.swap_seconds * 1000:.1f} ms")
        shutil.rmtree(st.layout.version_dir("bench", version))
    return rows


def rootfs_drop(tree: Path, dest: Path, version: str) -> int:
    """A CI build of a rootfs: the tree (owners, modes, mtimes, xattrs kept) without its
    device nodes (a netbooted root gets /dev from devtmpfs), and its manifest."""
    import subprocess

    (dest / "rootfs").parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(tree), str(dest / "rootfs")], check=True)
    for p in (dest / "rootfs" / "dev").iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    m = write_manifest(dest, "minbase", version, "rootfs", boot={"rootfs": "rootfs"})
    return sum(a["size"] for a in m["artefacts"])


def bench_sharing(base: Path) -> list[dict]:
    """Version N then N+1 (one package more) into one store; N+1 alone into another."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rootfs_trees import EXTRA, minbase

    trees = {"N": minbase([]), "N+1": minbase([EXTRA])}
    rows = []
    for fmt in ("dir", "tar.zst"):
        work = base / f"share-{fmt.replace('.', '-')}"

        def drop(st: ImageStore, label: str, version: str, work: Path = work,
                 fmt: str = fmt) -> tuple[str, int]:
            src = work / "ci" / version
            logical = rootfs_drop(trees[label], src, version)
            if fmt == "dir":
                name = version
                os.rename(src, st.layout.incoming / name)
            else:
                out = work / "ci" / f"{version}.tar.zst"
                pack(src, out, compression="zst")
                shutil.rmtree(src)
                name = out.name
                os.rename(out, st.layout.incoming / name)
            os.sync()
            return name, logical

        def ingest(st: ImageStore, name: str, fmt: str = fmt) -> Any:
            say(f"ingesting {name} ({fmt}) ...")
            r = st.ingest_entry(name)
            assert r is not None and r.accepted, r
            say(f"  {r.seconds:.2f} s, {r.shared_files} files shared, "
                f"{r.written_bytes / 1e6:.1f} MB written, swap {r.swap_seconds * 1000:.0f} ms")
            return r

        settings = StoreSettings(auto_activate={"*": "dev"})
        full = ImageStore(work / "full" / "images", work / "full" / "state", settings)
        name, logical = drop(full, "N+1", "2")
        r_full = ingest(full, name)
        st = ImageStore(work / "images", work / "state", settings)
        name, logical_n = drop(st, "N", "1")
        r_n = ingest(st, name)
        before = st.bytes_used()
        name, logical = drop(st, "N+1", "2")
        r_next = ingest(st, name)
        after = st.bytes_used()
        files = len(st.manifest("minbase", "2").artefacts)
        rows.append({"fmt": fmt, "files": files, "logical": logical, "logical_n": logical_n,
                     "new_physical": after["physical_bytes"] - before["physical_bytes"],
                     "full_seconds": r_full.seconds, "first_seconds": r_n.seconds,
                     "next_seconds": r_next.seconds, "shared": r_next.shared_files,
                     "written": r_next.written_bytes,
                     "swap_full": r_full.swap_seconds, "swap_next": r_next.swap_seconds,
                     "store": after})
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_activation(base: Path, runs: int) -> tuple[list[float], list[float]]:
    st = ImageStore(base / "images2", base / "state2", StoreSettings(auto_activate={"*": "dev"}))
    swaps, activates = [], []
    for i in range(runs):
        src = base / "ci2" / f"v{i}"
        sample_build(src, "demo", f"v{i}", "pi-boot+rootfs", payload=256 * 1024)
        os.rename(src, st.layout.incoming / f"v{i}")
        r = st.ingest_entry(f"v{i}")
        assert r is not None and r.accepted and r.activated == "dev"
        swaps.append(r.swap_seconds)
        t0 = time.perf_counter()
        st.activate("demo", f"v{i}", "prod", by="bench")
        activates.append(time.perf_counter() - t0)
        say(f"  activation {i + 1}/{runs}: swap {r.swap_seconds * 1000:.1f} ms, "
            f"activate {activates[-1] * 1000:.1f} ms")
    return swaps, activates


async def bench_watch(base: Path, runs: int) -> list[float]:
    st = ImageStore(base / "images3", base / "state3",
                    StoreSettings(auto_activate={"*": "dev"}, settle_seconds=0.2))
    w = IncomingWatcher(st, settle=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    await w.ready.wait()
    out = []
    try:
        for i in range(runs):
            src = base / "ci3" / f"w{i}"
            sample_build(src, "demo", f"w{i}", payload=256 * 1024)
            t0 = time.perf_counter()
            os.rename(src, st.layout.incoming / f"w{i}")
            while st.active("demo", "dev") != f"w{i}":
                await asyncio.sleep(0.005)
            out.append(time.perf_counter() - t0)
            say(f"  watched drop {i + 1}/{runs}: {out[-1] * 1000:.0f} ms")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    return out


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return f"{statistics.median(xs) * 1000:.1f} ms (p90 {p90 * 1000:.1f}, max {xs[-1] * 1000:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=128, help="size of the big file (MiB)")
    ap.add_argument("--small", type=int, default=2000, help="number of small files")
    ap.add_argument("--runs", type=int, default=15, help="activation samples")
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--no-rootfs", action="store_true",
                    help="skip the sharing benchmark (Debian minbase trees, debootstrap)")
    ap.add_argument("--rootfs-only", action="store_true",
                    help="only the sharing benchmark and activation latency")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")  # ingest progress lines
    base = Path(tempfile.mkdtemp(prefix="netbootd-store-bench-", dir=a.dir))
    try:
        sharing = [] if a.no_rootfs else bench_sharing(base)
        ingest = [] if a.rootfs_only else bench_ingest(base, a.mb, a.small)
        swaps, activates = bench_activation(base, a.runs)
        watched = [] if a.rootfs_only else asyncio.run(bench_watch(base, max(5, a.runs // 3)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nstore bench: {platform.node()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average {load}, "
          f"scratch {a.dir or tempfile.gettempdir()}\n")
    ok = True
    if sharing:
        print("| drop | files | N+1 logical | new physical for N+1 | ingest N+1 full / "
              "N full / N+1 after N | swap full / after N |")
        print("|---|---|---|---|---|---|")
        for r in sharing:
            share = r["new_physical"] / r["logical"]
            # against the faster of the two full ingests: the first of a run may be cold
            speed = r["next_seconds"] / min(r["full_seconds"], r["first_seconds"])
            ok &= share <= 0.10 and speed <= 0.5
            print(f"| {r['fmt']} | {r['files']} | {r['logical'] / 1e6:.1f} MB | "
                  f"{r['new_physical'] / 1e6:.2f} MB ({100 * share:.2f} %; "
                  f"{r['shared']} files linked, {r['written'] / 1e6:.2f} MB written) | "
                  f"{r['full_seconds']:.2f} s / {r['first_seconds']:.2f} s / "
                  f"{r['next_seconds']:.2f} s ({speed:.2f}x) | "
                  f"{r['swap_full'] * 1000:.0f} ms / {r['swap_next'] * 1000:.0f} ms |")
        for r in sharing:
            print(f"\n{r['fmt']}: store after N and N+1: "
                  f"{r['store']['logical_bytes'] / 1e6:.1f} MB logical, "
                  f"{r['store']['physical_bytes'] / 1e6:.1f} MB physical")
        print(f"\nsharing targets (new physical <= 10 %, ingest <= 0.5x): "
              f"{'met' if ok else 'MISSED'}\n")
    print("| measurement | result |")
    print("|---|---|")
    for fmt, size, secs, swap in ingest:
        print(f"| ingest {fmt}, {size / 1e6:.0f} MB, {a.small} small files "
              f"(verification included) | {size / secs / 1e6:.1f} MB/s ({secs:.2f} s; "
              f"swap {swap * 1000:.0f} ms) |")
    print(f"| build complete -> pointer swapped (promote + auto-activate), n={len(swaps)} "
          f"| median {ms(swaps)} |")
    print(f"| `activate` (pointer rewrite + history, fsync), n={len(activates)} "
          f"| median {ms(activates)} |")
    if watched:
        print(f"| rename into incoming/ -> active (watcher, settle 0.2 s, small build), "
              f"n={len(watched)} | median {ms(watched)} |")
    target = statistics.median(swaps) < 0.2
    print(f"\nactivation latency target (< 200 ms median): {'met' if target else 'MISSED'}")
    return 0 if target and ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
