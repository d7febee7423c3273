"""Raspberry Pi 5 storm: HTTP boot (signed boot.img) against TFTP, same server, same run.

One server process (the real store, planner, HTTP and TFTP services, as the daemon builds
them, on 127.0.0.1) with N inventory Pis on HTTP boot; a synthetic ~33 MB Pi 5 boot tree
(images/build_image.py --pi) is dropped into incoming/ and activated. Measured:

* the time from activation until the first boot.img of the new version is ready, and
  until all N are (built ahead of time, before any Pi asks);
* a storm of N emulated Pi 5s over HTTP (netbootd.rpi.httpclient: pieeprom.sig, boot.sig,
  boot.img, signature check, cmdline.txt read out of the FAT image), then a storm of N
  over TFTP (netbootd.tftp.piclient: the Pi 5 file order with probe-and-abort): time until
  all booted, the slowest Pi, the server's CPU seconds (process and its TFTP workers)
  and the client processes' CPU seconds (what real Pis would spend on their own CPUs);
* the 1-minute load average after each storm: on a shared machine the wall times follow
  how much CPU the storm gets, so compare the ratios of one run.

Usage: python bench/rpi_http_bench.py [--pis 20 100] [--pin] [--clients N]
Run under `flock /tmp/netbootd-bench.lock`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def serial(i: int) -> str:
    return f"6a{i:06x}"


def mac(i: int) -> str:
    return f"d8:3a:dd:10:{i >> 8:02x}:{i & 255:02x}"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- server
def serve(work: Path, pis: int, http_port: int, tftp_port: int) -> None:
    import logging

    from images.build_image import build
    from netbootd.cli import main as cli_main
    from netbootd.daemon import build_app
    from netbootd.http.app import create as create_http
    from netbootd.inventory import load_inventory
    from netbootd.settings import load_settings
    from netbootd.store.service import StoreService
    from netbootd.tftp.server import create as create_tftp

    logging.basicConfig(level=logging.WARNING)
    with open(os.devnull, "w") as devnull:
        old, sys.stdout = sys.stdout, devnull
        cli_main(["keys", "generate", "--out", str(work / "keys")])
        sys.stdout = old
    nodes = "nodes:\n" + "".join(
        f"  {mac(i)}: {{hostname: pi{i}, serial: {serial(i)}, image: pi, channel: dev, "
        f"vars: {{http_boot: true}}}}\n" for i in range(pis))
    (work / "nodes.yaml").write_text(nodes)
    settings = load_settings(None, {
        "paths": {"images": str(work / "images"), "state": str(work / "state"),
                  "inventory": str(work / "nodes.yaml"),
                  "templates": str(REPO / "config" / "templates")},
        "store": {"settle_seconds": 0.1},
        "http": {"port": http_port, "bind": "127.0.0.1"},
        "tftp": {"port": tftp_port, "bind": "127.0.0.1", "max_transfers": 5000,
                 "max_per_client": 5000},
        "rpi": {"http_boot": {"enabled": True,
                              "key_file": str(work / "keys" / "http-boot.key")}},
    }, use_default_path=False)
    app = build_app(settings, inventory=load_inventory(work / "nodes.yaml"))

    async def main() -> None:
        store_svc = StoreService(app)
        await store_svc.start()
        http, tftp = create_http(app), create_tftp(app)
        await http.start()
        await tftp.start()
        images = http.ctx.boot_images
        staging = work / "build"
        final = build(name="pi", version="1", marker="bench", pi=True, cache=work / "cache",
                      out=staging, incoming=None, rootfs=False)
        os.rename(final, app.store.layout.incoming / "pi-1")
        while app.store.active("pi", "dev") != "1":
            await asyncio.sleep(0.01)
        t_active = time.time()
        while images.built < pis:
            await asyncio.sleep(0.05)
        t_all = time.time()
        first = images.last_ready[("pi", "1")]
        size = sum(p.stat().st_size for p in (app.store.layout.store / "pi" / "1" / "boot")
                   .rglob("*") if p.is_file())
        print(json.dumps({"first_ready_s": first - t_active, "all_ready_s": t_all - t_active,
                          "built": images.built, "boot_tree_bytes": size,
                          "pid": os.getpid()}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.readline(), print(json.dumps(
            {"built": images.built, "refused": images.refused}), flush=True)))
        await stop.wait()
        await tftp.stop()
        await http.stop()
        await store_svc.stop()
        app.events.close()

    asyncio.run(main())


# ----------------------------------------------------------------------------- clients
def storm(kind: str, first: int, count: int, http_port: int, tftp_port: int, pem: Path
          ) -> None:
    from netbootd.rpi.httpclient import Board, load_public_key, pi5_http_boot
    from netbootd.tftp.piclient import pi5_boot

    key = load_public_key(pem.read_bytes())

    async def one(i: int) -> tuple[float, str]:
        t0 = time.monotonic()
        try:
            if kind == "http":
                log = await pi5_http_boot(f"http://127.0.0.1:{http_port}/netboot/{serial(i)}",
                                          Board(key), reads=("cmdline.txt",), timeout=600)
                if f"netbootd.mac={mac(i)}" not in log.files["cmdline.txt"].decode():
                    return time.monotonic() - t0, "not its own cmdline.txt"
            else:
                tlog = await pi5_boot(("127.0.0.1", tftp_port), serial(i), file_timeout=300)
                if not tlog.files.get("kernel_2712.img"):
                    return time.monotonic() - t0, "no kernel"
        except Exception as exc:  # noqa: BLE001 - reported
            return time.monotonic() - t0, f"{type(exc).__name__}: {exc}"
        return time.monotonic() - t0, ""

    async def main() -> None:
        t0 = time.monotonic()
        res = await asyncio.gather(*(one(first + k) for k in range(count)))
        print(json.dumps({"wall": time.monotonic() - t0, "slowest": max(r[0] for r in res),
                          "errors": [r[1] for r in res if r[1]][:3],
                          "n_errors": sum(1 for r in res if r[1])}), flush=True)

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its child processes (the TFTP workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def client_cpu(before: resource.struct_rusage) -> float:
    """user + system seconds of the client processes waited for since ``before``."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def pin(cpu: int, on: bool) -> list[str]:
    return ["taskset", "-c", str(cpu)] if on and shutil.which("taskset") else []


