"""Fixtures for the netboot lab (namespaces, site DHCP, NFS, QEMU guests, netbootd).

Fixtures (all fail with the reason when not root or a tool is missing; never skip):

* ``lab_out``      test-output/<test>/: serial logs, dnsmasq/ganesha/netbootd logs, pcaps.
                   Kept after the run; on failure its path and log tails are printed.
* ``netlab``       a fresh :class:`netbootd.lab.netns.Topology` (sw/dhcp/srv/pi namespaces);
                   after the test, asserts nothing of it is left (namespaces, processes).
* ``site_dhcp``    dnsmasq-base started in ``netlab``'s dhcp namespace.
* ``boot_image``   session: the test image (kernel+initrd+rootfs), version ``e2e-1``.
* ``make_image``   session factory: ``make_image(version, marker=None, pi=False,
                   arch="amd64")`` -> build dir (``arch="arm64"``: the arm64 test image).
* ``lab_netbootd`` factory: ``lab_netbootd(nodes={...}, **kw)`` -> started
                   :class:`netbootd.lab.server.Netbootd` in ``netlab``'s srv namespace.
* ``lab_nfs``      factory: ``lab_nfs(static_exports=[...])`` -> started NfsServer.
* ``boot_lab``     factory: ``boot_lab(nodes={mac: {...}})`` -> BootLab (lab, site DHCP,
                   pcap of the srv namespace, netbootd); ``.publish(build)`` drops a build
                   into incoming/ and waits until it is active; ``.guest("bios"|"uefi")``.

Module-scoped, for tests that share one slow set-up (the provisioning tests: one lab, one
golden build, several guests):

* ``module_out``   test-output/<module>/, kept after the run.
* ``module_lab``   a Topology for the whole module; asserts nothing is left afterwards.
* ``make_golden``  session factory: ``make_golden(version, seed_url, size_mib=None)`` -> build dir of
                   images/build_golden.py (debootstrap tree cached in images/cache).
* ``make_installer`` session factory: ``make_installer(version)`` -> images/build_installer.py
                   build named ``installer``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netbootd.lab.capture import Capture
from netbootd.lab.guests import Guest
from netbootd.lab.netns import Topology, cleanup_stale
from netbootd.lab.nfs import NfsServer
from netbootd.lab.server import Netbootd
from netbootd.lab.sitedhcp import SiteDhcp
from netbootd.lab.tools import (
    GUEST_TOOLS,
    LAB_TOOLS,
    NFS_TOOLS,
    REPO,
    load_builder,
    require,
)

OUTPUT = REPO / "test-output"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def lab_out(request: pytest.FixtureRequest) -> Iterator[Path]:
    require([])  # root: fails, never skips
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::", 1)[-1])[:120]
    out = OUTPUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    yield out
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n=== lab artefacts kept in {out}")
        for log in sorted(out.rglob("*.log")):
            text = log.read_text(errors="replace").strip().splitlines()
            if not text:
                continue
            print(f"--- {log.relative_to(out)} (last 25 lines)")
            for line in text[-25:]:
                print("   ", line[:200])


#: test-output/ is kept for people to read after a run; beyond this, oldest entries go.
OUTPUT_BUDGET = 500 * 1000 * 1000


def prune_output(root: Path = OUTPUT, budget: int = OUTPUT_BUDGET) -> list[Path]:
    """Delete the oldest entries of test-output/ until it fits ``budget`` bytes."""
    if not root.is_dir():
        return []
    sizes = []
    for entry in root.iterdir():
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes.append((entry.stat().st_mtime, entry,
                      sum(p.lstat().st_size for p in files)))
    total = sum(s for _, _, s in sizes)
    removed = []
    for _, entry, size in sorted(sizes, key=lambda t: t[0]):
        if total <= budget:
            break
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        total -= size
        removed.append(entry)
    return removed


@pytest.fixture(scope="session", autouse=True)
def _output_bounded() -> Iterator[None]:
    prune_output()
    yield
    prune_output()


@pytest.fixture(scope="session")
def _stale_labs_removed() -> None:
    """Namespaces of a run that was SIGKILLed (no process left, over an hour old)."""
    cleanup_stale()


@pytest.fixture
def netlab(_stale_labs_removed: None) -> Iterator[Topology]:
    require(LAB_TOOLS)
    lab = Topology().up()
    try:
        yield lab
    finally:
        lab.close()
    left = lab.leftovers()
    assert not left, f"lab {lab.name} left behind: {left}"


@pytest.fixture
def site_dhcp(netlab: Topology, lab_out: Path) -> Iterator[SiteDhcp]:
    dhcp = SiteDhcp(netlab, lab_out).start()
    try:
        yield dhcp
    finally:
        dhcp.stop()


@pytest.fixture(scope="session")
def make_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build test images (kernel cached in images/cache). Same version twice = same dir."""
    require([])  # root
    builder = load_builder()
    root = tmp_path_factory.mktemp("images")
    built: dict[tuple[str, str, bool, str], Path] = {}

    def make(version: str, marker: str | None = None, *, name: str | None = None,
             pi: bool = False, pi_scale: float = 0.05, arch: str = "amd64") -> Path:
        name = name or ("pi-e2e" if pi else "demo")
        key = (name, version, pi, arch)
        if key not in built:
            require(GUEST_TOOLS if not pi else [])
            try:
                built[key] = builder.build(
                    name=name, version=version, marker=marker or f"{name}-{version}", pi=pi,
                    cache=REPO / "images" / "cache", out=root / f"{name}-{version}",
                    incoming=None, pi_scale=pi_scale, arch=arch)
            except builder.BuildError as exc:
                pytest.fail(f"test image cannot be built: {exc}")
        return built[key]

    return make


