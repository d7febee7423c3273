"""systemd/netbootd.service: verified by systemd itself, and its privileges are enough.

The daemon runs with exactly the unit's capability bounding set (setpriv, as systemd
would apply it to a root service with NoNewPrivileges) and ingests a Raspberry Pi OS
image dropped into incoming/: the rootfs in the store keeps owners, groups and the
setuid/setgid bits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netbootd.lab.tools import REPO
from tests.conftest import free_port
from tests.integration.test_store_import import IMAGE, VERSION, check_imported
from tests.piimage import make_pi_image

UNIT = REPO / "systemd" / "netbootd.service"
#: Linux capability numbers (linux/capability.h) of the names the unit may use.
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
        "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
        "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12,
        "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_MKNOD": 27, "CAP_SETFCAP": 31}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install systemd util-linux")
    if os.geteuid() != 0:
        pytest.fail("runs as root (the unit's service runs as root)")


def unit_values(key: str) -> list[str]:
    out: list[str] = []
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}="):
            out += line.split("=", 1)[1].split()
    return out


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    need("systemd-analyze")
    # the unit names /opt/netbootd (where the README installs it); point it at this venv
    bindir = Path(sys.executable).parent
    assert (bindir / "netbootd").exists(), "the venv has no netbootd script (pip install -e .)"
    unit = tmp_path / "netbootd.service"
    unit.write_text(UNIT.read_text().replace("/opt/netbootd/.venv/bin/", f"{bindir}/"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60, check=False,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        r.stdout + r.stderr


def test_unit_runs_as_root_with_a_tight_capability_set() -> None:
    text = UNIT.read_text()
    assert "DynamicUser=yes" not in text and "RestrictSUIDSGID=yes" not in text
    assert unit_values("User") == ["root"]
    caps = set(unit_values("CapabilityBoundingSet"))
    assert caps == {"CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID", "CAP_DAC_OVERRIDE", "CAP_SETFCAP",
                    "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN"}
    rw = unit_values("ReadWritePaths")
    assert "/var/lib/netbootd" in rw and "-/etc/exports.d" in rw and "-/etc/ganesha" in rw


def test_daemon_with_the_units_capabilities_keeps_rootfs_owners(config_dir: Path,
                                                                tmp_path: Path) -> None:
    need("setpriv")
    names = unit_values("CapabilityBoundingSet")
    mask = sum(1 << CAPS[n] for n in names)
    caps = ",".join(f"+{n.lower().removeprefix('cap_')}" for n in names)
    image = make_pi_image(tmp_path / "img")
    (config_dir / "nodes.yaml").write_text("nodes: {}\n")
    env = {**os.environ, "NETBOOTD_STORE__SETTLE_SECONDS": "0.2"}
    log_path = tmp_path / "daemon.log"
    cmd = ["setpriv", "--no-new-privs", f"--bounding-set=-all,{caps}", "--inh-caps=-all",
           "--", sys.executable, "-m", "netbootd", "serve", "--config",
           str(config_dir / "netbootd.yaml"), "--no-dhcp", "--bind", "127.0.0.1",
           "--tftp-port", str(free_port(2)), "--http-port", str(free_port())]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 30
            while "netbootd serving" not in log_path.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            assert proc.poll() is None, log_path.read_text()
            status = Path(f"/proc/{proc.pid}/status").read_text()
            eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.MULTILINE).group(1), 16)
            bnd = int(re.search(r"^CapBnd:\s+([0-9a-f]+)", status, re.MULTILINE).group(1), 16)
            assert eff == mask and bnd == mask, (hex(eff), hex(bnd), hex(mask))

            images = tmp_path / "images"
            tmp = images / "incoming" / f".{image.name}.tmp"
            shutil.copyfile(image, tmp)
            os.rename(tmp, images / "incoming" / image.name)
            deadline = time.monotonic() + 60
            while not (images / "channels" / IMAGE / "prod").exists():
                assert time.monotonic() < deadline, log_path.read_text()
                assert not list((images / "rejected").glob("*.reason")), \
                    [p.read_text() for p in (images / "rejected").glob("*.reason")]
                time.sleep(0.05)
            check_imported(images / "store" / IMAGE / VERSION, image.parent)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
