"""``netbootd lab``: the e2e lab as a one-command demo.

Builds (or reuses) the demo image, starts a lab in network namespaces (site DHCP server,
netbootd, and an NFS server when ganesha is installed), boots one QEMU guest from netbootd,
streams its serial console, prints where the status page is, and tears everything down on
exit or Ctrl-C. ``--arch arm64`` boots an arm64 board instead (QEMU's ``virt`` machine with
Debian's U-Boot, or AAVMF + netbootd's GRUB with ``--firmware uefi``). Nothing is added to the host's own network configuration; the status page
is reached through a loopback port forward (``--ui-port``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .forward import Forwarder
from .guests import Guest, ovmf_path, random_mac
from .netns import LabError, Topology
from .nfs import NfsServer
from .server import Netbootd
from .sitedhcp import SiteDhcp
from .tools import (
    ARM64_GUEST_TOOLS,
    ARM64_UEFI_TOOLS,
    GRUB_BUILDER,
    GUEST_TOOLS,
    LAB_TOOLS,
    NFS_TOOLS,
    REPO,
    drop_build,
    lab_problem,
    load_builder,
)

ANSI = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")
DEMO_CACHE = REPO / "images" / "cache" / "lab-demo"
#: What U-Boot prints when the extlinux append does not fit its bootargs buffer: it then
#: boots nothing, so the demo stops at once instead of waiting out --timeout.
OVERFLOW = "bootarg overflow"


def add_parser(sub: Any) -> None:
    """Register ``netbootd lab`` on the CLI's subparsers."""
    p = sub.add_parser("lab", help="boot a QEMU guest from netbootd in a throw-away network lab",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("amd64", "arm64"), default="amd64",
                   help="guest CPU: an x86 PC, or an arm64 board (QEMU virt, TCG)")
    p.add_argument("--firmware", choices=("bios", "uefi", "uboot"), default=None,
                   help="guest firmware: amd64 bios (SeaBIOS + iPXE ROM, the default) or uefi "
                   "(OVMF); arm64 uboot (Debian's U-Boot, the default) or uefi (AAVMF + "
                   "netbootd's GRUB)")
    p.add_argument("--no-nfs", action="store_true",
                   help="boot the initrd only, even if nfs-ganesha is installed")
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo image")
    p.add_argument("--out", type=Path, default=None,
                   help="where logs go (default: test-output/lab-demo-<time>)")
    p.add_argument("--ui-port", type=int, default=18080,
                   help="loopback port forwarded to the status page (0 = none)")
    p.add_argument("--once", action="store_true",
                   help="exit (and clean up) as soon as the guest has booted")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds the guest may take to boot (default 120, arm64 300)")
    p.set_defaults(func=run_lab)


def _say(msg: str) -> None:
    print(f"netbootd lab: {msg}", flush=True)


def demo_image(rebuild: bool = False, arch: str = "amd64") -> Path:
    """The cached demo build (images/cache/lab-demo/<version>), built when missing/invalid."""
    builder = load_builder()
    prefix = f"recipe{builder.RECIPE}-" + ("" if arch == "amd64" else f"{arch}-")
    if not rebuild and DEMO_CACHE.is_dir():
        for build in sorted(DEMO_CACHE.glob(prefix + "[0-9]*"), reverse=True):
            if (build / "manifest.json").exists() and not builder.verify_build(build):
                _say(f"reusing demo image {build.name}")
                return build
    DEMO_CACHE.mkdir(parents=True, exist_ok=True)
    version = builder.default_version()
    _say(f"building the demo image ({arch}: Debian cloud kernel + busybox initrd and rootfs)")
    return builder.build(name=_image_name(arch), version=version,
                         marker=f"netbootd lab demo {version}", pi=False,
                         cache=REPO / "images" / "cache", out=DEMO_CACHE / (prefix + version),
                         incoming=None, arch=arch)


def _image_name(arch: str) -> str:
    return "demo" if arch == "amd64" else f"demo-{arch}"


