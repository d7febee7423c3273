"""Build the Containerfile with podman and smoke-test the appliance (container.md).

Everything podman makes lives in a temp storage root (``--root``/``--runroot``), so
the machine is left as it was. The container runs with the network namespace of
a namespace this test creates, so it binds the real ports (67, 69, 8080) with
its default command without touching the host's network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from netbootd.lab.netns import remove_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
BASE_TAG = "docker.io/library/debian:bookworm-slim"
CACHE = Path(os.environ.get("NETBOOTD_TEST_CACHE", "/var/tmp/netbootd-test-cache"))


def _missing_tools() -> list[str]:
    return [t for t in ("podman", "debootstrap", "runc", "ip") if shutil.which(t) is None]


def _mirror() -> str:
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.exists():
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def _base_tarball() -> Path:
    """A minimal bookworm rootfs tarball, made once and cached (no registry here)."""
    tar = CACHE / "debian-bookworm-minbase.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"rootfs-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), _mirror()],
                       check=True, capture_output=True, timeout=600)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        (root / "etc/apt/sources.list").write_text(
            f"deb {_mirror()} bookworm main\n")
        part = tar.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--exclude=./dev/*",
                        "--exclude=./proc/*", "--exclude=./sys/*", "-C", str(root), "-cf",
                        str(part), "."], check=True, timeout=300)
        part.rename(tar)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tar


@pytest.fixture
def podman(tmp_path: Path):
    missing = _missing_tools()
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root and {', '.join(missing) or 'podman'}")
    # podman refuses a runroot path longer than 50 characters: use a short temp dir.
    store = Path(tempfile.mkdtemp(prefix="nbd-podman-", dir="/var/tmp"))
    base = ["podman", "--root", str(store / "root"), "--runroot", str(store / "run"),
            "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]

    def run(*args: str, timeout: float = 900, check: bool = True, **kw):
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout,
                           check=False, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {args[0]} failed ({r.returncode}):\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    try:
        yield run
    finally:
        subprocess.run([*base, "rm", "-af"], capture_output=True, timeout=120, check=False)
        subprocess.run([*base, "system", "reset", "-f"], capture_output=True, timeout=120,
                       check=False)
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture
def netns():
    name = f"nbd-ctr-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        remove_namespaces([name])


def test_containerfile_builds_and_serves_healthz(podman, netns, tmp_path):
    tar = _base_tarball()
    with open(tar, "rb") as fh:
        podman("import", "--change", 'CMD ["/bin/bash"]', "-", BASE_TAG, stdin=fh)
    ca = "/etc/ssl/certs/ca-certificates.crt"
    build = ["build", "--network=host", "--pull=never", "-t", "localhost/netbootd:ci",
             "-f", str(REPO / "Containerfile")]
    if Path(ca).exists():
        build += ["-v", f"{ca}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "HTTPS_PROXY", "HTTP_PROXY"):
        if os.environ.get(var):
            build += ["--build-arg", f"{var}={os.environ[var]}"]
    r = podman(*build, str(REPO), check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    r = podman("run", "-d", "--network", f"ns:/run/netns/{netns}",
               "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
               "--cap-add", "NET_ADMIN,NET_RAW,NET_BIND_SERVICE", "localhost/netbootd:ci")
    cid = r.stdout.strip()
    try:
        ok = False
        for _ in range(150):
            probe = subprocess.run(
                ["ip", "netns", "exec", netns, "curl", "-fsS", "http://127.0.0.1:8080/healthz"],
                capture_output=True, text=True, check=False)
            if probe.returncode == 0:
                ok = True
                break
            time.sleep(0.2)
        logs = podman("logs", cid, check=False).stdout + podman("logs", cid, check=False).stderr
        assert ok, f"healthz never answered; container log:\n{logs[-4000:]}"
        # a real TFTP download: the image's iPXE binary, through a worker's C block loop
        got = subprocess.run(["ip", "netns", "exec", netns, "curl", "-fsS", "--tftp-blksize",
                              "1468", "-o", str(tmp_path / "undionly.kpxe"),
                              "tftp://127.0.0.1/undionly.kpxe"],
                             capture_output=True, text=True, check=False)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "undionly.kpxe").read_bytes() == \
            Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        t0 = time.monotonic()
        podman("stop", "-t", "10", cid)
        assert time.monotonic() - t0 < 5, "the daemon must stop on SIGTERM as PID 1"
    finally:
        podman("rm", "-f", cid, check=False)
