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


@pytest.fixture
def podman(tmp_path: Path):
    missing = _missing_tools()
    if os.geteuid() != 0 or missing:
        pytest.fail(f"needs root and {', '.join(missing) or 'podman'} "
                    "(apt-get install podman buildah debootstrap runc)")
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

    run.global_args = base[1:]  # type: ignore[attr-defined]
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
    # the documented offline build: debootstrap base, --format docker, --pull=never
    env = {**os.environ, "PODMAN_ARGS": " ".join(a for a in podman.global_args
                                                 if a not in ("--runtime", "runc")),
           "NETBOOTD_IMAGE_TAG": "localhost/netbootd:ci", "NETBOOTD_BASE_CACHE": str(CACHE)}
    r = subprocess.run([str(REPO / "setup.sh"), "container"], capture_output=True, text=True,
                       timeout=1800, check=False, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "--ulimit nofile=" in r.stderr  # it prints the run command

    size = int(podman("image", "inspect", "--format", "{{.Size}}",
                      "localhost/netbootd:ci").stdout.strip())
    assert size < 250_000_000, f"image is {size / 1e6:.0f} MB"
    # this VM refuses podman's default nofile limit, and has no systemd to time health
    # checks: both are said explicitly (docs/container.md)
    limits = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096",
              "--health-interval", "disable"]
    tools = podman("run", "--rm", "--network", "none", *limits, "--entrypoint", "sh",
                   "localhost/netbootd:ci", "-c", "command -v gcc cc ld as; true")
    assert tools.stdout.strip() == "", f"compiler toolchain left in the image: {tools.stdout}"
    hc = podman("image", "inspect", "localhost/netbootd:ci").stdout
    assert '"Healthcheck"' in hc and "/healthz" in hc, "no HEALTHCHECK in the image (OCI format?)"

    r = podman("run", "-d", "--network", f"ns:/run/netns/{netns}", *limits,
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
        # the image's own HEALTHCHECK, run by podman (no systemd timer here): healthy
        hc_run = podman("healthcheck", "run", cid, check=False)
        assert hc_run.returncode == 0, hc_run.stdout + hc_run.stderr
        status = podman("inspect", "--format", "{{.State.Health.Status}}", cid,
                        check=False).stdout.strip()
        if not status or status.startswith("<"):
            status = podman("inspect", "--format", "{{.State.Healthcheck.Status}}", cid,
                            check=False).stdout.strip()
        assert status == "healthy", status
        # a real TFTP download: the image's iPXE binary, through a worker's C block loop
        got = subprocess.run(["ip", "netns", "exec", netns, "curl", "-fsS", "--tftp-blksize",
                              "1468", "-o", str(tmp_path / "undionly.kpxe"),
                              "tftp://127.0.0.1/undionly.kpxe"],
                             capture_output=True, text=True, check=False)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "undionly.kpxe").read_bytes() == \
            Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        # the importer's tools are in the image
        tools = podman("exec", cid, "/opt/venv/bin/python", "-c",
                       "from netbootd.store.importer import _tool; "
                       "print(_tool('mcopy'), _tool('debugfs'))")
        assert "mcopy" in tools.stdout and "debugfs" in tools.stdout
        t0 = time.monotonic()
        podman("stop", "-t", "10", cid)
        assert time.monotonic() - t0 < 5, "the daemon must stop on SIGTERM as PID 1"
    finally:
        podman("rm", "-f", cid, check=False)
