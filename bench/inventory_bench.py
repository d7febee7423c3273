#!/usr/bin/env python3
"""Inventory scale: `netbootd check`, start-up, hot reload and RSS for 1k-100k nodes.

    .venv/bin/python bench/inventory_bench.py [--sizes 1000,10000,100000]
        [--baseline /path/to/other/worktree] [--baseline-max 10000]
        [--svg docs/inventory-scale.svg] [--rate 200]

For each size a config directory is generated (a copy of config/ whose nodes.yaml has
that many nodes: half Raspberry Pis with serials and labels, the rest x86 machines with
kubeadm vars, every tenth of those `action: local`), and for each code tree (this one,
and ``--baseline``'s, up to ``--baseline-max`` nodes: its code runs in the same run, on
the same load):

The code trees are byte-compiled first, as an installed daemon is.

* **check**: wall time of ``python -m netbootd check``;
* **start-up**: ``netbootd serve`` (DHCP, TFTP, HTTP on loopback high ports) from exec
  to the first ``/healthz`` 200, first with no saved check results (cold), then again
  (warm: the render check's results saved by the first run), and the daemon's RSS then;
  **ready**: to the first ``/readyz`` 200 (the render check of every node, which the
  daemon runs once it answers, passed); reloads are timed once the daemon is ready;
* **reload, one node**: a hostname edited by rename; from the rename to the reload
  counter moving (``reload.settle_seconds: 0``, so this is the reload's own work plus
  the watcher's notice: watchfiles yields a change after 50 ms without another one);
* **reload, template edited**: ``meta-data.j2`` edited (every node renders that template
  again, and only that one);
* **DHCP, TFTP and HTTP during the reload**: from threads of this script, paced,
  each request timed from send to answer: port-4011 boot-server requests for inventory
  MACs (``--rate``/s), TFTP read requests for ``undionly.kpxe`` to the first data block
  (a quarter of that rate) and ``GET /ipxe?mac=`` of inventory MACs on one kept-alive
  connection (a quarter too); p50 / p99 / max of those sent while the every-node reload
  ran, and of as many before it (quiet), and how many got no answer within 0.5 s.

Progress goes to stderr; a markdown table to stdout; ``--svg`` writes a log-log plot of
this tree's figures (SVG written by hand: no plotting library needed). Only loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEP = 0.05  # watchfiles yields changes after this long without another (reload.py)


def progress(msg: str) -> None:
    print(f"[inventory-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mac_of(i: int) -> str:
    prefix = "d8:3a:dd" if i % 2 == 0 else "52:54:00"
    return f"{prefix}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def nodes_yaml(n: int, head: str, edit: int | None = None) -> str:
    lines = [head.rstrip("\n"), "nodes:"]
    for i in range(n):
        lines.append(f"  {mac_of(i)}:")
        suffix = "-edited" if i == edit else ""
        if i % 2 == 0:
            lines += [f"    serial: 10000000{i:08x}", f"    hostname: pi-{i}{suffix}",
                      f"    labels: {{role: worker, rack: r{i // 40}}}",
                      "    profile: pi5-workers"]
        elif i % 10 == 9:
            lines += [f"    hostname: storage-{i}{suffix}", "    action: local"]
        else:
            lines += [f"    hostname: x86-{i}{suffix}", "    profile: x86-uefi", "    vars:",
                      "      join: kubeadm", "      kubeadm_endpoint: 10.0.0.10:6443",
                      f"      kubeadm_ca_hash: sha256:{'0' * 64}"]
    return "\n".join(lines) + "\n"


def make_config(tmp: Path, n: int) -> Path:
    cfg = tmp / f"config-{n}"
    if cfg.exists():
        shutil.rmtree(cfg)
    shutil.copytree(REPO / "config", cfg)
    head = (cfg / "nodes.yaml").read_text().split("\nnodes:")[0]
    (cfg / "nodes.head").write_text(head)
    (cfg / "nodes.yaml").write_text(nodes_yaml(n, head))
    ports = {k: free_port(socket.SOCK_DGRAM) for k in ("dhcp", "pxe", "client", "tftp")}
    ports["http"] = free_port()
    (cfg / "netbootd.yaml").write_text(
        f"dhcp: {{port: {ports['dhcp']}, pxe_port: {ports['pxe']}, "
        f"client_port: {ports['client']}, bind: 127.0.0.1, rate_limit_per_mac: 1000000, "
        "learn_from_acks: false}\n"
        f"tftp: {{port: {ports['tftp']}, bind: 127.0.0.1}}\n"
        f"http: {{port: {ports['http']}, bind: 127.0.0.1, api_token_file: secrets/api-token}}\n"
        # state and images beside the config directory, as in the shipped layout: the
        # config watcher must see only the inventory and templates change
        f"paths: {{images: ../images-{n}, state: ../state-{n}, inventory: nodes.yaml, "
        "templates: templates}\n"
        "reload: {settle_seconds: 0, max_node_loss: 1.0}\n"
        "secrets: {k3s_token: secrets/k3s-token, kubeadm_token: secrets/kubeadm-token}\n")
    (cfg / "ports").write_text(repr(ports))
    # the image store exists from the start, as shipped: `check` asks it, whichever tree
    # runs first
    (tmp / f"images-{n}").mkdir(exist_ok=True)
    return cfg


def ports_of(cfg: Path) -> dict:
    import ast

    return ast.literal_eval((cfg / "ports").read_text())


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def compile_modules(tree: Path) -> None:
    """Byte-compile the tree's package, so no start-up pays for compiling it (an
    environment with ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile every
    module at every start: ~0.1 s of each start-up measured here)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "netbootd")],
                   check=True, stdout=subprocess.DEVNULL)


