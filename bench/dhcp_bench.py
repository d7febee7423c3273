#!/usr/bin/env python3
"""Proxy-DHCP benchmark: netbootd vs dnsmasq in proxy mode, same load, same run.

    sudo .venv/bin/python bench/dhcp_bench.py [--seconds 5] [--rate 2000] [--rounds 5]

What it measures (DISCOVER -> proxy OFFER, Raspberry Pi 5 DISCOVERs from 256 MACs):

* **replies/s, closed loop**: the load generator keeps ``--window`` requests in flight
  and sends a new one for every reply (busy-polling its socket), for ``--seconds``.
* **CPU µs per reply**: the server's user+system CPU during that run / replies.
* **p50 / p99 latency at ``--rate``/s**: paced open-loop load, latency per request
  from send to reply, measured in the generator.

Each of ``--rounds`` rounds visits every server in turn (start, 1 s warm-up, closed loop,
paced, stop). The table keeps the median over the rounds of each figure, and also shows
the p99 of all rounds' paced requests pooled (one latency episode, see below, dominates
that one). Why rounds: on
this project's 2-vCPU VM, latency has episodes of 20-40 ms in which *every* request takes
~350 µs instead of ~60 (the vCPU is busy elsewhere; both servers see them); one episode
in a single 5 s run moves a p99 by 5x, so a single run says more about the episode than
about the server. Interleaved rounds give both servers the same chances.

Servers: netbootd (``python -m netbootd.dhcp``; rate limit lifted — 256 MACs at tens of
thousands of requests/s would otherwise be, correctly, dropped), dnsmasq
``--dhcp-range=<net>,proxy --pxe-service=0,"Raspberry Pi Boot"`` with ``--quiet-dhcp``
and with its default logging (to a file, not the host's syslog).

Everything runs inside two network namespaces this script creates (``nbdb-*``), joined
by one veth pair, addresses 10.231.X.0/24; the server is pinned to CPU 0 and the
generator to CPU 1 with taskset. The namespaces and every process are removed on exit,
also on Ctrl-C. The load generator builds packets with ``struct`` (netbootd.dhcp.clients)
and patches the xid per send: scapy would be the bottleneck, not the servers.
Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
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

CLIENTS = 256
SERVERS = ("netbootd", "dnsmasq --quiet-dhcp", "dnsmasq (default logging)")
TICKS = os.sysconf("SC_CLK_TCK")


def progress(msg: str) -> None:
    print(f"[dhcp-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- generator
def _packets(n: int) -> list[bytes]:
    from netbootd.dhcp import clients as c

    return [c.pi_discover(f"d8:3a:dd:be:{i >> 8:02x}:{i & 255:02x}", 0, 0x1000 + i)
            for i in range(n)]


def generate(server: str, mode: str, seconds: float, rate: float, window: int,
             clients: int = CLIENTS) -> dict:
    """Run in the client namespace; returns counts and latencies (µs) as a dict.
    ``clients`` MACs take turns (up to 65536: more than a run sends = every request is
    a new machine's first DISCOVER)."""
    pkts = _packets(clients)
    n_pkts = len(pkts)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", 68))
    sock.setblocking(False)
    dest = (server, 67)
    pending: dict[int, int] = {}
    lat: list[float] = []
    sent = received = 0
    xid = secrets.randbits(24) << 8
    clock = time.perf_counter_ns
    send, recv = sock.sendto, sock.recv

    def send_one() -> None:
        nonlocal xid, sent
        xid = (xid + 1) & 0xFFFFFFFF
        p = pkts[xid % n_pkts]
        pending[xid] = clock()
        try:
            send(p[:4] + xid.to_bytes(4, "big") + p[8:], dest)
            sent += 1
        except BlockingIOError:
            pending.pop(xid, None)

    def drain() -> bool:
        nonlocal received
        got = False
        while True:
            try:
                data = recv(2048)
            except BlockingIOError:
                return got
            t0 = pending.pop(int.from_bytes(data[4:8], "big"), None)
            if t0 is not None:
                lat.append((clock() - t0) / 1000)
                received += 1
                got = True

    end = time.monotonic() + seconds
    last_rx = time.monotonic()
    if mode == "closed":
        while time.monotonic() < end:
            while len(pending) < window:
                send_one()
            if drain():
                last_rx = time.monotonic()
            elif time.monotonic() - last_rx > 0.05:  # lost replies: refill the window
                pending.clear()
                last_rx = time.monotonic()
    else:
        interval = 1e9 / rate
        nxt = clock()
        stop = clock() + int(seconds * 1e9)
        while True:
            now = clock()
            if now >= stop:
                break
            if now >= nxt:
                send_one()
                nxt += interval
            drain()
        t_end = time.monotonic() + 0.2
        while time.monotonic() < t_end:
            drain()
    sock.close()
    return {"mode": mode, "seconds": seconds, "sent": sent, "received": received,
            "lat": lat if mode == "paced" else [], "rate": received / seconds}


# --------------------------------------------------------------------------- orchestration
def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.net = f"10.231.{200 + secrets.randbelow(50)}"
        self.tmp = tmp
        self.srv_ns, self.cli_ns = f"nbdb-{self.tag}-srv", f"nbdb-{self.tag}-cli"
        self.procs: list[subprocess.Popen] = []

    @property
    def server_ip(self) -> str:
        return f"{self.net}.1"

    def setup(self) -> None:
        for ns in (self.srv_ns, self.cli_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.srv_ns, "link", "add", "eth0", "type", "veth", "peer", "name",
           "eth0", "netns", self.cli_ns)
        for ns, host in ((self.srv_ns, 1), (self.cli_ns, 2)):
            sh("ip", "-n", ns, "addr", "add", f"{self.net}.{host}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        from netbootd.lab.netns import remove_namespaces

        remove_namespaces([self.srv_ns, self.cli_ns])
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def start_server(self, name: str) -> subprocess.Popen:
        pin = ["taskset", "-c", "0"]
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        if name == "netbootd":
            cfg = self.tmp / "netbootd.yaml"
            cfg.write_text("policy: {unknown: default}\n"
                           "dhcp: {rate_limit_per_mac: 1000000000}\n"
                           f"paths: {{state: {self.tmp / 'state'}, "
                           f"inventory: {self.tmp / 'none.yaml'}}}\n")
            cmd = [*pin, sys.executable, "-m", "netbootd.dhcp", "--config", str(cfg)]
            p = subprocess.Popen(["ip", "netns", "exec", self.srv_ns, *cmd],
                                 stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
            self.procs.append(p)
            line = p.stdout.readline()
            if "ready" not in line:
                raise RuntimeError(f"netbootd did not start: {(self.tmp / 'netbootd.log')}")
            return p
        quiet = ["--quiet-dhcp"] if name == "dnsmasq --quiet-dhcp" else []
        cmd = [*pin, "dnsmasq", "-d", "--conf-file=/dev/null", "--port=0", "--user=root",
               "--bind-interfaces", "--interface=eth0", f"--dhcp-range={self.net}.0,proxy",
               '--pxe-service=0,"Raspberry Pi Boot"',
               f"--pid-file={self.tmp / 'dnsmasq.pid'}",
               f"--log-facility={self.tmp / ('dnsmasq-' + str(len(self.procs)) + '.log')}",
               *quiet]
        p = subprocess.Popen(["ip", "netns", "exec", self.srv_ns, *cmd],
                             stdout=subprocess.DEVNULL, stderr=log)
        self.procs.append(p)
        time.sleep(0.5)
        if p.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {(self.tmp / f'{name}.log').read_text()}")
        return p

    def generate(self, mode: str, seconds: float, rate: float, window: int,
                 clients: int = CLIENTS) -> dict:
        cmd = ["ip", "netns", "exec", self.cli_ns, "taskset", "-c", "1", sys.executable,
               str(Path(__file__).resolve()), "--generate", "--server", self.server_ip,
               "--mode", mode, "--seconds", str(seconds), "--rate", str(rate),
               "--window", str(window), "--clients", str(clients)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                             check=True, cwd=REPO)
        return json.loads(out.stdout)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "taskset", "dnsmasq"):
        if not shutil.which(tool):
            print(f"needs {tool}", file=sys.stderr)
            return 2
    servers = [n for n in SERVERS if not args.only or any(o in n for o in args.only)]
    rounds: dict[str, list[dict]] = {n: [] for n in servers}
    with tempfile.TemporaryDirectory(prefix="dhcp-bench-") as tmp:
        bench = Bench(Path(tmp))
        old = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            bench.setup()
            progress(f"namespaces {bench.srv_ns} / {bench.cli_ns}, net {bench.net}.0/24")
            for rnd in range(1, args.rounds + 1):
                for name in servers:
                    progress(f"round {rnd}/{args.rounds}: {name}")
                    rounds[name].append(measure(bench, name, args))
        finally:
            bench.teardown()
            signal.signal(signal.SIGTERM, old)
    results = {}
    for n, rs in rounds.items():
        lat = [x for r in rs for x in r.pop("lat")]  # every paced request of every round
        results[n] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        results[n].update(p99_pooled=pct(lat, 0.99), lost=sum(r["lost"] for r in rs),
                          paced_sent=sum(r["paced_sent"] for r in rs))
    print(table(results, args))
    return 0


def measure(bench: Bench, name: str, args: argparse.Namespace) -> dict:
    """One server, one round: closed-loop rate and CPU per reply, then paced latency."""
    proc = bench.start_server(name)
    warm = bench.generate("closed", 1.0, args.rate, args.window)
    if warm["received"] == 0:
        raise RuntimeError(f"{name} sent no replies during warm-up")
    c0 = cpu_seconds(proc.pid)
    closed = bench.generate("closed", args.seconds, args.rate, args.window)
    cpu = cpu_seconds(proc.pid) - c0
    paced = bench.generate("paced", args.seconds, args.rate, args.window)
    r = {"rate": closed["rate"], "cpu_us": cpu / max(closed["received"], 1) * 1e6,
         "p50": pct(paced["lat"], 0.50), "p99": pct(paced["lat"], 0.99),
         "lost": paced["sent"] - paced["received"], "paced_sent": paced["sent"],
         "lat": paced["lat"]}
    progress(f"  {closed['rate']:,.0f} replies/s, {r['cpu_us']:.1f} µs CPU/reply; "
             f"at {args.rate:g}/s p50 {r['p50']:.0f} µs, p99 {r['p99']:.0f} µs, "
             f"lost {r['lost']}")
    proc.terminate()
    proc.wait(timeout=5)
    return r


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    ref = results.get("dnsmasq --quiet-dhcp")
    lines = [
        (f"Machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, "
         f"Python {platform.python_version()}), {time.strftime('%Y-%m-%d %H:%M %Z')}; "
         f"Pi 5 DISCOVERs from {CLIENTS} MACs; closed loop window {args.window}, "
         f"{args.seconds:g} s; paced {args.rate:g}/s for {args.seconds:g} s; "
         f"{args.rounds} interleaved rounds, medians over rounds."),
        "",
        ("| server | replies/s (closed loop) | CPU µs/reply | p50 µs @rate | p99 µs @rate "
         "| p99 µs pooled | lost @rate | replies/s vs dnsmasq quiet | p99 vs dnsmasq quiet |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ratio = f"{r['rate'] / ref['rate']:.2f}x" if ref else "-"
        p99r = f"{r['p99'] / ref['p99']:.2f}x" if ref and ref["p99"] else "-"
        lines.append(f"| {name} | {r['rate']:,.0f} | {r['cpu_us']:.1f} | {r['p50']:.0f} | "
                     f"{r['p99']:.0f} | {r['p99_pooled']:.0f} | "
                     f"{r['lost']:.0f}/{r['paced_sent']:.0f} | {ratio} | {p99r} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=2000.0, help="paced requests/s")
    p.add_argument("--window", type=int, default=64, help="closed-loop requests in flight")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds; the table keeps medians (default 5)")
    p.add_argument("--only", action="append", help="run only servers whose name contains "
                   "this (repeatable), e.g. --only netbootd")
    p.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("closed", "paced"), help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=CLIENTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generate:
        print(json.dumps(generate(args.server, args.mode, args.seconds, args.rate,
                                  args.window, args.clients)))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