@pytest.fixture(scope="session")
def boot_image(make_image: Callable[..., Path]) -> Path:
    return make_image("e2e-1")


@pytest.fixture
def lab_nfs(netlab: Topology, lab_out: Path) -> Iterator[Callable[..., NfsServer]]:
    servers: list[NfsServer] = []

    def start(**kw: Any) -> NfsServer:
        require(NFS_TOOLS)
        srv = NfsServer(netlab, lab_out, **kw).start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def lab_netbootd(netlab: Topology, lab_out: Path) -> Iterator[Callable[..., Netbootd]]:
    daemons: list[Netbootd] = []

    def start(**kw: Any) -> Netbootd:
        d = Netbootd(netlab, lab_out, **kw)
        daemons.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in daemons:
            d.stop()


@dataclass
class BootLab:
    """A lab with site DHCP, a pcap in srv, and netbootd serving the given images."""

    lab: Topology
    out: Path
    dhcp: SiteDhcp
    nbd: Netbootd
    cap: Capture

    def guest(self, firmware: str = "bios", **kw: Any) -> Guest:
        return Guest.netboot(self.lab, self.out, firmware=firmware, **kw)

    def arm64_guest(self, firmware: str = "uboot", **kw: Any) -> Guest:
        return Guest.arm64(self.lab, self.out, firmware=firmware, **kw)

    def publish(self, build: Path, timeout: float = 30) -> str:
        """Drop a build into netbootd's incoming/ and wait until it is active on prod."""
        return self.nbd.publish(build, timeout=timeout)


@pytest.fixture
def boot_lab(netlab: Topology, site_dhcp: SiteDhcp, lab_out: Path,
             lab_netbootd: Callable[..., Netbootd]) -> Iterator[Callable[..., BootLab]]:
    """Factory: ``boot_lab(nodes={mac: {...}}, **netbootd_kw)`` -> :class:`BootLab`."""
    require(GUEST_TOOLS)
    caps: list[Capture] = []

    def start(**kw: Any) -> BootLab:
        cap = Capture(netlab, "srv", lab_out / "srv.pcap").start()
        caps.append(cap)
        return BootLab(netlab, lab_out, site_dhcp, lab_netbootd(**kw), cap)

    try:
        yield start
    finally:
        for c in caps:
            c.stop()


# ------------------------------------------------------------------ module-scoped (provisioning)

@pytest.fixture(scope="module")
def module_out(request: pytest.FixtureRequest) -> Path:
    require([])  # root: fails, never skips
    out = OUTPUT / Path(str(request.node.path)).stem
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@pytest.fixture(scope="module")
def module_lab(_stale_labs_removed: None, module_out: Path) -> Iterator[Topology]:
    require(LAB_TOOLS)
    lab = Topology().up()
    try:
        yield lab
    finally:
        lab.close()
    left = lab.leftovers()
    assert not left, f"lab {lab.name} left behind: {left}"


def _load_images_module(name: str) -> Any:
    import importlib.util
    import sys

    images = REPO / "images"
    sys.path.insert(0, str(images))  # build_golden imports build_image by name
    try:
        spec = importlib.util.spec_from_file_location(f"netbootd_{name}", images / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(images))


@pytest.fixture(scope="session")
def make_golden(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Golden disk builds (images/build_golden.py). The debootstrap tree is cached in
    images/cache/golden (made here when missing: minutes); a build from it takes seconds
    plus zstd. Same (name, version, seed_url) twice = same build."""
    require(["debootstrap", "mkfs.ext4", "mkfs.fat", "mcopy", "syslinux", "sfdisk", "zstd",
            "dd"])
    bg = _load_images_module("build_golden")
    root = tmp_path_factory.mktemp("golden")
    built: dict[tuple[str, str, str, int | None], Path] = {}

    def make(version: str, seed_url: str, *, name: str = "gold",
             size_mib: int | None = None) -> Path:
        key = (name, version, seed_url, size_mib)
        if key not in built:
            built[key] = bg.build(name=name, version=version, seed_url=seed_url,
                                  cache=REPO / "images" / "cache", size_mib=size_mib,
                                  out=root / f"{name}-{version}-{len(built)}", incoming=None)
        return built[key]

    return make


@pytest.fixture(scope="session")
def make_installer(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The installer image (images/build_installer.py), named ``installer``."""
    require(["busybox", "zstd", "openssl", "apt-get", "dpkg-deb", "depmod"])
    bi = _load_images_module("build_installer")
    root = tmp_path_factory.mktemp("installer")
    built: dict[str, Path] = {}

    def make(version: str = "e2e-1") -> Path:
        if version not in built:
            built[version] = bi.build(name="installer", version=version,
                                      cache=REPO / "images" / "cache",
                                      out=root / f"installer-{version}", incoming=None)
        return built[version]

    return make
