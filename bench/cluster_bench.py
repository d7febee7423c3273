#!/usr/bin/env python3
"""Proxy-DHCP with ``cluster.backend: local`` vs ``etcd``, same load, same run.

    flock /tmp/netbootd-bench.lock sudo .venv/bin/python bench/cluster_bench.py [--rounds 3]

The daemon as users run it (``netbootd serve --no-tftp --no-http``, a store holding one
Raspberry Pi image active on ``prod``, ``policy.unknown: default`` so every Pi DISCOVER
is answered), once with its state on its own disk and once with a one-member etcd.
Two loads, each closed loop (replies/s) and paced (p50/p99 latency):

* **known boots**: 256 Pis DISCOVERing over and over; after the first DISCOVER each
  is inside its boot session, so the reply never asks etcd (the memo hit);
* **new boots**: every DISCOVER comes from a MAC not seen before (up to 65,536), so
  each one starts a boot session: locally a planner decision, with etcd also the one
  transaction that claims it (the cost of a new session).

etcd listens on 127.0.0.1 inside the server's namespace, so its round trip is a
loopback one; on a LAN add the network's round trip (~0.1-0.3 ms) to every new boot.
Namespaces, addresses (10.231.X.0/24), CPU pinning and clean-up are bench/dhcp_bench.py's.
Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dhcp_bench as db

REPO = db.REPO
BACKENDS = ("local", "etcd")
NEW_MACS = 65536


def progress(msg: str) -> None:
    print(f"[cluster-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ClusterBench(db.Bench):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.etcd: subprocess.Popen | None = None
        self.round = 0

    def start_etcd(self) -> None:
        data = self.tmp / "etcd"
        cmd = ["ip", "netns", "exec", self.srv_ns, "taskset", "-c", "0", "etcd",
               "--name", "b", "--data-dir", str(data),
               "--listen-client-urls", "http://127.0.0.1:2379",
               "--advertise-client-urls", "http://127.0.0.1:2379",
               "--listen-peer-urls", "http://127.0.0.1:2380",
               "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
               "--initial-cluster", "b=http://127.0.0.1:2380", "--log-level", "warn",
               "--logger", "zap"]
        with open(self.tmp / "etcd.log", "w") as log:
            self.etcd = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.procs.append(self.etcd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["ip", "netns", "exec", self.srv_ns, "etcdctl",
                                  "--endpoints", "http://127.0.0.1:2379", "endpoint", "health"],
                                 capture_output=True, text=True, check=False,
                                 env={**os.environ, "ETCDCTL_API": "3"})
            if out.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("etcd did not become healthy: " + (self.tmp / "etcd.log").read_text())

    def prepare_store(self) -> None:
        from netbootd.store.build import sample_build

        (self.tmp / "nodes.yaml").write_text("nodes: {}\n")  # every Pi is unknown: default
        incoming = self.tmp / "images" / "incoming"
        incoming.mkdir(parents=True)
        sample_build(self.tmp / "build", "demo", "1", kind="pi-boot+rootfs")
        os.rename(self.tmp / "build", incoming / "demo-1")

    def start_server(self, name: str) -> subprocess.Popen:
        self.round += 1
        cluster = ""
        if name == "etcd":  # a fresh prefix per round: no claims left from the last one
            cluster = ("cluster: {backend: etcd, name: bench, etcd: {endpoints: "
                       f"[http://127.0.0.1:2379], key_prefix: /bench{self.round}/}}}}\n")
        cfg = self.tmp / f"netbootd-{name}.yaml"
        cfg.write_text(
            "policy: {unknown: default}\n"
            "dhcp: {rate_limit_per_mac: 1000000000}\n"
            "nfs: {backend: none}\n"
            "store: {auto_activate: {'*': prod}, settle_seconds: 0.1}\n"
            f"paths: {{images: {self.tmp / 'images'}, state: {self.tmp / ('state-' + name)}, "
            f"inventory: {self.tmp / 'nodes.yaml'}, templates: {REPO / 'config' / 'templates'}}}\n"
            + cluster)
        log_path = self.tmp / f"netbootd-{name}-{self.round}.log"
        log = open(log_path, "w")  # noqa: SIM115 - closed with the process
        cmd = ["taskset", "-c", "0", sys.executable, "-m", "netbootd", "--config", str(cfg),
               "--log-level", "WARNING", "serve", "--no-tftp", "--no-http"]
        p = subprocess.Popen(["ip", "netns", "exec", self.srv_ns, *cmd], stdout=log,
                             stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append(p)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # ready = it answers a Pi DISCOVER
            if p.poll() is not None:
                raise RuntimeError(f"netbootd exited: {log_path.read_text()[-2000:]}")
            if self.generate("closed", 0.3, 100, 1)["received"]:
                return p
        raise RuntimeError(f"netbootd did not answer: {log_path.read_text()[-2000:]}")


def measure(bench: ClusterBench, name: str, args: argparse.Namespace) -> dict:
    proc = bench.start_server(name)
    r: dict = {}
    bench.generate("closed", 1.0, args.rate, args.window)  # warm: 256 sessions open
    c0 = db.cpu_seconds(proc.pid)
    known = bench.generate("closed", args.seconds, args.rate, args.window)
    r["known_rate"] = known["rate"]
    r["known_cpu_us"] = (db.cpu_seconds(proc.pid) - c0) / max(known["received"], 1) * 1e6
    paced = bench.generate("paced", args.seconds, args.rate, args.window)
    r["known_p50"], r["known_p99"] = db.pct(paced["lat"], 0.5), db.pct(paced["lat"], 0.99)
    new = bench.generate("closed", args.seconds, args.rate, args.window, NEW_MACS)
    r["new_rate"] = new["rate"]
    # each generator run starts at a random MAC of the 65,536, far more than a run sends
    paced_new = bench.generate("paced", args.seconds, args.new_rate, args.window, NEW_MACS)
    r["new_p50"], r["new_p99"] = db.pct(paced_new["lat"], 0.5), db.pct(paced_new["lat"], 0.99)
    r["new_lost"] = paced_new["sent"] - paced_new["received"]
    progress(f"  {name}: known {r['known_rate']:,.0f}/s p99 {r['known_p99']:.0f} µs; "
             f"new {r['new_rate']:,.0f}/s p50 {r['new_p50']:.0f} µs p99 {r['new_p99']:.0f} µs")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=2000.0, help="paced known-boot requests/s")
    p.add_argument("--new-rate", type=float, default=200.0, help="paced new boots/s")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "taskset", "etcd", "etcdctl"):
        if not shutil.which(tool):
            print(f"needs {tool}", file=sys.stderr)
            return 2
    rounds: dict[str, list[dict]] = {n: [] for n in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        bench = ClusterBench(Path(tmp))
        old = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            bench.setup()
            bench.prepare_store()
            bench.start_etcd()
            progress(f"namespaces {bench.srv_ns} / {bench.cli_ns}, net {bench.net}.0/24")
            for rnd in range(1, args.rounds + 1):
                for name in BACKENDS:
                    progress(f"round {rnd}/{args.rounds}: {name}")
                    rounds[name].append(measure(bench, name, args))
        finally:
            bench.teardown()
            signal.signal(signal.SIGTERM, old)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for n, rs in rounds.items()}
    print(f"Machine: {platform.node()} ({os.cpu_count()} CPUs), "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}; Pi 5 DISCOVERs, closed loop window "
          f"{args.window}, {args.seconds:g} s; paced {args.rate:g}/s (known) and "
          f"{args.new_rate:g}/s (new); {args.rounds} interleaved rounds, medians.\n")
    print("| backend | known boots replies/s | CPU µs/reply | p50 µs | p99 µs "
          "| new boots/s | new boot p50 µs | new boot p99 µs | lost (new, paced) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in med.items():
        print(f"| {n} | {r['known_rate']:,.0f} | {r['known_cpu_us']:.1f} | "
              f"{r['known_p50']:.0f} | {r['known_p99']:.0f} | {r['new_rate']:,.0f} | "
              f"{r['new_p50']:.0f} | {r['new_p99']:.0f} | {r['new_lost']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
