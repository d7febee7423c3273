#!/usr/bin/env python3
"""TFTP benchmark: netbootd vs in.tftpd (tftpd-hpa) vs dnsmasq, same files, same run.

    .venv/bin/python bench/tftp_bench.py [--quick] [--pis 100] [--rounds 3]

Workloads (all servers run at once; each timing round visits every server in turn):

* **lock-step**: one 32 MiB file, curl ``--tftp-blksize 1468`` (one block per round trip,
  what a Pi does), ``--rounds`` rounds, median kept.
* **windowsize 16**: the same file with atftp ``--option "windowsize 16"`` (RFC 7440).
  Servers without windowsize answer without it and atftp falls back to lock-step.
* **20 x 8 MiB concurrent**: 20 curl processes at once, 20 different files; wall time.
* **Pi storm**: N emulated Raspberry Pi 5s (netbootd.tftp.piclient: RRQ tsize+blksize 1468
  from a new port per request, probe-and-abort, Pi 5 load order, serial prefix), each
  loading a ~33 MB file set, all started together; the slowest single file is reported
  (the Pi's TFTP_FILE_TIMEOUT is 30 s).

dnsmasq's TFTP port is fixed at 69, so everything runs inside a network namespace this
script creates (loopback plus a veth pair with 10.231.250.1, needed because in.tftpd's
address lookup wants a non-loopback IPv4 address) and deletes on exit. Nothing is pinned
unless ``--pin`` (servers on CPU 0, clients on CPU 1). netbootd runs in its own process
(this script with ``--serve``) the way the daemon does, built by the daemon's own
factory (``netbootd.tftp.server.create``): transfers in ``tftp.workers`` worker
processes (default one per CPU; ``--tftp-workers N``), each running the C block loop in
up to ``tftp.pump_threads`` threads. The full run adds a row for ``tftp.workers: 0`` (the
pump threads in the service's own process). ``--baseline DIR`` adds a row for netbootd
as checked out in DIR (e.g. a worktree of main), served by DIR's own copy of this
script, in the same run: before/after on the same load. Progress goes to stderr, the
markdown table to stdout. Needs root, curl, atftp, in.tftpd, dnsmasq.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NS = f"nbd-tftpbench-{os.getpid()}"
PORTS = {"netbootd": 7069, "netbootd-inprocess": 7071, "netbootd-base": 7073,
         "in.tftpd": 6969, "dnsmasq": 69}
#: netbootd rows -> where transfers run ("netbootd" is what the daemon runs: worker
#: processes); "netbootd-base" is the --baseline checkout, as its own daemon runs.
ENGINES = {"netbootd": "workers", "netbootd-inprocess": "inprocess",
           "netbootd-base": "workers"}
WORKLOADS = ("lockstep", "window16", "atftp1", "concurrent", "storm")
PI_SET = {  # name -> size: a stock Pi 5 boot set, ~33 MB (docs/rpi-netboot.md)
    "config.txt": 1200, "bcm2712-rpi-5-b.dtb": 80_000, "initramfs_2712": 23_000_000,
    "overlays/overlay_map.dtb": 6000, "overlays/bcm2712d0.dtbo": 2000,
    "cmdline.txt": 220, "kernel_2712.img": 10_000_000,
}


def progress(msg: str) -> None:
    print(f"[tftp-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: Set from --pin. Off by default: pinned to separate CPUs, every lock-step block costs
#: a cross-CPU wake-up, which on a VM (an IPI, a VM exit) measured ~75 us per round trip
#: against ~10-15 us unpinned: the numbers then measure the hypervisor, not the servers.
PIN = False


def pin(cpu: int) -> list[str]:
    if not PIN or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpu)]


def in_ns(*argv: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *argv]


def serial(i: int) -> str:
    return f"be0c{i:04x}"


def pi_mac(i: int) -> str:
    return f"d8:3a:dd:be:{i >> 8:02x}:{i & 255:02x}"


def pi_ip(i: int) -> str:
    return f"127.1.{i >> 8}.{(i & 255) + 1}"


# ----------------------------------------------------------------------- netbootd side
def serve(image: Path, port: int, nodes: Path, engine: str, workers: int | None) -> None:
    """Child process: the TFTP service on 127.0.0.1:port with the bench's inventory,
    built by ``create(app)`` as the daemon builds it. ``engine`` "inprocess":
    ``tftp.workers: 0``."""
    import logging

    from netbootd.tftp.testkit import make_app, running

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        work = Path(tempfile.mkdtemp(prefix="nbd-tftp-serve-"))
        try:
            app = make_app(work, image, nodes_yaml=nodes.read_text(), policy="ignore",
                           tftp={"port": port, "max_transfers": 5000,
                                 "max_per_client": 5000, "workers": workers})
            app.clients.learn("127.0.0.1", pi_mac(0))
            async with running(app, engine=engine):
                stop = asyncio.Event()
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
                print("READY", flush=True)
                await stop.wait()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    asyncio.run(main())


# ----------------------------------------------------------------------- storm worker
def storm_worker(port: int, first: int, count: int, boot: Path) -> None:
    """Child process: ``count`` emulated Pi 5s started together; prints one JSON line."""
    from netbootd.tftp.piclient import pi5_boot

    want = {name: (boot / name).read_bytes() for name in PI_SET
            if name not in ("config.txt", "cmdline.txt")}

    async def one(i: int) -> tuple[float, str, int, str]:
        try:
            log = await pi5_boot(("127.0.0.1", port), serial(i), bind_ip=pi_ip(i),
                                 file_timeout=90.0)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return 0.0, "", 1, f"{type(exc).__name__}: {exc}"
        bad = sum(1 for n, d in want.items() if n in log.files and log.files[n] != d)
        bad += 0 if log.files.get("config.txt") and log.files.get("cmdline.txt") else 1
        name, secs = max(log.seconds.items(), key=lambda kv: kv[1])
        return secs, name, bad, ""

    async def main() -> None:
        t0 = time.monotonic()
        res = await asyncio.gather(*[one(first + k) for k in range(count)])
        errors = [r[3] for r in res if r[3]]
        slowest = max(res, key=lambda r: r[0])
        print(json.dumps({"wall": time.monotonic() - t0, "max_file_s": slowest[0],
                          "slowest": slowest[1], "bad": sum(r[2] for r in res),
                          "errors": errors[:3], "n_errors": len(errors)}), flush=True)

    asyncio.run(main())


# ----------------------------------------------------------------------- orchestration
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="nbd-tftp-bench-"))
        self.image = self.work / "image"
        self.boot = self.image / "boot"
        self.procs: list[subprocess.Popen] = []
        self.ns_made = False

    # setup
    def make_files(self) -> None:
        progress(f"writing files in {self.work}")
        (self.boot / "overlays").mkdir(parents=True)
        for name, size in PI_SET.items():
            if name == "config.txt":
                data = b"arm_64bit=1\n" + b"#" * (size - 13) + b"\n"
            elif name == "cmdline.txt":
                data = b"console=serial0 root=/dev/nfs " + b"x" * (size - 31) + b"\n"
            else:
                data = os.urandom(size)
            (self.boot / name).write_bytes(data)
        (self.boot / "big32.bin").write_bytes(os.urandom(32 * 1024 * 1024))
        for k in range(20):
            (self.boot / f"f8_{k:02d}.bin").write_bytes(os.urandom(8 * 1024 * 1024))
        for i in range(self.args.pis):  # <serial>/ -> the same files for in.tftpd/dnsmasq
            (self.boot / serial(i)).symlink_to(".")
        nodes = ["nodes:"] + [f"  {pi_mac(i)}:\n    serial: '{serial(i)}'\n"
                              f"    hostname: pi-{i}" for i in range(self.args.pis)]
        self.nodes = self.work / "nodes.yaml"
        self.nodes.write_text("\n".join(nodes) + "\n")
        progress("sync (writeback of fresh files would otherwise run during the timings)")
        os.sync()

    def make_ns(self) -> None:
        cmds = [["ip", "netns", "add", NS]]
        self.ns_made = True
        cmds += [in_ns(*c.split()) for c in (
            "ip link set lo up", "ip link add nbdtb0 type veth peer name nbdtb1",
            "ip addr add 10.231.250.1/24 dev nbdtb0", "ip link set nbdtb0 up",
            "ip link set nbdtb1 up")]
        for c in cmds:
            subprocess.run(c, check=True)

    def cleanup(self) -> None:
        for p in self.procs:
            self.kill(p)
        if self.ns_made:
            from netbootd.lab.netns import remove_namespaces

            remove_namespaces([NS])
        shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # servers
    def start(self, server: str) -> subprocess.Popen:
        port = PORTS[server]
        if server.startswith("netbootd"):
            # each checkout runs its own code, workers included (``python -m`` imports
            # from the working directory and PYTHONPATH)
            root = self.args.baseline if server == "netbootd-base" else REPO
            script = str(root / "bench" / "tftp_bench.py")
            env = {**os.environ, "PYTHONPATH": str(root)}
            argv = in_ns(*pin(0), sys.executable, script, "--serve", "--image",
                         str(self.image), "--port", str(port), "--nodes", str(self.nodes),
                         "--engine", ENGINES[server])
            if self.args.tftp_workers is not None:
                argv += ["--tftp-workers", str(self.args.tftp_workers)]
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
            self.procs.append(p)
            line = p.stdout.readline() if p.stdout else ""
            if "READY" not in line:
                raise RuntimeError("netbootd did not start")
            return p
        if server == "in.tftpd":
            argv = in_ns(*pin(0), "in.tftpd", "-L", "-s", str(self.boot), "-a",
                         f"127.0.0.1:{port}")
        else:
            argv = in_ns(*pin(0), "dnsmasq", "-d", "--port=0", "--enable-tftp",
                         f"--tftp-root={self.boot}", "--listen-address=127.0.0.1",
                         "--bind-interfaces", "-u", "root", "-g", "root",
                         "--conf-file=/dev/null", "--pid-file=", "--tftp-max=5000",
                         "--quiet-tftp", "--log-facility=/dev/null")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        self.wait_ready(port)
        return p

    def wait_ready(self, port: int) -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            r = subprocess.run(in_ns("curl", "-s", "--max-time", "1", "-o", "/dev/null",
                                     f"tftp://127.0.0.1:{port}/config.txt"), check=False)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"no TFTP server on port {port}")

    # workloads
    def timed(self, argv: list[str]) -> float:
        t0 = time.monotonic()
        subprocess.run(in_ns(*pin(1), *argv), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
        return time.monotonic() - t0

    def lockstep(self, port: int) -> float:
        return self.timed(["curl", "-s", "--tftp-blksize", "1468", "-o", "/dev/null",
                           f"tftp://127.0.0.1:{port}/big32.bin"])

    def atftp_lockstep(self, port: int) -> float:
        return self.timed(["atftp", "--option", "blksize 1468", "-g", "-r", "big32.bin", "-l",
                           "/dev/null", "127.0.0.1", str(port)])

    def window16(self, port: int) -> float:
        return self.timed(["atftp", "--option", "windowsize 16", "--option", "blksize 1468",
                           "-g", "-r", "big32.bin", "-l", "/dev/null", "127.0.0.1", str(port)])

    def concurrent(self, port: int) -> float:
        t0 = time.monotonic()
        procs = [subprocess.Popen(in_ns(*pin(1), "curl", "-s", "--tftp-blksize", "1468", "-o",
                                        "/dev/null", f"tftp://127.0.0.1:{port}/f8_{k:02d}.bin"))
                 for k in range(20)]
        rcs = [p.wait(600) for p in procs]
        if any(rcs):
            raise RuntimeError(f"curl failed: {rcs}")
        return time.monotonic() - t0

    def storm(self, port: int) -> dict:
        n, workers = self.args.pis, max(1, self.args.workers)
        per = [n // workers + (1 if k < n % workers else 0) for k in range(workers)]
        firsts = [sum(per[:k]) for k in range(workers)]
        procs = [subprocess.Popen(in_ns(*pin(1), sys.executable, __file__, "--storm-worker",
                                        "--port", str(port), "--first", str(f), "--count",
                                        str(c), "--image", str(self.image)),
                                  stdout=subprocess.PIPE, text=True)
                 for f, c in zip(firsts, per) if c]
        self.procs += procs
        outs = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1])
                for p in procs]
        return {"wall": max(o["wall"] for o in outs),
                "max_file_s": max(o["max_file_s"] for o in outs),
                "slowest": max(outs, key=lambda o: o["max_file_s"])["slowest"],
                "bad": sum(o["bad"] for o in outs),
                "n_errors": sum(o["n_errors"] for o in outs),
                "errors": [e for o in outs for e in o["errors"]][:3]}

    def run(self) -> dict[str, dict]:
        """All servers run at once on their own ports; each timing round visits every
        server in turn, so a burst of load from elsewhere on the machine hits all of them
        alike (medians are kept). Storms are long and run one server at a time."""
        self.make_files()
        self.make_ns()
        names = ["netbootd", "in.tftpd", "dnsmasq"]
        if self.args.baseline is not None:
            names.insert(1, "netbootd-base")
        if not self.args.quick:
            names.append("netbootd-inprocess")
        names = [n for n in names if not self.args.servers or n in self.args.servers]
        for name in names:
            self.start(name)
        results: dict[str, dict] = {n: {} for n in names}
        workloads = [("lockstep", "lock-step 32 MiB (curl, blksize 1468)", self.lockstep),
                     ("window16", "windowsize 16, 32 MiB (atftp)", self.window16),
                     ("atftp1", "lock-step 32 MiB (atftp, blksize 1468)", self.atftp_lockstep),
                     ("concurrent", "20 x 8 MiB concurrent (curl)", self.concurrent)]
        for key, label, fn in workloads:
            if key not in self.args.only:
                continue
            times: dict[str, list[float]] = {n: [] for n in names}
            for rnd in range(self.args.rounds):
                for n in names:
                    times[n].append(fn(PORTS[n]))
                progress(f"{label} round {rnd + 1}: "
                         + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
            for n in names:
                results[n][key] = statistics.median(times[n])
        for n in names:
            if "storm" not in self.args.only:
                continue
            progress(f"{n}: storm of {self.args.pis} Pi 5s ({self.args.workers} client "
                     "processes)")
            results[n]["storm"] = self.storm(PORTS[n])
            progress(f"{n}: storm {results[n]['storm']}")
        return results


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    """The markdown table: one row per workload that ran, ratios against in.tftpd."""
    cols = [n for n in ("netbootd", "in.tftpd", "dnsmasq") if n in results]
    nb, hpa = results.get("netbootd", {}), results.get("in.tftpd", {})
    for res in results.values():  # storm numbers as plain keys, like the other workloads
        if "storm" in res:
            res["storm_max"], res["storm_wall"] = res["storm"]["max_file_s"], res["storm"]["wall"]

    def ratio(key: str, base: str | None = None) -> float | None:
        base = base or key
        return nb[key] / max(hpa[base], 1e-9) if key in nb and base in hpa else None

    def row(label: str, key: str, target: str, r: float | None, limit: float | None,
            unit: str = "{:.2f} s") -> str:
        cells = [unit.format(results[c][key]) if key in results[c] else "-" for c in cols]
        met = "-" if r is None or limit is None else ("yes" if r <= limit else "NO")
        return (f"| {label} | {' | '.join(cells)} | {'-' if r is None else f'{r:.2f}x'} | "
                f"{target} | {met} |")

    pinning = "server on CPU 0, clients on CPU 1" if PIN else "not pinned"
    lines = [
        (f"TFTP bench, {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
         f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}), "
         f"loopback in a namespace, {pinning}, rounds={args.rounds}"
         f"{', quick mode' if args.quick else ''}."),
        "",
        f"| workload | {' | '.join(cols)} | netbootd / in.tftpd | target | met |",
        "|---|" + "---|" * (len(cols) + 3),
    ]
    if "lockstep" in args.only:
        lines.append(row("lock-step 32 MiB, blksize 1468 (curl)", "lockstep", "<= 1.05x",
                         ratio("lockstep"), 1.05))
    if "window16" in args.only:
        lines.append(row("windowsize 16, 32 MiB (atftp); ratio vs in.tftpd lock-step",
                         "window16", "<= 0.6x", ratio("window16", "lockstep"), 0.6))
    if "atftp1" in args.only:
        lines.append(row("for scale: atftp lock-step, 32 MiB (no windowsize)", "atftp1", "-",
                         ratio("atftp1"), None))
    if "concurrent" in args.only:
        lines.append(row("20 x 8 MiB concurrent (curl)", "concurrent", "<= 1.0x",
                         ratio("concurrent"), 1.0))
    if "storm" in args.only:
        st = nb.get("storm")
        row_ = row(f"storm of {args.pis} Pi 5s (33 MB each, probe-and-abort): slowest file",
                   "storm_max", "< 30 s", ratio("storm_max"), None, "{:.1f} s")
        if st is not None:  # the target is absolute: under 30 s, no errors, no bad file
            ok = st["max_file_s"] < 30 and not st["n_errors"] and not st["bad"]
            row_ = row_[:row_.rindex("| - |")] + f"| {'yes' if ok else 'NO'} |"
        lines.append(row_)
        lines.append(row("storm: wall time for all Pis", "storm_wall", "-",
                         ratio("storm_wall"), None, "{:.1f} s"))
    other_engines = {
        "netbootd-base": f"the baseline checkout {args.baseline} (same run)",
        "netbootd-inprocess": ("`tftp.workers: 0` (the pump threads in the service's own "
                               "process, no worker processes)"),
    }
    for name, what in other_engines.items():
        if name not in results:
            continue
        a, parts = results[name], []
        for key, label in (("lockstep", "lock-step"), ("window16", "windowsize 16"),
                           ("concurrent", "20 x 8 MiB")):
            if key in a:
                rel = f" ({a[key] / hpa[key]:.2f}x)" if key in hpa and key != "window16" else ""
                parts.append(f"{label} {a[key]:.2f} s{rel}")
        if "storm" in a:
            parts.append(f"storm slowest file {a['storm_max']:.1f} s, wall "
                         f"{a['storm_wall']:.1f} s")
        lines += ["", f"netbootd, {what}: {', '.join(parts)}."]
    errs = {k: (v["storm"]["n_errors"], v["storm"]["bad"], v["storm"]["errors"])
            for k, v in results.items()
            if "storm" in v and (v["storm"]["n_errors"] or v["storm"]["bad"])}
    if errs:
        lines += ["", f"Storm errors (count, bad files, samples): {errs}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="20 Pis, no row for tftp.workers: 0")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a netbootd checkout (e.g. a worktree of main, C module built) to "
                    "run as one more row in the same run")
    ap.add_argument("--tftp-workers", type=int, default=None,
                    help="netbootd's tftp.workers (default: one per CPU, as the daemon)")
    ap.add_argument("--pis", type=int, default=None, help="emulated Pi 5s (default 100)")
    ap.add_argument("--pin", action="store_true",
                    help="pin servers to CPU 0 and clients to CPU 1 (see PIN)")
    ap.add_argument("--workers", type=int, default=2, help="client processes for the storm")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per timing (default 3)")
    ap.add_argument("--only", action="append", choices=WORKLOADS,
                    help="run only this workload (repeatable; default all)")
    ap.add_argument("--servers", help="comma-separated servers to run (default all: "
                    + ", ".join(PORTS) + ")")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--storm-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="workers", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.image, args.port, args.nodes, args.engine, args.tftp_workers)
        return 0
    if args.storm_worker:
        storm_worker(args.port, args.first, args.count, args.image / "boot")
        return 0
    global PIN
    PIN = args.pin
    args.pis = args.pis or (20 if args.quick else 100)
    args.rounds = args.rounds or 3
    args.only = args.only or list(WORKLOADS)
    args.servers = [x.strip() for x in args.servers.split(",")] if args.servers else []
    if os.geteuid() != 0:
        print("needs root (network namespace for dnsmasq's fixed port 69)", file=sys.stderr)
        return 2
    missing = [t for t in ("curl", "atftp", "in.tftpd", "dnsmasq", "ip") if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.cleanup()
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
