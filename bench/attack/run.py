#!/usr/bin/env python3
"""The attack run: a default-configured netbootd against the attacks docs/security.md
defends, one command, one table.

    sudo .venv/bin/python bench/attack/run.py [--flood-seconds 60] [--only idle,flood,...]

Everything runs in two network namespaces this script creates (lab.py: netbootd in
``nbda-<tag>-srv`` at 10.231.X.1, attacker and honest client in ``nbda-<tag>-atk``), and
only their addresses are ever targets; both namespaces, their veths and every process
are removed at the end, also on failure or Ctrl-C. Each attack gets a fresh daemon
(the shipped config/, its own store and state, the demo image active), and ends with
SIGTERM to the daemon's whole process group, timed until it has exited (target < 2 s).

- idle: nothing, then the stop (the baseline).
- flood: ``--flood-seconds`` of DHCP at ``--rate``/s (flood.py): random-MAC DISCOVERs and
  known-MAC REQUEST floods; the daemon's RSS sampled every 0.5 s, /healthz asked every 5 s.
- hog: the TFTP slot-hogging attack (hog.py: RRQs with ``timeout 255`` that never ACK, 64
  per source from 32 sources, a new round every 5 s) while tftp-hpa keeps fetching
  ipxe.efi from another address; stopped while the hog's transfers are still held.
- bomb: a 3 GiB zip bomb (bomb.py) renamed into incoming/: does it land in rejected/ with
  a reason, how long, how much RSS.
- secrets: spoofed REQUEST/INFORM/boot-server REQUEST with a known node's chaddr and the
  attacker's address (spoof.py), then the node's user-data from the attacker's address.

Progress goes to stderr, the markdown table to stdout (``--json FILE`` keeps the detail).
Bounded: the flood sends at most seconds x rate packets, the hog seconds/5 rounds of 2,048
RRQs; run it under ``flock /tmp/netbootd-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bomb import write_bomb
from lab import Daemon, World, default_config, demo_image, in_ns, script

ATTACKS = ("idle", "flood", "hog", "bomb", "secrets")
SRV, ATK = 1, 2
HOG_SOURCES = list(range(100, 132))  # 32 sources
KNOWN = ("d8:3a:dd:12:34:56", "52:54:00:a0:00:01")  # nodes of the shipped nodes.yaml
VICTIM = "52:54:00:a0:00:01"  # x86-worker-1: its user-data reads secrets (kubeadm token)
IPXE = Path("/usr/lib/ipxe/ipxe.efi")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, world: World, out: Path, args: argparse.Namespace) -> None:
        self.w, self.out, self.args = world, out, args

    def fresh(self, name: str) -> Daemon:
        d = self.out / name
        d.mkdir(parents=True)
        cfg = default_config(d)
        demo_image(cfg)
        self.images = d / "images"
        progress(f"{name}: starting netbootd")
        return Daemon(self.w, cfg, d / "netbootd.log").start()

    def url(self, path: str) -> str:
        return f"http://{self.w.ip(SRV)}:8080{path}"

    def http(self, path: str, timeout: float = 10) -> tuple[int, str]:
        p = in_ns(self.w, "atk", ["curl", "-s", "-m", str(timeout), "-o", "-", "-w",
                                  "\n%{http_code}", self.url(path)], timeout=timeout + 5)
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body

    def metrics(self, *prefixes: str) -> dict[str, float]:
        _code, body = self.http("/metrics")
        out = {}
        for line in body.splitlines():
            if line.startswith(prefixes) and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    continue
        return out

    # -- the attacks ---------------------------------------------------------------------
    def idle(self) -> dict[str, Any]:
        daemon = self.fresh("idle")
        time.sleep(2)
        rss = daemon.rss_mb()
        return {"rss_mb": round(rss[0], 1), "stop": daemon.stop()}

    def flood(self) -> dict[str, Any]:
        daemon = self.fresh("flood")
        time.sleep(1)
        base = daemon.rss_mb()
        argv = [*script("flood.py"), self.w.ip(SRV), "--seconds", str(self.args.flood_seconds),
                "--rate", str(self.args.rate), "--known", ",".join(KNOWN)]
        progress(f"flood: {self.args.flood_seconds:.0f} s at {self.args.rate:.0f}/s")
        gen = subprocess.Popen([*self.w.prefix("atk"), *argv], stdout=subprocess.PIPE,
                               text=True)
        samples: list[tuple[float, float, float]] = []
        health: list[int] = []
        askers: list[threading.Thread] = []
        t0 = time.monotonic()
        next_health = t0 + 5
        while gen.poll() is None:
            own, total = daemon.rss_mb()
            samples.append((time.monotonic() - t0, own, total))
            if time.monotonic() >= next_health:
                next_health += 5
                # /healthz must answer during the flood; how fast is the table's business,
                # so a loaded machine gets a generous bound and every answer is awaited
                askers.append(threading.Thread(
                    target=lambda: health.append(self.http("/healthz", 30)[0]), daemon=True))
                askers[-1].start()
            time.sleep(0.5)
        sent = json.loads(gen.stdout.read() or "{}")
        for asker in askers:
            asker.join()
        time.sleep(1)
        after = daemon.rss_mb()
        m = self.metrics("netbootd_table_evictions_total", "netbootd_dhcp_replies_total",
                         "netbootd_event_nodes", "netbootd_ignored_machine",
                         'netbootd_requests_total{service="dhcp"')
        peak = max(samples, key=lambda s: s[1])
        by_quarter = {}
        for q in (0.25, 0.5, 0.75, 1.0):
            upto = [s[1] for s in samples if s[0] <= q * self.args.flood_seconds]
            by_quarter[f"{q * self.args.flood_seconds:.0f}s"] = round(max(upto), 1) if upto else None
        return {"generator": sent, "rss_base_mb": round(base[0], 1),
                "rss_peak_mb": round(peak[1], 1), "rss_peak_at_s": round(peak[0], 1),
                "rss_peak_with_workers_mb": round(max(s[2] for s in samples), 1),
                "rss_after_mb": round(after[0], 1), "rss_max_by_time": by_quarter,
                "healthz": health, "metrics": m, "stop": daemon.stop()}

    def fetch(self, dest: Path) -> tuple[bool, float]:
        dest.unlink(missing_ok=True)
        t0 = time.monotonic()
        try:
            in_ns(self.w, "atk", ["tftp", "-m", "binary", self.w.ip(SRV), "-c", "get",
                                  "ipxe.efi", str(dest)], timeout=60)
        except subprocess.TimeoutExpired:
            return False, time.monotonic() - t0
        took = time.monotonic() - t0
        ok = dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == self.ipxe_sha
        return ok, took

    def hog(self) -> dict[str, Any]:
        self.ipxe_sha = hashlib.sha256(IPXE.read_bytes()).hexdigest()
        daemon = self.fresh("hog")
        dest = self.out / "hog" / "fetched.efi"
        baseline = [self.fetch(dest) for _ in range(3)]
        seconds = self.args.hog_seconds
        argv = [*script("hog.py"), self.w.ip(SRV),
                "--sources", ",".join(self.w.ip(h) for h in HOG_SOURCES),
                "--per-source", "64", "--seconds", str(seconds), "--every", "5",
                "--hold-after", "20"]
        progress(f"hog: {len(HOG_SOURCES)} sources x 64 RRQs every 5 s for {seconds:.0f} s, "
                 "tftp-hpa fetching meanwhile")
        gen = subprocess.Popen([*self.w.prefix("atk"), *argv], stdout=subprocess.PIPE,
                               text=True)
        time.sleep(1)  # the first round is in
        during: list[tuple[bool, float]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            during.append(self.fetch(dest))
        m = {k: v for k, v in self.metrics("netbootd_requests_total",
                                           "netbootd_active_transfers").items()
             if 'service="tftp"' in k}
        progress("hog: stopping netbootd while the hog's transfers are held")
        stop = daemon.stop()
        gen.wait(60)
        times = [t for ok, t in during if ok]
        return {"generator": json.loads(gen.stdout.read() or "{}"),
                "baseline_s": [round(t, 2) for _, t in baseline],
                "fetches": len(during), "fetches_ok": sum(ok for ok, _ in during),
                "fetch_p50_s": round(statistics.median(times), 2) if times else None,
                "fetch_max_s": round(max(times), 2) if times else None,
                "metrics": m, "stop": stop}

    def bomb(self) -> dict[str, Any]:
        daemon = self.fresh("bomb")
        work = self.out / "bomb" / "work"
        work.mkdir()
        built = write_bomb(work / "bomb-1.tar.zst", work, unpacked=3 << 30)
        size = built.stat().st_size
        peak = daemon.rss_mb()[0]
        progress(f"bomb: {size / 1000:.1f} KB unpacking to 3 GiB, renamed into incoming/")
        t0 = time.monotonic()
        os.replace(built, self.images / "incoming" / "bomb-1.tar.zst")
        dropped = self.images / "incoming" / "bomb-1.tar.zst"
        reason_file = self.images / "rejected" / "bomb-1.tar.zst.reason"
        staging_peak = 0
        took = None
        # the refusal is whole once its reason is written *and* the drop has left
        # incoming/ (the reason comes first); the bound only keeps a broken daemon finite
        while time.monotonic() - t0 < 600:
            if took is None and reason_file.exists():
                took = time.monotonic() - t0
            if took is not None and not dropped.exists():
                break
            peak = max(peak, daemon.rss_mb()[0])
            staging_peak = max(staging_peak, _du(self.images / "staging"))
            time.sleep(0.1)
        rejected = sorted(p.name for p in (self.images / "rejected").iterdir())
        return {"archive_bytes": size,
                "rejected_after_s": None if took is None else round(took, 2),
                "rejected": rejected,
                "reason": _reason(reason_file),
                "still_in_incoming": dropped.exists(),
                "staging_peak_bytes": staging_peak, "rss_peak_mb": round(peak, 1),
                "stop": daemon.stop()}

    def secrets(self) -> dict[str, Any]:
        daemon = self.fresh("secrets")
        attacker = self.w.ip(ATK)
        before = self.http(f"/cloud-init/{VICTIM}/user-data")[0]
        p = in_ns(self.w, "atk", [*script("spoof.py"), self.w.ip(SRV), "--mac", VICTIM,
                                  "--claim", attacker, "--repeat", "5"], timeout=60)
        spoof = json.loads(p.stdout or "{}")
        time.sleep(1)
        after = self.http(f"/cloud-init/{VICTIM}/user-data")
        meta = self.http(f"/cloud-init/{VICTIM}/meta-data")[0]
        by_addr = self.http("/cloud-init/by-address/user-data")[0]
        token = (Path(daemon.config).parent / "secrets" / "kubeadm-token").read_text().strip()
        return {"spoof": spoof, "user_data_before": before, "user_data_after": after[0],
                "secret_in_body": bool(token) and token in after[1],
                "meta_data": meta, "by_address_user_data": by_addr, "stop": daemon.stop()}


def _reason(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return str(json.loads(text).get("reason", text))
    except ValueError:
        return text.strip()


def _du(path: Path) -> int:
    """Bytes on disk under `path` *while the daemon is changing it*: staging directories
    come and go between listing and stat, so every vanished entry counts as nothing
    (os.walk skips directories it cannot list; rglob raises on them)."""
    total = 0
    for cur, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(cur, name)).st_blocks * 512
            except OSError:
                continue
    return total


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> str:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {mem} MiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def stop_cell(r: dict[str, Any]) -> str:
    s = r["stop"]
    clean = (s["exit"] == 0 and not s["workers_left"] and not s["error_lines"])
    return (f"{s['stop_s']:.2f} s, exit {s['exit']}, "
            f"{'clean' if clean else 'NOT CLEAN: ' + json.dumps(s)[:200]}")


def table(res: dict[str, dict[str, Any]]) -> str:
    rows = ["| attack | result | stop after it (SIGTERM to the group) |", "|---|---|---|"]
    if "idle" in res:
        rows.append(f"| idle | RSS {res['idle']['rss_mb']} MiB | {stop_cell(res['idle'])} |")
    if "flood" in res:
        r = res["flood"]
        g = r["generator"]
        ev = {k.split("{", 1)[1].rstrip("}"): int(v) for k, v in r["metrics"].items()
              if k.startswith("netbootd_table_evictions_total")}
        ok = sum(1 for c in r["healthz"] if c == 200)
        rows.append(
            f"| DHCP flood, {g.get('seconds')} s at {g.get('rate')}/s: "
            f"{g.get('random_mac_discovers')} random-MAC DISCOVERs, "
            f"{g.get('known_mac_requests')} known-MAC REQUESTs | RSS {r['rss_base_mb']} -> "
            f"peak {r['rss_peak_mb']} MiB at {r['rss_peak_at_s']} s (max by time "
            f"{r['rss_max_by_time']}), {r['rss_after_mb']} MiB after; with workers "
            f"{r['rss_peak_with_workers_mb']} MiB; evictions {ev or 'none'}; /healthz "
            f"{ok}/{len(r['healthz'])} ok | {stop_cell(r)} |")
    if "hog" in res:
        r = res["hog"]
        g = r["generator"]
        tftp = {k.split('outcome="', 1)[1].split('"')[0]: int(v)
                for k, v in r["metrics"].items() if 'outcome="' in k}
        held = int(r["metrics"].get('netbootd_active_transfers{service="tftp"}', 0))
        rows.append(
            f"| TFTP slot hog: {g.get('rrqs')} RRQs (timeout 255, never ACKed) from "
            f"{g.get('sources')} sources x {g.get('per_source')}, {g.get('rounds')} rounds | "
            f"tftp-hpa got ipxe.efi {r['fetches_ok']}/{r['fetches']} times during it "
            f"(p50 {r['fetch_p50_s']} s, max {r['fetch_max_s']} s; before: "
            f"{r['baseline_s']} s); {held} transfers open at the end; outcomes {tftp} | {stop_cell(r)} |")
    if "bomb" in res:
        r = res["bomb"]
        rows.append(
            f"| zip bomb, {r['archive_bytes'] / 1000:.0f} KB -> 3 GiB, into incoming/ | "
            f"in rejected/ after {r['rejected_after_s']} s ({', '.join(r['rejected'])}): "
            f"\"{(r['reason'] or 'NO REASON')[:160]}\"; staging peak "
            f"{r['staging_peak_bytes'] // 1024} KiB, RSS peak {r['rss_peak_mb']} MiB | "
            f"{stop_cell(r)} |")
    if "secrets" in res:
        r = res["secrets"]
        rows.append(
            f"| spoofed REQUEST/INFORM with {VICTIM}'s chaddr ({r['spoof'].get('sent')} "
            f"packets), then its user-data from the attacker | user-data {r['user_data_before']}"
            f" before, {r['user_data_after']} after (secret in body: {r['secret_in_body']}); "
            f"meta-data {r['meta_data']}; by-address user-data {r['by_address_user_data']} | "
            f"{stop_cell(r)} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flood-seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--hog-seconds", type=float, default=30.0)
    ap.add_argument("--only", default=",".join(ATTACKS))
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--keep", type=Path, help="keep configs and daemon logs in this directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "tftp", "curl") if shutil.which(t) is None]
    if missing or not IPXE.exists():
        print(f"missing: {missing or IPXE}", file=sys.stderr)
        return 2
    chosen = [a for a in ATTACKS if a in args.only.split(",")]
    out = args.keep or Path(tempfile.mkdtemp(prefix="netbootd-attack-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results: dict[str, dict[str, Any]] = {}
    load_before = load()
    try:
        with World(extra_atk_hosts=HOG_SOURCES) as world:
            run = Run(world, out, args)
            for name in chosen:
                results[name] = getattr(run, name)()
                progress(f"{name}: done, stop {results[name]['stop']['stop_s']} s")
            leftovers = world
        left = leftovers.leftovers()
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    meta = {"started": started, "machine": machine(), "load_before": load_before,
            "load_after": load(), "namespaces_left": left}
    print(f"{meta['machine']}\nstarted {started}; load average before {load_before}, "
          f"after {meta['load_after']}; namespaces left: {left or 'none'}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
