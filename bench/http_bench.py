#!/usr/bin/env python3
"""HTTP benchmark: netbootd vs nginx, same files, same machine, same run.

    .venv/bin/python bench/http_bench.py [--big-mib 256] [--rounds 3] [--seconds 8]

What it measures:

* **large-file throughput** (MiB/s): one ``--big-mib`` artefact downloaded with curl to
  /dev/null, 1 client and 4 parallel clients, ``--rounds`` rounds alternating the
  servers (median kept). netbootd serves it from ``/files/<image>/<version>/<path>``
  (manifest lookup, FileResponse/sendfile); nginx from the same directory
  (``sendfile on``, one worker, access log off).
* **per-MAC iPXE script** (requests/s): wrk, 64 connections, on
  ``/ipxe?mac=<a known node>`` — the planner's cached plan, the rendered script and one
  event per request, as in a real boot storm. For scale, nginx serving a static file of
  the same size is measured too.

Servers are pinned to CPU 0 and the load generators (curl, wrk) to CPU 1 with taskset
when the machine has two or more CPUs. netbootd runs in its own process (this script
with ``--serve``); nginx with a config in a temporary directory, on loopback ports.
Every process is stopped and the directory removed on exit. Progress goes to stderr,
the markdown table to stdout. Needs: curl, nginx (nginx-light), wrk.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nginxsite import start_nginx  # bench/ is on sys.path: the script's directory

MAC = "52-54-00-00-00-0a"


def progress(msg: str) -> None:
    print(f"[http-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu: int) -> list[str]:
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpu)]


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


# ------------------------------------------------------------------------ the daemon side
def serve(root: Path, port: int, big_mib: int) -> None:
    """Child process: the HTTP service of a test fleet plus one big artefact."""
    import asyncio

    from netbootd.http.app import create as create_http
    from netbootd.http.testkit import make_app, write_version

    app = make_app(root, http={"port": port}, kernel_size=4096)
    images = app.settings.paths.images
    write_version(images, "bench", "1", {"big.bin": b""})
    big = images / "store/bench/1/big.bin"
    with open(big, "wb") as fh:
        fh.writelines(os.urandom(1 << 20) for _ in range(big_mib))
    manifest = images / "store/bench/1/manifest.json"
    manifest.write_text(manifest.read_text().replace('"size": 0', f'"size": {big_mib << 20}'))

    async def main() -> None:
        svc = create_http(app)
        await svc.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("READY", flush=True)
        await stop.wait()
        await svc.stop()

    asyncio.run(main())


# ------------------------------------------------------------------------ measurements
def curl_mib_s(url: str, parallel: int, repeat: int) -> float:
    """Aggregate MiB/s of ``parallel`` clients each downloading ``repeat`` times in a row
    (one curl per client, the URL repeated: keep-alive, ~1 GiB per sample, so a sample
    lasts long enough to rise above scheduling noise)."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([*pin(1), "curl", "-s", "-w", "%{size_download}\\n",
                               *(a for _ in range(repeat) for a in ("-o", "/dev/null", url))],
                              stdout=subprocess.PIPE) for _ in range(parallel)]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"curl {url} failed ({p.returncode})")
        total += sum(int(float(x)) for x in out.decode().split())
    return total / (1 << 20) / (time.monotonic() - t0)


def wrk_rps(url: str, seconds: int, connections: int = 64) -> float:
    out = subprocess.run([*pin(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses from {url}")
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=8,
                    help="downloads per client per sample (1 client) / 4 clients: half")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.big_mib)
        return 0
    for tool in ("curl", "wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            progress(f"{tool} not found (apt-get install {tool if tool != 'nginx' else 'nginx-light'})")
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="netbootd-http-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        nb_port, nx_port = free_port(), free_port()
        progress(f"starting netbootd on :{nb_port} (writing a {args.big_mib} MiB artefact)")
        nb = subprocess.Popen([*pin(0), sys.executable, __file__, "--serve", str(tmp / "d"),
                               "--port", str(nb_port), "--big-mib", str(args.big_mib)],
                              stdout=subprocess.PIPE, text=True)
        procs.append(nb)
        line = nb.stdout.readline() if nb.stdout else ""
        if "READY" not in line:
            raise RuntimeError("netbootd did not start")
        store = tmp / "d/images/store"
        nb_base = f"http://127.0.0.1:{nb_port}"
        script = subprocess.run(["curl", "-s", f"{nb_base}/ipxe?mac={MAC}"], capture_output=True,
                                check=True).stdout
        (tmp / "static").mkdir()
        (tmp / "static/script.ipxe").write_bytes(script)
        progress(f"starting nginx on :{nx_port}")
        nx = start_nginx(tmp, nx_port, f"location /files/ {{ alias {store}/; }}\n"
                         f"    location /static/ {{ alias {tmp}/static/; }}",
                         connections=1024, http_extra="keepalive_requests 1000000;",
                         prefix=pin(0))
        procs.append(nx)
        wait_port(nx_port)
        nx_base = f"http://127.0.0.1:{nx_port}"
        big_path = "/files/bench/1/big.bin"
        for base in (nb_base, nx_base):  # warm the page cache, check both serve it
            curl_mib_s(base + big_path, 1, 1)

        results: dict[tuple[str, str], list[float]] = {}
        for r in range(1, args.rounds + 1):
            for parallel in (1, 4):
                for name, base in (("netbootd", nb_base), ("nginx", nx_base)):
                    v = curl_mib_s(base + big_path, parallel,
                                   args.repeat if parallel == 1 else max(1, args.repeat // 2))
                    results.setdefault((f"{args.big_mib} MiB file, {parallel} client(s), MiB/s",
                                        name), []).append(v)
                    progress(f"round {r}: {name:8s} {parallel} client(s): {v:8.0f} MiB/s")
        rps = {}
        for name, url in (("netbootd", f"{nb_base}/ipxe?mac={MAC}"),
                          ("nginx", f"{nx_base}/static/script.ipxe")):
            progress(f"wrk {args.seconds}s on {url}")
            rps[name] = wrk_rps(url, args.seconds)
            progress(f"  {name}: {rps[name]:.0f} req/s")
        boot_rps = wrk_rps(f"{nb_base}/boot.ipxe", args.seconds)
        progress(f"  netbootd /boot.ipxe: {boot_rps:.0f} req/s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"\nhttp_bench — {time.strftime('%Y-%m-%d %H:%M %Z')}, {cpu}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{'server CPU 0 / load CPU 1' if pin(0) else 'no pinning'}\n")
    print("| measurement | netbootd | nginx | netbootd / nginx |")
    print("|---|---:|---:|---:|")
    for what in dict.fromkeys(k[0] for k in results):
        a = statistics.median(results[(what, "netbootd")])
        b = statistics.median(results[(what, "nginx")])
        print(f"| {what} (median of {args.rounds}) | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    print(f"| per-MAC /ipxe script, req/s (wrk, 64 conns; nginx: same bytes, static) "
          f"| {rps['netbootd']:.0f} | {rps['nginx']:.0f} | {rps['netbootd'] / rps['nginx']:.2f}x |")
    print(f"| /boot.ipxe, req/s (wrk, 64 conns) | {boot_rps:.0f} | — | — |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