def time_check(tree: Path, cfg: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "netbootd", "--config",
                          str(cfg / "netbootd.yaml"), "check"], env=env_for(tree), cwd=tree,
                         capture_output=True, text=True, timeout=900, check=False)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"check failed: {out.stderr[-2000:]}")
    return took


def get(url: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def reloads_ok(http: int) -> float:
    text = get(f"http://127.0.0.1:{http}/metrics") or ""
    m = re.search(r'netbootd_config_reloads_total\{outcome="ok"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Daemon:
    def __init__(self, tree: Path, cfg: Path) -> None:
        self.tree, self.cfg = tree, cfg
        # beside the config directory, never in it: the daemon watches that directory, and
        # each line it logged there would start another reload
        self.log = cfg.parent / f"{cfg.name}.daemon.log"
        self.ports = ports_of(cfg)
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        log = open(self.log, "a")  # noqa: SIM115 - closed with the process
        self.t0 = t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netbootd", "--config", str(self.cfg / "netbootd.yaml"),
             "serve"], env=env_for(self.tree), cwd=self.tree, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.ports['http']}/healthz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")
            if get(url, timeout=0.5) is not None:
                return time.perf_counter() - t0
            time.sleep(0.01)

    def ready(self) -> float:
        """Seconds from exec to the first /readyz 200 (every node's templates checked)."""
        url = f"http://127.0.0.1:{self.ports['http']}/readyz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except OSError:
                pass
            if time.perf_counter() - self.t0 > 900:
                raise RuntimeError("daemon never ready")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def timed_reload(self, change) -> float:
        """Seconds from ``change()`` to the ok-reload counter moving (the watcher's notice
        included)."""
        http = self.ports["http"]
        before = reloads_ok(http)
        t0 = time.perf_counter()
        change()
        while reloads_ok(http) <= before:
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("reload did not finish")
            time.sleep(0.005)
        return time.perf_counter() - t0


class Prober:
    """Paced requests of one protocol from a thread; (send time, latency) of each answered
    one, and how many got no answer within 0.5 s."""

    name = ""

    def __init__(self, port: int, macs: list[str], rate: float) -> None:
        self.port, self.macs, self.rate = port, macs, rate
        self.samples: list[tuple[float, float]] = []
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def ask(self, i: int) -> None:
        """One request and its answer (raises TimeoutError/OSError when none came)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`ask` kept open."""

    def _run(self) -> None:
        interval, nxt, i = 1.0 / self.rate, time.perf_counter(), 0
        while not self._stop.is_set():
            nxt += interval
            i += 1
            t0 = time.perf_counter()
            try:
                self.ask(i)
                self.samples.append((t0, time.perf_counter() - t0))
            except OSError:  # TimeoutError included: no answer within 0.5 s
                self.lost += 1
            delay = nxt - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.perf_counter()
        self.close()


class DhcpProber(Prober):
    """Port-4011 boot-server requests for inventory MACs (the proxy-DHCP loop)."""

    name = "DHCP"

    def __init__(self, port: int, macs: list[str], rate: float) -> None:
        from netbootd.dhcp import clients

        super().__init__(port, macs, rate)
        self.reqs = [clients.pxe_bootserver_request(m, 0, "127.0.0.1") for m in macs]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)

    def ask(self, i: int) -> None:
        xid = 0x5000 + i
        p = self.reqs[i % len(self.reqs)]
        self.sock.sendto(p[:4] + xid.to_bytes(4, "big") + p[8:], ("127.0.0.1", self.port))
        while int.from_bytes(self.sock.recv(4096)[4:8], "big") != xid:
            pass

    def close(self) -> None:
        self.sock.close()


