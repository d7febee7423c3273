"""Raspberry Pi OS images into the store, and builds handed to a running daemon.

The image is made like the real one (tests/piimage.py: sfdisk, mkfs.vfat, mkfs.ext4 -d,
dd). ``netbootd images import`` runs as a user runs it (a subprocess); so does the
daemon, and an emulated Pi 5 (netbootd.tftp.piclient) boots the imported tree from it
over TFTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from netbootd.store.build import sample_build
from netbootd.store.importer import fit_cmdline, fit_fstab, name_version
from netbootd.tftp.piclient import PI5_FILES, pi5_boot
from tests.conftest import free_port, wait_for
from tests.piimage import BOOT_FILES, CONFIG, make_pi_image

PI_MAC = "d8:3a:dd:77:88:99"
SERIAL = "0badf00d"
IMAGE, VERSION = "raspios-test-arm64", "2025-05-13"


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # --config after the subcommand, as a user types it
    return subprocess.run([sys.executable, "-m", "netbootd", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, check=False)



@pytest.fixture
def pi_config(config_dir: Path) -> Path:
    nodes = config_dir / "nodes.yaml"
    nodes.write_text(f"nodes:\n  {PI_MAC}:\n    serial: 10000000{SERIAL}\n"
                     f"    hostname: pi5-imported\n    image: {IMAGE}\n    channel: prod\n")
    return config_dir / "netbootd.yaml"


@pytest.fixture(scope="module")
def pi_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pi_image(tmp_path_factory.mktemp("piimg"), xz=True)


def check_imported(version_dir: Path, src: Path) -> None:
    """Boot tree byte-identical (but cmdline.txt), rootfs owners and modes kept."""
    boot, root = version_dir / "boot", version_dir / "rootfs"
    for rel in BOOT_FILES:
        assert (boot / rel).read_bytes() == (src / "boot-src" / rel).read_bytes(), rel
    assert (boot / "config.txt").read_text() == CONFIG
    cmdline = (boot / "cmdline.txt").read_text()
    assert "PARTUUID" not in cmdline and "init=" not in cmdline and "root=/dev/nfs" in cmdline
    assert cmdline.count("\n") == 1 and "cfg80211.ieee80211_regdom=GB" in cmdline

    sudo = os.lstat(root / "usr/bin/sudo")
    assert stat.S_IMODE(sudo.st_mode) == 0o4755 and (sudo.st_uid, sudo.st_gid) == (0, 0)
    wall = os.lstat(root / "usr/bin/wall")
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == 5
    shadow = os.lstat(root / "etc/shadow")
    assert stat.S_IMODE(shadow.st_mode) == 0o640 and shadow.st_gid == 42
    home = os.lstat(root / "home/pi")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
    assert os.lstat(root / "home/pi/.bashrc").st_uid == 1000
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert os.readlink(root / "sbin/init") == "/usr/lib/systemd/systemd"
    assert not os.path.lexists(root / "dev/null"), "device nodes are skipped"

    fstab = (root / "etc/fstab").read_text()
    live = [ln.split() for ln in fstab.splitlines() if ln.strip() and not ln.startswith("#")]
    assert not any(f[0].startswith("PARTUUID=") for f in live)
    assert {f[1] for f in live} >= {"/proc", "/tmp", "/var/log"}
    assert ["nas:/srv/media", "/media/nas"] in [f[:2] for f in live]  # not an SD mount
    unit = root / "etc/systemd/system/netbootd-state.service"
    assert "netbootd.state" in unit.read_text()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["kind"] == "pi-boot+rootfs" and set(manifest["boards"]) == {"rpi5", "rpi4"}
    assert manifest["boot"]["cmdline"] == "cfg80211.ieee80211_regdom=GB"


def test_names_and_fitting_rules() -> None:
    assert name_version("2024-11-19-raspios-bookworm-arm64-lite.img.xz") == \
        ("raspios-bookworm-arm64-lite", "2024-11-19")
    name, version = name_version("my os.img", 0)
    assert name == "my-os" and version == "1970.01.01-000000"
    line, args = fit_cmdline("console=serial0,115200 root=/dev/mmcblk0p2 rw init=/x quiet a=b\n")
    assert args == "a=b" and line.startswith("console=serial0,115200 console=tty1 root=/dev/nfs")
    assert "/dev/mmcblk0p2" in fit_fstab("/dev/mmcblk0p2 / ext4 defaults 0 1\n").split(
        "(not on an NFS root)")[1]


def test_import_without_daemon_keeps_owners_modes_and_fits_nfs_root(pi_config: Path,
                                                                    pi_image: Path) -> None:
    r = cli(pi_config, "images", "import", str(pi_image))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"accepted: {IMAGE} {VERSION}" in r.stdout and "active on prod" in r.stdout
    assert "decompressing" in r.stderr and "ingesting here" in r.stderr  # progress
    images = pi_config.parent.parent / "images"
    check_imported(images / "store" / IMAGE / VERSION, pi_image.parent)
    assert not [p for p in (images / "incoming").iterdir()], "incoming/ left clean"
    # the same file again: the identical build is recognised, not a conflict
    again = cli(pi_config, "images", "import", str(pi_image))
    assert again.returncode == 0 and "already in the store" in again.stdout, again.stdout


def test_not_a_pi_image_is_rejected_with_the_reason(pi_config: Path, tmp_path: Path) -> None:
    bad = make_pi_image(tmp_path / "bad", layout="one-ext4")
    r = cli(pi_config, "images", "import", str(bad), "--name", "x", "--version", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rejected:" in r.stdout and "FAT boot partition" in r.stdout
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 4096)
    r = cli(pi_config, "images", "import", str(junk))
    assert r.returncode == 1 and "no MBR partition table" in r.stdout, r.stdout


@pytest.fixture
def daemon(pi_config: Path, tmp_path: Path):
    tftp_port, http_port = free_port(2), free_port()  # 2 = SOCK_DGRAM
    env = {**os.environ, "NETBOOTD_STORE__SETTLE_SECONDS": "0.2"}
    log_path = tmp_path / "daemon.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "netbootd", "serve", "--config",
                             str(pi_config), "--no-dhcp", "--bind", "127.0.0.1",
                             "--tftp-port", str(tftp_port), "--http-port", str(http_port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "netbootd serving" in log_path.read_text() or proc.poll() is not None,
                 30, "daemon start")
        assert proc.poll() is None, log_path.read_text()
        yield proc, tftp_port, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_daemon_ingests_dropped_image_and_a_pi_boots_it_over_tftp(
        daemon, pi_config: Path, pi_image: Path, tmp_path: Path) -> None:
    proc, tftp_port, log_path = daemon
    images = pi_config.parent.parent / "images"
    # drop the .img.xz the documented way: temp name in incoming/, then one rename
    tmp = images / "incoming" / f".{pi_image.name}.tmp"
    shutil.copyfile(pi_image, tmp)
    os.rename(tmp, images / "incoming" / pi_image.name)
    version_dir = images / "store" / IMAGE / VERSION
    wait_for(lambda: (images / "channels" / IMAGE / "prod").exists(), 60,
             f"the daemon to ingest the drop; log: {log_path}")
    check_imported(version_dir, pi_image.parent)

    log = asyncio.run(pi5_boot(("127.0.0.1", tftp_port), SERIAL))
    assert log.prefix_used
    for name in PI5_FILES:
        got = log.files[name]
        if name == "cmdline.txt":
            text = got.decode()
            assert "nfsroot=" in text and f"{version_dir / 'rootfs'}" in text, text
            assert "root=/dev/nfs" in text and "PARTUUID" not in text
            assert "cfg80211.ieee80211_regdom=GB" in text  # the image's own arguments
            assert text.count("\n") == 1
        elif name == "config.txt":
            assert got.decode().startswith(CONFIG)
        elif name in BOOT_FILES:
            assert got == (pi_image.parent / "boot-src" / name).read_bytes(), name
        else:
            assert got is None, name  # pieeprom.sig, armstub8-2712.bin
    assert proc.poll() is None


def test_cli_hands_builds_to_a_running_daemon(daemon, pi_config: Path, tmp_path: Path
                                              ) -> None:
    proc, _, log_path = daemon
    images = pi_config.parent.parent / "images"
    good = tmp_path / "good"
    sample_build(good, "handed", "1", "pi-boot+rootfs")
    r = cli(pi_config, "images", "ingest", str(good), "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr + log_path.read_text()
    assert "handing" in r.stderr and "accepted: handed 1" in r.stdout
    assert (images / "store" / "handed" / "1" / "manifest.json").is_file()
    assert (good / "manifest.json").is_file(), "the source build is left as it was"

    bad = tmp_path / "bad"
    sample_build(bad, "handed", "2", "pi-boot+rootfs")
    (bad / "boot" / "kernel_2712.img").write_bytes(b"tampered")
    r = cli(pi_config, "images", "ingest", str(bad), "--timeout", "60")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rejected:" in r.stdout and "kernel_2712.img" in r.stdout
    assert not (images / "store" / "handed" / "2").exists()

    r = cli(pi_config, "images", "ingest", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no such file" in r.stdout
    assert proc.poll() is None
