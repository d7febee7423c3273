#!/usr/bin/env python3
"""Installer throughput: the installer's streaming pipeline vs ``curl -o /dev/null``, same
URL, same server, same run.

    python3 bench/install_bench.py [--mib 1024] [--rounds 3] [--rate-mbit 1000]
                                   [--baseline-lib OLD-install-lib.sh]

A ~``--mib`` MiB disk image (deterministic: 40 % incompressible data, the rest text-like
and zero runs, roughly what a Debian root file system compresses like) is compressed with
``zstd -T0`` and served by nginx on 127.0.0.1 (Range requests, sendfile). Then, alternating,
``--rounds`` times each:

* ``curl -o /dev/null`` of the compressed file: the wire's speed;
* the installer: ``busybox sh`` sourcing images/installer/install-lib.sh and calling
  ``nbd_write_image`` (Range requests of 1/20 of the file, each written by curl straight
  into one zstd, tee to a file and to sha256, verification) — the same functions the
  installer's /init runs;
* with ``--baseline-lib``, the same for another install-lib.sh (e.g. ``git show
  main:images/installer/install-lib.sh``), in the same rounds: before/after side by side.

The CPU column is user + system time of the whole pipeline (every process it waited for).

Twice: unthrottled (loopback; CPU-bound on both sides), and with nginx's ``limit_rate``
at ``--rate-mbit`` (a node's real link; the question the target asks: does the installer
keep up with the wire?). The ratio is curl's time / the installer's time (>= 0.9 = target).
The throttled row is the fair comparison: a node's link, not loopback, bounds curl there,
while unthrottled curl only moves bytes through memory and the installer must also
decompress, hash and write twice as many.
Holds ``flock /tmp/netbootd-bench.lock`` while measuring. Needs nginx, curl, busybox, zstd,
openssl. Progress on stderr, the markdown table on stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nginxsite import start_nginx, stop_nginx  # bench/ is on sys.path: the script's directory

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "images" / "installer" / "install-lib.sh"
LOCK = "/tmp/netbootd-bench.lock"

def progress(msg: str) -> None:
    print(f"[install-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def make_image(path: Path, mib: int) -> None:
    """Deterministic content: per MiB, 40 % random, 40 % text-like, 20 % zeros."""
    rng = random.Random(20261205)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_/.") for _ in range(rng.randint(3, 12)))
             for _ in range(4096)]
    with path.open("wb") as f:
        for _ in range(mib):
            rand = rng.randbytes(400 * 1024)
            text = b" ".join(rng.choice(words) for _ in range(60000))[:400 * 1024]
            text += b"\n" * (400 * 1024 - len(text))
            f.write(rand + text + bytes(224 * 1024))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of cmd and every descendant it waited for)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="uncompressed image size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate-mbit", type=int, default=1000, help="link rate for the throttled run")
    ap.add_argument("--baseline-lib", type=Path, default=None,
                    help="another install-lib.sh to measure in the same rounds (before/after)")
    args = ap.parse_args()
    libs = [("installer", LIB)]
    if args.baseline_lib is not None:
        libs.append(("baseline", args.baseline_lib.resolve()))
    for tool in ("nginx", "curl", "busybox", "zstd", "openssl"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            progress(f"{tool} not found")
            return 2
    lockf = open(LOCK, "w")  # noqa: SIM115 (held until the finally below)
    progress(f"waiting for {LOCK}")
    fcntl.flock(lockf, fcntl.LOCK_EX)
    tmp = Path(tempfile.mkdtemp(prefix="install-bench-", dir="/var/tmp"))
    nginx = None
    shm = None
    try:
        (tmp / "www").mkdir()
        raw = tmp / "disk.img"
        progress(f"writing a {args.mib} MiB image")
        make_image(raw, args.mib)
        usize = raw.stat().st_size
        sha = subprocess.run(["openssl", "dgst", "-sha256", "-r", str(raw)], check=True,
                             capture_output=True, text=True).stdout.split()[0]
        zst = tmp / "www" / "disk.img.zst"
        subprocess.run(["zstd", "-q", "-T0", "-3", "-o", str(zst), str(raw)], check=True)
        raw.unlink()
        size = zst.stat().st_size
        progress(f"image {usize >> 20} MiB -> {size / 1e6:.0f} MB zst")
        port = free_port()
        rate = args.rate_mbit * 1000 * 1000 // 8
        nginx = start_nginx(tmp, port, f"location /full/ {{ alias {tmp}/www/; }}\n"
                            f"    location /link/ {{ alias {tmp}/www/; limit_rate {rate}; }}")
        wait_port(port)
        out = tmp / "written.img"
        # chunks live in RAM in the installer (its initrd is a tmpfs): here too
        shm = Path(tempfile.mkdtemp(prefix="install-bench-", dir="/dev/shm"))
        env = {**os.environ, "NBD_TMP": str(shm)}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for loc in ("full", "link"):
            url = f"http://127.0.0.1:{port}/{loc}/disk.img.zst"
            for r in range(args.rounds):
                line = []
                t_curl = timed(["curl", "-sf", "-o", "/dev/null", url])
                results.setdefault((loc, "curl"), []).append(t_curl)
                line.append(f"curl {t_curl[0]:.2f}s")
                for name, lib in libs:
                    script = (f". {lib}; nbd_write_image {url} {size} {usize} {sha} zst {out} "
                              "2>/dev/null")
                    t_inst = timed(["busybox", "sh", "-c", script], env=env)
                    if out.stat().st_size != usize:
                        raise RuntimeError(f"{name} wrote the wrong number of bytes")
                    out.unlink()
                    t_null = timed(["busybox", "sh", "-c",
                                    script.replace(str(out), "/dev/null")], env=env)
                    results.setdefault((loc, name), []).append(t_inst)
                    results.setdefault((loc, f"{name}-null"), []).append(t_null)
                    line.append(f"{name} {t_inst[0]:.2f}s ({t_inst[1]:.2f}s CPU; "
                                f"to /dev/null {t_null[0]:.2f}s)")
                progress(f"{loc} round {r + 1} (load {os.getloadavg()[0]:.1f}): "
                         + ", ".join(line))
        print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, "
              f"{platform.platform()}; image {usize >> 20} MiB, {size / 1e6:.0f} MB zst; "
              f"median of {args.rounds}\n")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
        print("| server | pipeline | curl -o /dev/null | installer pipeline, to a file | "
              "CPU | ratio | to /dev/null | ratio |")
        print("|---|---|---|---|---|---|---|---|")

        def med(key: tuple[str, str], i: int) -> float:
            return statistics.median(x[i] for x in results[key])

        for loc, label in (("full", "nginx, unthrottled (loopback)"),
                           ("link", f"nginx, limit_rate {args.rate_mbit} Mbit/s")):
            c = med((loc, "curl"), 0)
            for name, lib in libs:
                i, cpu = med((loc, name), 0), med((loc, name), 1)
                n = med((loc, f"{name}-null"), 0)
                print(f"| {label} | {lib.name if name == 'baseline' else 'this tree'} | "
                      f"{c:.2f} s ({size / c / 1e6:.0f} MB/s) | {i:.2f} s "
                      f"({size / i / 1e6:.0f} MB/s zst, {usize / i / 1e6:.0f} MB/s written) "
                      f"| {cpu:.2f} s | {c / i:.2f}x | {n:.2f} s | {c / n:.2f}x |")
    finally:
        if nginx is not None:
            stop_nginx(nginx)
        shutil.rmtree(tmp, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
        fcntl.flock(lockf, fcntl.LOCK_UN)
        lockf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