def _check_choice(args: argparse.Namespace) -> str | None:
    """Fill in the defaults of --firmware/--timeout; why the combination cannot run, or None."""
    arm = args.arch == "arm64"
    if args.firmware is None:
        args.firmware = "uboot" if arm else "bios"
    if args.timeout is None:
        args.timeout = 300.0 if arm else 120.0
    if arm and args.firmware == "bios":
        return "--arch arm64 boots with --firmware uboot or uefi"
    if not arm and args.firmware == "uboot":
        return "--firmware uboot is for --arch arm64"
    return None


def run_lab(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code (0 = the guest booted)."""
    problem = _check_choice(args)
    if problem:
        print(f"netbootd lab: {problem}", file=sys.stderr)
        return 2
    # NFS root whenever ganesha is there: both architectures' images carry a rootfs, and
    # U-Boot's extlinux append and GRUB's linux line name it as iPXE's script does.
    use_nfs = not args.no_nfs and lab_problem(NFS_TOOLS) is None
    tools = GUEST_TOOLS if args.arch == "amd64" else (
        ARM64_GUEST_TOOLS if args.firmware == "uboot" else ARM64_UEFI_TOOLS)
    problem = lab_problem(LAB_TOOLS + tools)
    if problem:
        print(f"netbootd lab: cannot run: {problem}", file=sys.stderr)
        return 1
    if args.arch == "amd64" and args.firmware == "uefi" and ovmf_path() is None:
        print("netbootd lab: UEFI needs OVMF: apt-get install ovmf", file=sys.stderr)
        return 1
    try:
        build = demo_image(args.rebuild, args.arch)
        grub = _grub_image() if args.arch == "arm64" and args.firmware == "uefi" else None
    except Exception as exc:  # noqa: BLE001 - builder errors carry their own advice
        print(f"netbootd lab: demo image build failed: {exc}", file=sys.stderr)
        return 1
    out = args.out or REPO / "test-output" / time.strftime("lab-demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with Topology() as lab:
            return _run(args, lab, out, build, use_nfs, grub)
    except KeyboardInterrupt:
        _say("interrupted; lab torn down")
        return 130
    except LabError as exc:
        print(f"netbootd lab: {exc}", file=sys.stderr)
        return 1
    finally:
        _say(f"logs kept in {out}")


def _grub_image() -> Path:
    """netbootd's GRUB for arm64 UEFI (images/grub/), built once by images/build_grub.py."""
    import subprocess

    out = REPO / "images" / "grub" / "grubnetaa64.efi"
    if not out.exists():
        _say("building the GRUB network image for arm64 UEFI")
        subprocess.run([sys.executable, str(GRUB_BUILDER), "--out", str(out)], check=True)
    return out


def _run(args: argparse.Namespace, lab: Topology, out: Path, build: Path,
         use_nfs: bool, grub: Path | None = None) -> int:
    _say(f"lab {lab.name}: namespaces {', '.join(lab.ns(r) for r in lab.roles)}; "
         f"network {lab.network}")
    SiteDhcp(lab, out).start()
    _say(f"site DHCP (dnsmasq) on {lab.ip('dhcp')}, pool {lab.pool[0]}-{lab.pool[1]}")
    settings: dict[str, Any] = {}
    if use_nfs:
        exports = out / "nfs" / "netbootd-exports.conf"
        nfs = NfsServer(lab, out, include=exports).start()
        settings["nfs"] = {"backend": "ganesha", "ganesha_config": str(exports),
                           "ganesha_pidfile": str(nfs.dir / "ganesha.pid")}
        _say(f"NFS server (rpcbind + ganesha) on {lab.ip('srv')}")
    if grub is not None:
        settings["tftp"] = {"extra_ipxe_dirs": ["/usr/lib/ipxe/qemu", str(grub.parent)]}
    mac = random_mac()
    image = _image_name(args.arch)
    node: dict[str, Any] = {"hostname": "demo-1", "image": image, "channel": "prod",
                            "vars": {"nfs_root": use_nfs}}
    if use_nfs:
        node["vars"]["cmdline"] = nfs.kernel_args
    nbd = Netbootd(lab, out, nodes={mac: node}, settings=settings).start()
    _say(f"netbootd on {lab.ip('srv')} (log {nbd.log})")
    version = json.loads((build / "manifest.json").read_text())["version"]
    drop_build(build, nbd.incoming)
    if not nbd.wait_active(image, version, timeout=60):
        raise LabError(f"{image} {version} was not activated; see {nbd.log}")
    _say(f"image {image} {version} active on prod")
    fwd = None
    if args.ui_port:
        try:
            fwd = Forwarder(lab.ns("srv"), (lab.ip("srv"), nbd.http_port), args.ui_port).start()
            _say(f"status page: http://127.0.0.1:{args.ui_port}/  (API: /api/v1/nodes)")
        except OSError as exc:
            _say(f"no status page forward on 127.0.0.1:{args.ui_port}: {exc}")
    _say(f"inside the lab: ip netns exec {lab.ns('srv')} curl {nbd.base_url}/api/v1/nodes")
    if args.arch == "arm64":
        guest = Guest.arm64(lab, out, firmware=args.firmware, mac=mac, name="demo-guest",
                            timeout=args.timeout + 3600)
        what = f"arm64 {'U-Boot' if args.firmware == 'uboot' else 'UEFI (AAVMF + GRUB)'}"
    else:
        guest = Guest.netboot(lab, out, firmware=args.firmware, mac=mac, name="demo-guest",
                              timeout=args.timeout + 3600)
        what = args.firmware.upper()
    _say(f"booting a {what} guest ({mac}); console follows")
    done = "NETBOOTD-TEST: reported provisioned" if use_nfs else "NETBOOTD-TEST: reported booted"
    try:
        guest.start()
        ok = _stream(guest, f"{done}|{OVERFLOW}", args.timeout)
        state = nbd.node(mac) or {}
        if OVERFLOW in guest.text():
            print(flush=True)  # the console stopped mid-line
            _say("U-Boot refused the kernel command line (512 bytes at most, docs/tftp.md); "
                 f"the NFS root path under {out} is part of it: try a shorter --out, or "
                 "--no-nfs")
            return 1
        if not ok:
            _say(f"the guest did not boot within {args.timeout:.0f}s; see {guest.console}")
            return 1
        _say(f"guest booted: phase {state.get('phase')}, image {state.get('image')} "
             f"{state.get('version')}, ip {state.get('ip')} in {guest.elapsed():.1f}s")
        if args.once:
            return 0
        _say("the guest keeps running; press Ctrl-C to stop and clean up")
        while guest.running():
            _stream(guest, r"(?!x)x", 3600)
        return 0
    finally:
        guest.stop()
        if fwd is not None:
            fwd.stop()
        nbd.stop()


def _stream(guest: Guest, done: str, timeout: float) -> bool:
    """Copy new console output to stdout until ``done`` (regex) appears or time runs out."""
    rx = re.compile(done)
    pos = getattr(guest, "_streamed", 0)
    deadline = time.monotonic() + timeout
    found = False
    while time.monotonic() < deadline and guest.running():
        try:
            with open(guest.console, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            chunk = b""
        if chunk:
            pos += len(chunk)
            text = ANSI.sub("", chunk.decode(errors="replace"))
            sys.stdout.write(text)
            sys.stdout.flush()
            if rx.search(guest.text()):
                found = True
                break
        time.sleep(0.2)
    guest._streamed = pos  # type: ignore[attr-defined]
    return found or bool(rx.search(guest.text()))


def main(argv: list[str] | None = None) -> int:
    """``python -m netbootd.lab.demo``: the same as ``netbootd lab``."""
    ap = argparse.ArgumentParser(prog="netbootd-lab")
    sub = ap.add_subparsers()
    add_parser(sub)
    args = ap.parse_args(["lab", *(argv if argv is not None else sys.argv[1:])])
    return run_lab(args)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("netbootd lab: needs root (network namespaces, taps)", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