def run(pis: int, args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="nbd-rpi-http-bench-"))
    http_port, tftp_port = free_port(), free_port(socket.SOCK_DGRAM)
    server = subprocess.Popen([*pin(0, args.pin), sys.executable, __file__, "--serve",
                               "--work", str(work), "--pis", str(pis), "--http-port",
                               str(http_port), "--tftp-port", str(tftp_port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        ready = json.loads(server.stdout.readline())
        out: dict = {"pis": pis, **ready}
        for kind in ("http", "tftp"):
            # one client process per 25 emulated Pis (at least 2): with 50 Pis in one
            # process an HTTP Pi cost twice the CPU it costs with 25 (measured 112 / 56 ms)
            clients = args.clients or max(2, -(-pis // 25))
            per = [pis // clients + (1 if k < pis % clients else 0) for k in range(clients)]
            cpu0 = cpu_seconds(server.pid)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            procs = [subprocess.Popen(
                [*pin(1, args.pin), sys.executable, __file__, "--storm", kind, "--first",
                 str(sum(per[:k])), "--count", str(c), "--http-port", str(http_port),
                 "--tftp-port", str(tftp_port), "--pem",
                 str(work / "keys" / "http-boot.pub.pem")],
                stdout=subprocess.PIPE, text=True) for k, c in enumerate(per)]
            res = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1])
                   for p in procs]
            out[kind] = {"wall": max(r["wall"] for r in res),
                         "slowest": max(r["slowest"] for r in res),
                         "cpu": cpu_seconds(server.pid) - cpu0,
                         "client_cpu": client_cpu(ru0),
                         "load": os.getloadavg()[0],
                         "n_errors": sum(r["n_errors"] for r in res),
                         "errors": [e for r in res for e in r["errors"]][:3]}
            print(f"# {pis} {kind}: {out[kind]}", file=sys.stderr, flush=True)
        server.stdin.write("stats\n")
        server.stdin.flush()
        after = json.loads(server.stdout.readline())
        out["built_during_storms"] = after["built"] - ready["built"]
        return out
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


def table(results: list[dict]) -> str:
    when = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}: "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    lines = [when, "",
             ("| Pis | boot tree | first boot.img ready after activation | all ready | "
              "HTTP: all booted | HTTP slowest Pi | HTTP server CPU | HTTP clients' CPU | "
              "TFTP: all booted | TFTP slowest Pi | TFTP server CPU | TFTP clients' CPU | "
              "TFTP / HTTP time | TFTP / HTTP CPU (server + clients) | errors | load (1 min) "
              "after HTTP / TFTP |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        h, t = r["http"], r["tftp"]
        lines.append(
            f"| {r['pis']} | {r['boot_tree_bytes'] / 1e6:.1f} MB | {r['first_ready_s']:.2f} s "
            f"| {r['all_ready_s']:.1f} s | {h['wall']:.2f} s | {h['slowest']:.2f} s | "
            f"{h['cpu']:.1f} s | {h['client_cpu']:.1f} s | {t['wall']:.1f} s | "
            f"{t['slowest']:.1f} s | {t['cpu']:.1f} s | {t['client_cpu']:.1f} s | "
            f"{t['wall'] / h['wall']:.1f}x | "
            f"{(t['cpu'] + t['client_cpu']) / (h['cpu'] + h['client_cpu']):.1f}x | "
            f"{h['n_errors']} / {t['n_errors']} | {h['load']:.1f} / {t['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pis", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, clients on CPU 1")
    ap.add_argument("--clients", type=int, default=0,
                    help="client processes per storm, the same for HTTP and TFTP "
                    "(default: one per 25 Pis, at least 2)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--storm", choices=["http", "tftp"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--http-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tftp-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--pem", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.work, args.pis[0], args.http_port, args.tftp_port)
        return
    if args.storm:
        storm(args.storm, args.first, args.count, args.http_port, args.tftp_port, args.pem)
        return
    results = [run(n, args) for n in args.pis]
    print(table(results))
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
