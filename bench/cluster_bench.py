#!/usr/bin/env python3
r"""Proxy-DHCP and a Pi 5 storm with ``cluster.backend: local`` vs ``etcd``, same run.

    flock /tmp/netbootd-bench.lock sudo .venv/bin/python bench/cluster_bench.py \
        [--load dhcp|pi-storm|both] [--rounds 3] [--pis 20]

The daemon as users run it (``netbootd serve``, a store holding one Raspberry Pi image
active on ``prod``, ``policy.unknown: default`` so every Pi DISCOVER is answered), once
with its state on its own disk and once with a one-member etcd, in interleaved rounds;
every round starts each daemon afresh (its own state directory, and with etcd its own
key prefix: no boot sessions left from the round before) and activates the image where
that daemon reads it (``netbootd images activate``; with etcd the run checks that boot
sessions are claimed there).

``--load dhcp`` (``serve --no-tftp --no-http``), each closed loop (replies/s) and paced
(p50/p99 latency):

* **known boots**: 256 Pis DISCOVERing over and over; after the first DISCOVER each
  is inside its boot session, so the reply never asks etcd (the memo hit);
* **new boots**: every DISCOVER comes from a MAC not seen before (up to 65,536), so
  each one starts a boot session: locally a planner decision, with etcd also the one
  transaction that claims it (the cost of a new session). These MACs are not in the
  inventory, so the etcd daemon runs with ``cluster.unknown_boot_rate`` lifted: the
  bench measures etcd, not that limit.

``--load pi-storm`` (``serve --no-http``): ``--pis`` inventory Pi 5s boot at once over
TFTP, each the bootloader's sequence of reads for its serial (probe, then fetch:
netbootd.lab.pistorm, the replica storm test's client, in the client namespace), after
one more Pi booted alone (not counted: TFTP answers, the image is active); the image's
kernel_2712.img is ``--kernel-mb`` (default 8). Each Pi's first read starts its boot
session (with etcd: the claim transaction), the other reads are answered from memory.
Reported: the time until all booted, per-Pi boot time p50/p99, failed Pis, the daemon's
CPU seconds (with its TFTP workers) and, with etcd, etcd's CPU seconds, the unary
requests it handled (gRPC: what the daemon's JSON gateway calls become) and how many
revisions (writes) the storm made.

``--load both`` (the default) runs both, one after the other in each round.
etcd listens on 127.0.0.1 inside the server's namespace, so its round trip is a
loopback one; on a LAN add the network's round trip (~0.1-0.3 ms) to every new boot.
Namespaces, addresses (10.231.X.0/24), CPU pinning and clean-up are bench/dhcp_bench.py's
(daemon and etcd on CPU 0, the load on CPU 1). Progress goes to stderr, the markdown
tables to stdout.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dhcp_bench as db
from rpi_http_bench import cpu_seconds as tree_cpu_seconds
from rpi_http_bench import mac as pi_mac
from rpi_http_bench import serial as pi_serial

REPO = db.REPO
BACKENDS = ("local", "etcd")
LOADS = ("dhcp", "pi-storm")
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

    @property
    def client_ip(self) -> str:
        return f"{self.net}.2"

    def prepare_store(self, pis: int, kernel_bytes: int = 1024) -> None:
        from netbootd.store.build import sample_build

        # the storm's Pis and one more to warm up with (TFTP only: known by serial); the
        # DHCP loads' MACs are all unknown (policy.unknown: default)
        (self.tmp / "nodes.yaml").write_text("nodes:\n" + "".join(
            f"  {pi_mac(i)}: {{hostname: pi{i}, serial: {pi_serial(i)}, image: demo, "
            "channel: prod}\n" for i in range(pis + 1)) if pis else "nodes: {}\n")
        incoming = self.tmp / "images" / "incoming"
        incoming.mkdir(parents=True)
        sample_build(self.tmp / "build", "demo", "1", kind="pi-boot+rootfs",
                     payload=kernel_bytes)
        os.rename(self.tmp / "build", incoming / "demo-1")

    def etcd_sessions(self) -> int:
        """Boot sessions claimed in etcd under this round's prefix."""
        out = subprocess.run(["ip", "netns", "exec", self.srv_ns, "etcdctl", "--endpoints",
                              "http://127.0.0.1:2379", "get", "--prefix", "--limit", "1",
                              "-w", "json", f"/bench{self.round}/sessions/"],
                             capture_output=True, text=True, check=True, timeout=30,
                             env={**os.environ, "ETCDCTL_API": "3"})
        return int(json.loads(out.stdout).get("count", 0))

    def etcd_counts(self) -> dict[str, float]:
        """etcd's CPU seconds, unary gRPC requests handled and current revision."""
        assert self.etcd is not None
        out = subprocess.run(["ip", "netns", "exec", self.srv_ns, "curl", "-s", "-m", "5",
                              "http://127.0.0.1:2379/metrics"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        counts = {"cpu": db.cpu_seconds(self.etcd.pid), "requests": 0.0, "revision": 0.0}
        for line in out.splitlines():
            if line.startswith("grpc_server_handled_total{") and 'grpc_type="unary"' in line:
                counts["requests"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("etcd_debugging_mvcc_current_revision "):
                counts["revision"] = float(line.rsplit(" ", 1)[1])
        return counts

    def start_server(self, name: str, tftp: bool = False) -> subprocess.Popen:
        self.round += 1
        cluster = ""
        if name == "etcd":  # a fresh prefix per round: no claims left from the last one
            # the bench's MACs are all unknown: lift their rate limit, to measure etcd
            cluster = ("cluster: {backend: etcd, name: bench, unknown_boot_rate: 1e9, "
                       "etcd: {endpoints: "
                       f"[http://127.0.0.1:2379], key_prefix: /bench{self.round}/}}}}\n")
        cfg = self.tmp / f"netbootd-{name}.yaml"
        cfg.write_text(
            "policy: {unknown: default}\n"
            "dhcp: {rate_limit_per_mac: 1000000000}\n"
            "tftp: {max_per_client: 100000, max_transfers: 100000}\n"  # one IP, all Pis
            "nfs: {backend: none}\n"
            "store: {auto_activate: {'*': prod}, settle_seconds: 0.1}\n"
            f"paths: {{images: {self.tmp / 'images'}, "
            f"state: {self.tmp / f'state-{name}-{self.round}'}, "
            f"inventory: {self.tmp / 'nodes.yaml'}, templates: {REPO / 'config' / 'templates'}}}\n"
            + cluster)
        log_path = self.tmp / f"netbootd-{name}-{self.round}.log"
        log = open(log_path, "w")  # noqa: SIM115 - closed with the process
        cmd = ["taskset", "-c", "0", sys.executable, "-m", "netbootd", "--config", str(cfg),
               "--log-level", "WARNING", "serve", "--no-http",
               *([] if tftp else ["--no-tftp"])]
        p = subprocess.Popen(["ip", "netns", "exec", self.srv_ns, *cmd], stdout=log,
                             stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append(p)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # ready = it answers a Pi DISCOVER ...
            if p.poll() is not None:
                raise RuntimeError(f"netbootd exited: {log_path.read_text()[-2000:]}")
            if self.generate("closed", 0.3, 100, 1)["received"]:
                break
        else:
            raise RuntimeError(f"netbootd did not answer: {log_path.read_text()[-2000:]}")
        # ... and demo 1 is active on prod where this daemon reads it: a fresh etcd prefix
        # has no channel pointer (auto_activate acts once, when the build is imported), and
        # a proxy-DHCP answer does not need one (no image = no boot session, no etcd claim).
        # The operator's way: `netbootd images activate` (a no-op when already active).
        activate = ["ip", "netns", "exec", self.srv_ns, sys.executable, "-m", "netbootd",
                    "--config", str(cfg), "--log-level", "WARNING", "images", "activate",
                    "demo", "1", "--channel", "prod"]
        while time.monotonic() < deadline:  # the import may still run; with etcd the
            out = subprocess.run(activate, capture_output=True, text=True, check=False,
                                 cwd=REPO, timeout=60)  # daemon must announce it holds v1
            if out.returncode == 0:
                time.sleep(0.5)  # the daemon's watch follows within milliseconds
                return p
            time.sleep(0.5)
        raise RuntimeError(f"demo 1 not activated: {out.stdout}{out.stderr}")


def measure(bench: ClusterBench, name: str, args: argparse.Namespace) -> dict:
    proc = bench.start_server(name)
    r: dict = {}
    bench.generate("closed", 1.0, args.rate, args.window)  # warm: 256 sessions open
    if name == "etcd" and not bench.etcd_sessions():
        raise RuntimeError("DHCP opened no boot session in etcd: is demo 1 active?")
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


def measure_storm(bench: ClusterBench, name: str, args: argparse.Namespace) -> dict:
    """One storm of ``--pis`` Pi 5s over TFTP against a fresh daemon, after one Pi (not
    counted) booted alone: TFTP answers, the image is active, the workers run."""
    proc = bench.start_server(name, tftp=True)
    warm = pi_storm(bench, name, [pi_serial(args.pis)])
    if warm["failed"]:
        raise RuntimeError(f"the warm-up Pi did not boot: {warm['first_failure']}")
    e0, c0 = bench.etcd_counts(), tree_cpu_seconds(proc.pid)
    storm = pi_storm(bench, name, [pi_serial(i) for i in range(args.pis)])
    cpu, e1 = tree_cpu_seconds(proc.pid) - c0, bench.etcd_counts()
    secs, failed = storm["seconds"], storm["failed"]
    if failed:
        progress(f"  {name}: {failed} Pis failed, e.g. {storm['first_failure']}")
    r = {"all_booted": max(secs), "p50": db.pct(secs, 0.5), "p99": db.pct(secs, 0.99),
         "failed": failed, "cpu": cpu, **{f"etcd_{k}": e1[k] - e0[k] for k in e0}}
    progress(f"  {name}: {len(secs)} Pis all booted in {r['all_booted']:.2f} s, p50 "
             f"{r['p50']:.2f} s, p99 {r['p99']:.2f} s, failed {failed}, daemon CPU "
             f"{cpu:.2f} s" + (f"; etcd {r['etcd_requests']:.0f} requests, "
                               f"{r['etcd_revision']:.0f} revisions, "
                               f"{r['etcd_cpu']:.2f} s CPU" if name == "etcd" else ""))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    return r


def machine() -> str:
    return (f"Machine: {platform.node()} ({os.cpu_count()} CPUs), "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


def pi_storm(bench: ClusterBench, name: str, serials: list[str]) -> dict:
    """These Pis boot at once (netbootd.lab.pistorm in the client namespace): per-Pi
    seconds, how many failed, and the first failure with the end of the daemon's log."""
    out = bench.tmp / f"storm-{name}-{bench.round}.json"
    cmd = ["ip", "netns", "exec", bench.cli_ns, "taskset", "-c", "1", sys.executable, "-m",
           "netbootd.lab.pistorm", "--servers", bench.server_ip, "--serials",
           ",".join(serials), "--out", str(out), "--bind", bench.client_ip]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO,
                          timeout=600 + 10 * len(serials))
    if done.returncode != 0:
        raise RuntimeError(f"the storm client failed: {done.stderr[-2000:]}")
    pis = json.loads(out.read_text())
    bad = [pi for pi in pis if not (pi["files"].get("kernel_2712.img") or {}).get("sha256")
           or any(f and "error" in f for f in pi["files"].values())]
    first = ""
    if bad:
        log = (bench.tmp / f"netbootd-{name}-{bench.round}.log").read_text().splitlines()
        first = f"{bad[0]['serial']}: {bad[0]['files']}; the daemon's log ends: {log[-3:]}"
    return {"seconds": [pi["seconds"] for pi in pis], "failed": len(bad),
            "first_failure": first}


def dhcp_table(med: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        (f"{machine()}; Pi 5 DISCOVERs, closed loop window "
         f"{args.window}, {args.seconds:g} s; paced {args.rate:g}/s (known) and "
         f"{args.new_rate:g}/s (new); {args.rounds} interleaved rounds, medians."), "",
        ("| backend | known boots replies/s | CPU µs/reply | p50 µs | p99 µs "
         "| new boots/s | new boot p50 µs | new boot p99 µs | lost (new, paced) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in med.items():
        lines.append(f"| {n} | {r['known_rate']:,.0f} | {r['known_cpu_us']:.1f} | "
                     f"{r['known_p50']:.0f} | {r['known_p99']:.0f} | {r['new_rate']:,.0f} | "
                     f"{r['new_p50']:.0f} | {r['new_p99']:.0f} | {r['new_lost']:.0f} |")
    return "\n".join(lines)


def storm_table(med: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        (f"{machine()}; {args.pis} Pi 5s "
         f"booting at once over TFTP; {args.rounds} interleaved rounds, medians (failed "
         "Pis: all rounds)."), "",
        ("| backend | all booted s | per-Pi boot p50 s | per-Pi boot p99 s | failed Pis "
         "| daemon CPU s | etcd CPU s | etcd requests | etcd revisions |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in med.items():
        etcd = (f"{r['etcd_cpu']:.2f} | {r['etcd_requests']:.0f} | {r['etcd_revision']:.0f}"
                if n == "etcd" else "- | - | -")
        lines.append(f"| {n} | {r['all_booted']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                     f"{r['failed']:.0f} | {r['cpu']:.2f} | {etcd} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=2000.0, help="paced known-boot requests/s")
    p.add_argument("--new-rate", type=float, default=200.0, help="paced new boots/s")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--load", choices=(*LOADS, "both"), default="both")
    p.add_argument("--pis", type=int, default=20, help="Pi 5s in the storm")
    p.add_argument("--kernel-mb", type=float, default=8.0,
                   help="size of the image's kernel_2712.img, the storm's big file")
    args = p.parse_args()
    loads = LOADS if args.load == "both" else (args.load,)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "taskset", "etcd", "etcdctl", "curl"):
        if not shutil.which(tool):
            print(f"needs {tool}", file=sys.stderr)
            return 2
    rounds: dict[str, dict[str, list[dict]]] = {ld: {n: [] for n in BACKENDS} for ld in loads}
    runs = {"dhcp": measure, "pi-storm": measure_storm}
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        bench = ClusterBench(Path(tmp))
        old = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            bench.setup()
            bench.prepare_store(args.pis if "pi-storm" in loads else 0,
                                int(args.kernel_mb * (1 << 20)))
            bench.start_etcd()
            progress(f"namespaces {bench.srv_ns} / {bench.cli_ns}, net {bench.net}.0/24")
            for rnd in range(1, args.rounds + 1):
                for load in loads:
                    for name in BACKENDS:
                        progress(f"round {rnd}/{args.rounds}: {load}, {name}")
                        rounds[load][name].append(runs[load](bench, name, args))
        finally:
            bench.teardown()
            signal.signal(signal.SIGTERM, old)
    tables = {"dhcp": dhcp_table, "pi-storm": storm_table}
    for load, per in rounds.items():
        med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for n, rs in per.items()}
        for n, rs in per.items():
            if load == "pi-storm":
                med[n]["failed"] = sum(r["failed"] for r in rs)
        print(tables[load](med, args) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
