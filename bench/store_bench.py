#!/usr/bin/env python3
"""Image store benchmark: ingest throughput and activation latency.

- ingest throughput: MB/s of one build (a big file + a rootfs of many small files) from
  drop to promoted, *verification included* (unpack + sha256 of every byte + fsync),
  for each drop format: directory (hard links), tar, tar.gz, tar.zst;
- activation latency: "build complete -> pointer swapped" = promotion + auto-activation
  after verification (target: median < 200 ms), and a CLI/API ``activate`` on its own;
- end to end through the watcher: rename into incoming/ -> version active (small build,
  includes the settle time and verification).

Prints progress to stderr and a markdown table to stdout. Usage:

    .venv/bin/python bench/store_bench.py [--mb 128] [--runs 15] [--dir /var/tmp]
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
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")  # ingest progress lines
    base = Path(tempfile.mkdtemp(prefix="netbootd-store-bench-", dir=a.dir))
    try:
        ingest = bench_ingest(base, a.mb, a.small)
        swaps, activates = bench_activation(base, a.runs)
        watched = asyncio.run(bench_watch(base, max(5, a.runs // 3)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nstore bench: {platform.node()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, scratch {a.dir or tempfile.gettempdir()}\n")
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
    print(f"| rename into incoming/ -> active (watcher, settle 0.2 s, small build), "
          f"n={len(watched)} | median {ms(watched)} |")
    target = statistics.median(swaps) < 0.2
    print(f"\nactivation latency target (< 200 ms median): {'met' if target else 'MISSED'}")
    return 0 if target else 1


if __name__ == "__main__":
    raise SystemExit(main())