class TftpProber(Prober):
    """A read request for the BIOS iPXE loader, to its first data block, then an error
    that ends the transfer (the TFTP engine and its file lookup)."""

    name = "TFTP"

    def ask(self, i: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(0.5)
            s.sendto(b"\x00\x01undionly.kpxe\x00octet\x00", ("127.0.0.1", self.port))
            data, peer = s.recvfrom(1024)
            if data[:2] not in (b"\x00\x03", b"\x00\x05"):  # DATA, or an ERROR answer
                raise OSError(f"unexpected TFTP answer {data[:4]!r}")
            if data[:2] == b"\x00\x03":
                s.sendto(b"\x00\x05\x00\x00done\x00", peer)


class HttpProber(Prober):
    """The per-MAC iPXE script of inventory MACs, on one kept-alive connection (the HTTP
    server, the planner and the renderer)."""

    name = "HTTP"

    def __init__(self, port: int, macs: list[str], rate: float) -> None:
        import http.client

        super().__init__(port, macs, rate)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)

    def ask(self, i: int) -> None:
        self.conn.request("GET", f"/ipxe?mac={self.macs[i % len(self.macs)]}")
        r = self.conn.getresponse()
        r.read()
        if r.status != 200:
            raise OSError(f"HTTP {r.status}")

    def close(self) -> None:
        self.conn.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(tree: Path, cfg: Path, n: int, rate: float) -> dict:
    out: dict = {"check": time_check(tree, cfg)}
    progress(f"  check {out['check']:.2f} s")
    state = cfg.parent / f"state-{n}"
    state.mkdir(exist_ok=True)
    for pattern in (".render-check*", ".inventory-snapshot*"):  # cold: nothing saved
        for f in state.glob(pattern):
            f.unlink()
    d = Daemon(tree, cfg)
    try:
        out["start_cold"] = d.start()
        out["ready_cold"] = d.ready()
        out["rss"] = rss_mb(d.proc.pid)
        progress(f"  start-up (cold) {out['start_cold']:.2f} s, ready {out['ready_cold']:.2f} s, "
                 f"RSS {out['rss']:.0f} MB")
    finally:
        d.stop()
    d = Daemon(tree, cfg)
    try:
        out["start_warm"] = d.start()
        out["ready_warm"] = d.ready()  # reloads are timed on a daemon that is ready
        progress(f"  start-up (warm) {out['start_warm']:.2f} s, ready {out['ready_warm']:.2f} s")
        head = (cfg / "nodes.head").read_text()
        edited = nodes_yaml(n, head, edit=n // 2 + 1)

        def one_node() -> None:
            tmp = cfg / ".nodes.yaml.tmp"
            tmp.write_text(edited)
            os.replace(tmp, cfg / "nodes.yaml")

        out["reload_one"] = d.timed_reload(one_node)
        progress(f"  reload, one node edited: {out['reload_one']:.3f} s")
        tpl = cfg / "templates" / "cloud-init" / "meta-data.j2"
        text = tpl.read_text()

        def every_node() -> None:
            tmp = tpl.with_name(".meta-data.j2.tmp")
            tmp.write_text(text + f"# edited {time.time()}\n")
            os.replace(tmp, tpl)

        # x86 machines that netboot (a silent `local` node would only time out)
        macs = [mac_of(i) for i in range(1, n, 2) if i % 10 != 9][:256]
        ports = ports_of(cfg)
        probers = [DhcpProber(ports["pxe"], macs, rate),
                   TftpProber(ports["tftp"], macs, rate / 4),
                   HttpProber(ports["http"], macs, rate / 4)]
        with contextlib.ExitStack() as running:
            for prober in probers:
                running.enter_context(prober)
            time.sleep(2.0)
            t_start = time.perf_counter()
            out["reload_all"] = d.timed_reload(every_node)
            t_end = time.perf_counter()
            time.sleep(0.5)
        for prober in probers:
            key = prober.name.lower()
            during = [lat for t, lat in prober.samples if t_start + STEP <= t <= t_end]
            quiet = [lat for t, lat in prober.samples if t < t_start][-max(len(during), 50):]
            out[key] = {"p50_quiet": pct(quiet, .5) * 1e6, "p99_quiet": pct(quiet, .99) * 1e6,
                        "p50_reload": pct(during, .5) * 1e6,
                        "p99_reload": pct(during, .99) * 1e6,
                        "max_reload": max(during, default=float("nan")) * 1e6,
                        "n_reload": len(during), "lost": prober.lost}
            r = out[key]
            progress(f"  {prober.name} p99 quiet {r['p99_quiet']:.0f} µs, during the reload "
                     f"{r['p99_reload']:.0f} µs (max {r['max_reload']:.0f} µs, "
                     f"{r['n_reload']} requests, lost {r['lost']})")
        progress(f"  reload, every node: {out['reload_all']:.3f} s")
    finally:
        d.stop()
    return out


def svg(results: dict[int, dict], path: Path) -> None:
    """Log-log plot of seconds against nodes, one line per measurement."""
    import math

    series = [("check", "netbootd check", "#1f77b4"), ("start_cold", "start-up, cold", "#d62728"),
              ("start_warm", "start-up, warm", "#ff7f0e"),
              ("ready_warm", "ready, warm", "#8c564b"),
              ("reload_all", "reload, template", "#2ca02c"),
              ("reload_one", "reload, one node", "#9467bd")]
    sizes = sorted(results)
    vals = [results[n][k] for n in sizes for k, _, _ in series if results[n].get(k, 0) > 0]
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    xlo, xhi = math.log10(sizes[0]), math.log10(sizes[-1])
    W, H, L, R, T, B = 640, 400, 70, 190, 30, 50

    def x(n: float) -> float:
        return L + (math.log10(n) - xlo) / max(xhi - xlo, 1e-9) * (W - L - R)

    def y(v: float) -> float:
        return H - B - (math.log10(v) - lo) / max(hi - lo, 1e-9) * (H - T - B)

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
              f'font-family="sans-serif" font-size="12">'),
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{L}" y="18" font-size="14">netbootd inventory scale (log-log)</text>']
    for e in range(lo, hi + 1):
        yy = y(10 ** e)
        parts.append(f'<line x1="{L}" y1="{yy:.1f}" x2="{W - R}" y2="{yy:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{L - 6}" y="{yy + 4:.1f}" text-anchor="end">{10.0 ** e:g} s</text>')
    for n in sizes:
        parts.append(f'<line x1="{x(n):.1f}" y1="{T}" x2="{x(n):.1f}" y2="{H - B}" stroke="#ddd"/>')
        parts.append(f'<text x="{x(n):.1f}" y="{H - B + 16}" text-anchor="middle">{n:,}</text>')
    parts.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 12}" text-anchor="middle">nodes in '
                 'nodes.yaml</text>')
    for i, (key, label, colour) in enumerate(series):
        pts = [(x(n), y(results[n][key])) for n in sizes if results[n].get(key, 0) > 0]
        if pts:
            d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{colour}" '
                         'stroke-width="2"/>')
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>'
                      for px, py in pts]
        ly = T + 20 + i * 20
        parts.append(f'<line x1="{W - R + 12}" y1="{ly}" x2="{W - R + 32}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{W - R + 38}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--baseline", type=Path, help="another worktree (e.g. main) to run too")
    p.add_argument("--baseline-max", type=int, default=10000,
                   help="largest size the baseline runs (its 100k takes minutes)")
    p.add_argument("--rate", type=float, default=200.0, help="proxy-DHCP probes per second")
    p.add_argument("--svg", type=Path, help="write a log-log plot of this tree's figures")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = [("new", REPO)] + ([("base", args.baseline.resolve())] if args.baseline else [])
    results: dict[str, dict[int, dict]] = {name: {} for name, _ in trees}
    for _, tree in trees:  # as installed: pip (and setup.sh) compile the modules once
        compile_modules(tree)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="inventory-bench-") as tmp:
        for n in sizes:
            cfg = make_config(Path(tmp), n)
            for name, tree in trees:
                if name == "base" and n > args.baseline_max:
                    continue
                progress(f"{n:,} nodes, {name} ({tree})")
                results[name][n] = measure(tree, cfg, n, args.rate)
    load_after = os.getloadavg()
    print(f"Machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, Python "
          f"{platform.python_version()}), {time.strftime('%Y-%m-%d %H:%M %Z')}; load average "
          f"{load[0]:.1f} before, {load_after[0]:.1f} after.\n")
    print("| nodes | code | check s | start-up cold s | start-up warm s | ready cold / warm s "
          "| RSS MB | reload one node s | reload, template edited s | DHCP p50 / p99 µs quiet "
          "| DHCP / TFTP / HTTP p50 / p99 / max µs during reload (n, lost) |")
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|---|---|")
    for n in sizes:
        for name, _ in trees:
            r = results[name].get(n)
            if r is None:
                continue
            print(f"| {n:,} | {name} | {r['check']:.2f} | {r['start_cold']:.2f} | "
                  f"{r['start_warm']:.2f} | {r['ready_cold']:.2f} / {r['ready_warm']:.2f} | "
                  f"{r['rss']:.0f} | {r['reload_one']:.3f} | "
                  f"{r['reload_all']:.3f} | {r['dhcp']['p50_quiet']:.0f} / "
                  f"{r['dhcp']['p99_quiet']:.0f} | " + "; ".join(
                      f"{k.upper()} {r[k]['p50_reload']:.0f} / {r[k]['p99_reload']:.0f} / "
                      f"{r[k]['max_reload']:.0f} ({r[k]['n_reload']}, {r[k]['lost']})"
                      for k in ("dhcp", "tftp", "http")) + " |")
    if args.svg:
        svg(results["new"], args.svg)
        progress(f"plot written to {args.svg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
