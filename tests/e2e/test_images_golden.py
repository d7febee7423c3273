"""The provisioning images: the golden Debian disk image and the installer that writes it.

* the golden image builds (the debootstrap tree is cached in images/cache/golden, so only the
  first run takes minutes), its manifest matches its bytes, its partition table, FAT boot
  partition and ext4 root are sane, and it boots by itself in QEMU (TCG) to a login prompt;
* the installer's streaming functions (images/installer/install-lib.sh, run on the host with
  busybox) survive a connection dropped mid-stream (Range resume, sha256 verified) and
  refuse an image whose sha256 is wrong, with the reason;
* the disk selector picks the smallest/largest disk, resolves by-path names and refuses a
  mounted or too small disk (a fake sysfs tree);
* the installer image boots in QEMU, takes a lease, writes the image to the virtio disk,
  reports installing/installed with the GET format and reboots.

Needs root (debootstrap, files owned by root) and: debootstrap, e2fsprogs, dosfstools,
mtools, syslinux, syslinux-common, fdisk, zstd, busybox-static, openssl, qemu-system-x86.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
LIB = IMAGES / "installer" / "install-lib.sh"
CACHE = IMAGES / "cache"
SEED_URL = "http://10.231.0.1:8080/cloud-init/by-address/"
TOOLS = ["debootstrap", "mkfs.ext4", "e2fsck", "debugfs", "mkfs.fat", "mcopy", "mdir",
         "syslinux", "sfdisk", "zstd", "busybox", "openssl", "qemu-system-x86_64"]


def need(tools: list[str] = TOOLS) -> None:
    """Skip locally, fail under CI: a missing tool there is a broken setup, not a pass."""
    problem = None
    if os.geteuid() != 0:
        problem = "needs root (debootstrap; root-owned files in the image)"
    else:
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            problem = (f"missing {', '.join(missing)}: apt-get install debootstrap e2fsprogs "
                       "dosfstools mtools syslinux syslinux-common fdisk zstd busybox-static "
                       "openssl qemu-system-x86")
    if problem:
        pytest.fail(problem, pytrace=False)


def _load(name: str):
    sys.path.insert(0, str(IMAGES))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(IMAGES))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ golden

@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """(build dir, manifest, decompressed raw disk) of a golden build."""
    need()
    bg = _load("build_golden")
    out = tmp_path_factory.mktemp("golden") / "golden-e2e-1"
    build = bg.build(name="golden-e2e", version="e2e-1", seed_url=SEED_URL, cache=CACHE,
                     out=out, incoming=None)
    manifest = json.loads((build / "manifest.json").read_text())
    raw = build.parent / "disk.raw"
    subprocess.run(["zstd", "-q", "-d", "-f", "-o", str(raw),
                    str(build / manifest["disk"]["path"])], check=True)
    return build, manifest, raw


def test_golden_manifest_matches_its_bytes(golden: tuple[Path, dict, Path]) -> None:
    build, manifest, raw = golden
    assert manifest["kind"] == "disk" and manifest["boards"] == ["x86_64"]
    disk = manifest["disk"]
    packed = build / disk["path"]
    assert disk["compression"] == "zst" and packed.name.endswith(".img.zst")
    assert disk["size"] == packed.stat().st_size and disk["sha256"] == sha256(packed)
    assert disk["uncompressed_size"] == raw.stat().st_size
    assert disk["uncompressed_sha256"] == sha256(raw)
    assert manifest["artefacts"] == [{"path": disk["path"], "size": disk["size"],
                                      "sha256": disk["sha256"]}]
    assert sorted(p.name for p in build.iterdir()) == sorted(["manifest.json", packed.name])


def _partitions(raw: Path) -> list[dict]:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    return table["partitions"]


def _extract(raw: Path, part: dict, dest: Path) -> Path:
    subprocess.run(["dd", f"if={raw}", f"of={dest}", "bs=1M", "iflag=skip_bytes,count_bytes",
                    f"skip={part['start'] * 512}", f"count={part['size'] * 512}",
                    "conv=sparse", "status=none"], check=True)
    return dest


def test_golden_partitions_bootloader_and_root_fs(golden: tuple[Path, dict, Path],
                                                  tmp_path: Path) -> None:
    _, _, raw = golden
    boot, root = _partitions(raw)
    assert boot["type"] == "c" and boot.get("bootable") and boot["start"] == 2048
    assert root["type"] == "83" and root["start"] == boot["start"] + boot["size"]
    assert (root["start"] + root["size"]) * 512 == raw.stat().st_size
    # SYSLINUX's MBR code in front of the partition table
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    assert raw.read_bytes()[:440][:len(mbr.rstrip(b"\0"))] == mbr.rstrip(b"\0")[:440]

    bootfs = _extract(raw, boot, tmp_path / "boot.fat")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(["mdir", "-a", "-b", "-i", str(bootfs), "::"], env=env, check=True,
                             capture_output=True, text=True).stdout
    for name in ("VMLINUZ", "INITRD.IMG", "SYSLINUX.CFG", "LDLINUX.SYS", "LDLINUX.C32"):
        assert name.lower() in listing.lower(), listing
    cfg = subprocess.run(["mtype", "-i", str(bootfs), "::syslinux.cfg"], env=env, check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"APPEND (.*)", cfg)
    assert m and "console=ttyS0" in m.group(1), cfg

    rootfs = _extract(raw, root, tmp_path / "root.ext4")
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    uuid = re.search(r"Filesystem UUID:\s*(\S+)", subprocess.run(
        ["dumpe2fs", "-h", str(rootfs)], capture_output=True, text=True, check=True).stdout).group(1)
    assert f"root=UUID={uuid}" in m.group(1)

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(rootfs)], check=True,
                              capture_output=True, text=True).stdout

    assert f"seedfrom: {SEED_URL}" in cat("/etc/cloud/cloud.cfg.d/90_netbootd.cfg")
    assert f"UUID={uuid}" in cat("/etc/fstab")
    assert cat("/etc/machine-id") == ""
    ssh = subprocess.run(["debugfs", "-R", "ls /etc/ssh", str(rootfs)], check=True,
                         capture_output=True, text=True).stdout
    assert "sshd_config" in ssh and "ssh_host_" not in ssh
    for path in ("/usr/bin/cloud-init", "/usr/sbin/sshd", "/lib/systemd/systemd"):
        stat = subprocess.run(["debugfs", "-R", f"stat {path}", str(rootfs)],
                              capture_output=True, text=True, check=False)
        assert "Inode:" in stat.stdout, f"{path} missing"


def _read_console(proc: subprocess.Popen, log: Path, done: re.Pattern, bound: float) -> str:
    """Read QEMU's serial console until ``done`` matches or ``bound`` seconds pass."""
    text = ""
    end = time.monotonic() + bound
    os.set_blocking(proc.stdout.fileno(), False)
    with log.open("w") as f:
        while time.monotonic() < end:
            chunk = proc.stdout.read(65536)
            if chunk:
                s = chunk.decode(errors="replace")
                text += s
                f.write(s)
                f.flush()
                if done.search(text):
                    return text
            elif proc.poll() is not None:
                return text
            else:
                import select
                select.select([proc.stdout], [], [], 0.5)
    return text


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_golden_boots_by_itself_in_qemu(golden: tuple[Path, dict, Path], tmp_path: Path) -> None:
    """BIOS -> SYSLINUX MBR -> kernel + initramfs -> ext4 root -> systemd -> getty on ttyS0.
    No network card: nothing leaves the guest; cloud-init finds no seed and gives up."""
    _, _, raw = golden
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot",
         "-nic", "none", "-snapshot", "-drive", f"file={raw},format=raw,if=virtio"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        text = _read_console(proc, tmp_path / "console.log",
                             re.compile(r"login: |Cloud-init v\. \S+ finished"), bound=900)
    finally:
        _stop(proc)
    assert "SYSLINUX" in text or "Linux version" in text, text[-3000:]
    assert "Linux version" in text, text[-3000:]
    assert re.search(r"login: |Cloud-init v\. \S+ finished", text), text[-3000:]
    assert "Kernel panic" not in text


# ------------------------------------------------------------------------------ installer

class RangeServer:
    """Serves files with Range support; can drop the connection once at a byte offset;
    records every request line (the installer's events are GETs)."""

    def __init__(self, root: Path, drop_at: int | None = None, ranges: bool = True) -> None:
        self.root, self.drop_at, self.dropped, self.ranges = root, drop_at, False, ranges
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                path = server.root / urllib.parse.urlsplit(self.path).path.lstrip("/")
                if not path.is_file():
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                a, b = 0, size - 1
                rng = self.headers.get("Range") if server.ranges else None
                if rng:
                    lo, hi = rng.split("=", 1)[1].split("-")
                    a, b = int(lo), (int(hi) if hi else size - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(b - a + 1))
                self.end_headers()
                with path.open("rb") as f:
                    f.seek(a)
                    pos, left = a, b - a + 1
                    while left:
                        data = f.read(min(left, 65536))
                        if (server.drop_at is not None and not server.dropped
                                and pos <= server.drop_at < pos + len(data)):
                            server.dropped = True
                            self.wfile.write(data[:server.drop_at - pos])
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                        self.wfile.write(data)
                        pos += len(data)
                        left -= len(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def events(self) -> list[dict[str, str]]:
        return [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(p).query,
                                            keep_blank_values=True))
                for p, _ in self.requests if p.startswith("/events")]


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw, raw.zst): 6 MB, half incompressible, so the zst is ~3 MB (20 chunks)."""
    need(["busybox", "zstd", "openssl", "curl"])
    d = tmp_path_factory.mktemp("small")
    raw = d / "disk.img"
    raw.write_bytes(hashlib.shake_256(b"netbootd").digest(3_000_000) + bytes(3_000_000))
    subprocess.run(["zstd", "-q", "-f", "-o", str(raw) + ".zst", str(raw)], check=True)
    return raw, Path(str(raw) + ".zst")


def run_lib(script: str, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "NBD_TMP": str(tmp), "NBD_BACKOFF_MAX": "1", **env}
    return subprocess.run(["busybox", "sh", "-c", f". {LIB}\n{script}"], env=full,
                          capture_output=True, text=True, timeout=120, check=False)


def test_installer_pipeline_resumes_after_a_dropped_connection(
        small_image: tuple[Path, Path], tmp_path: Path) -> None:
    raw, zst = small_image
    drop = zst.stat().st_size // 2 + 12345
    out = tmp_path / "target.img"
    with RangeServer(zst.parent, drop_at=drop) as srv:
        url = f"http://127.0.0.1:{srv.port}/{zst.name}"
        res = run_lib(f'nbd_write_image {url} {zst.stat().st_size} {raw.stat().st_size} '
                      f'{sha256(raw)} zst {out}; echo "rc=$? reason=$NBD_REASON"', tmp_path,
                      EVENTS=f"http://127.0.0.1:{srv.port}/events", MAC="52:54:00:aa:bb:cc",
                      TOKEN="t0k")
        assert "rc=0 reason=\n" in res.stdout, res.stdout + res.stderr
        assert srv.dropped
        assert f"resuming at byte {drop}" in res.stderr, res.stderr
        ranges = [r for p, r in srv.requests if not p.startswith("/events")]
        assert f"bytes={drop}-" in " ".join(r or "" for r in ranges)
        assert all(r and r.startswith("bytes=") for r in ranges)
    assert out.read_bytes() == raw.read_bytes()
    progress = sorted(int(e["progress"]) for e in srv.events() if e["phase"] == "installing")
    assert progress and max(progress) == 99
    gaps = [b - a for a, b in zip([0, *progress], progress)]
    assert max(gaps) <= 5, progress
    assert {e["mac"] for e in srv.events()} == {"52:54:00:aa:bb:cc"}
    assert {e["token"] for e in srv.events()} == {"t0k"}
    assert not list(tmp_path.glob("nbd-write.*")), "scratch files left behind"


def test_installer_pipeline_refuses_a_wrong_sha256(small_image: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    raw, zst = small_image
    with RangeServer(zst.parent) as srv:
        url = f"http://127.0.0.1:{srv.port}/{zst.name}"
        events = f"http://127.0.0.1:{srv.port}/events"
        res = run_lib(
            f'nbd_write_image {url} {zst.stat().st_size} {raw.stat().st_size} {"0" * 64} zst '
            f'{tmp_path / "t.img"} || nbd_event failed 0 "$NBD_REASON"; '
            f'echo "reason=$NBD_REASON"', tmp_path, EVENTS=events, MAC="m", TOKEN="t")
    assert f"reason=sha256 mismatch: image is {sha256(raw)}, expected {'0' * 64}" in res.stdout, \
        res.stdout + res.stderr
    phases = [e["phase"] for e in srv.events()]
    assert "failed" in phases and "installed" not in phases
    failed = next(e for e in srv.events() if e["phase"] == "failed")
    assert failed["reason"].startswith("sha256 mismatch")


def test_installer_pipeline_refuses_a_server_without_ranges(
        small_image: tuple[Path, Path], tmp_path: Path) -> None:
    """A 200 with the whole file is refused before a byte reaches the disk."""
    raw, zst = small_image
    out = tmp_path / "t.img"
    with RangeServer(zst.parent, ranges=False) as srv:
        url = f"http://127.0.0.1:{srv.port}/{zst.name}"
        res = run_lib(f'nbd_write_image {url} {zst.stat().st_size} {raw.stat().st_size} '
                      f'{sha256(raw)} zst {out}; echo "rc=$? reason=$NBD_REASON"', tmp_path)
    assert "rc=1 reason=server ignores Range requests (HTTP/1.1 200 OK)" in res.stdout, \
        res.stdout + res.stderr
    assert out.stat().st_size == 0
    assert not list(tmp_path.glob("nbd-write.*")), "scratch files left behind"


def test_installer_pipeline_tee_is_not_the_busybox_applet(tmp_path: Path) -> None:
    """busybox ash runs its own 1 KiB-buffer tee for a bare `tee`; the pipeline names one
    by path (the initrd's /usr/local/bin/tee, coreutils on the host)."""
    need(["busybox", "tee"])
    res = run_lib("nbd_tee_cmd", tmp_path)
    tee = res.stdout.strip()
    assert tee.startswith("/") and "busybox" not in os.path.realpath(tee), tee


def _fake_disk(sys_root: Path, name: str, size_bytes: int, devpath: str,
               removable: int = 0) -> None:
    real = sys_root / "devices" / devpath / "block" / name
    real.mkdir(parents=True)
    (real / "size").write_text(f"{size_bytes // 512}\n")
    (real / "removable").write_text(f"{removable}\n")
    (real / "holders").mkdir()
    (real / "device").symlink_to(real.parent.parent)
    (sys_root / "block").mkdir(exist_ok=True)
    (sys_root / "block" / name).symlink_to(real)


def test_installer_disk_selection(tmp_path: Path) -> None:
    need(["busybox"])
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    gib = 1 << 30
    _fake_disk(sysfs, "vda", 8 * gib, "pci0000:00/0000:00:04.0/virtio1")
    _fake_disk(sysfs, "nvme0n1", 64 * gib, "pci0000:00/0000:00:1d.0/0000:01:00.0/nvme/nvme0")
    _fake_disk(sysfs, "sda", 32 * gib, "pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0")
    _fake_disk(sysfs, "sdb", 2 * gib, "pci0000:00/0000:00:14.0/usb1/1-1/host5", removable=1)
    for n in ("vda", "nvme0n1", "sda", "sdb"):
        (dev / n).touch()
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n")
    env = {"NBD_SYS": str(sysfs), "NBD_DEV": str(dev), "NBD_MOUNTS": str(mounts),
           "NBD_SWAPS": str(tmp_path / "swaps")}

    def pick(sel: str, usize: int = gib) -> str:
        res = run_lib(f'if nbd_pick_disk "{sel}" {usize}; then echo "ok $NBD_DISK"; '
                      f'else echo "no $NBD_REASON"; fi', tmp_path, **env)
        return res.stdout.strip().replace(str(dev) + "/", "")

    assert pick("smallest") == "ok vda"                 # sdb is removable: never chosen
    assert pick("largest") == "ok nvme0n1"
    assert pick("/dev/sda") == "ok sda"
    assert pick("/dev/disk/by-path/pci-0000:01:00.0-nvme-1") == "ok nvme0n1"
    assert pick("/dev/disk/by-path/pci-0000:00:1f.2-ata-3") == "ok sda"
    assert pick("/dev/disk/by-path/pci-0000:00:04.0") == "ok vda"
    assert pick("/dev/disk/by-path/pci-0000:00:1f.2-ata-1").startswith("no no single disk")
    assert pick("smallest", 9 * gib) == (
        f"no disk /dev/vda ({8 * gib} bytes) is smaller than the image ({9 * gib} bytes)")
    assert pick("/dev/nope").startswith("no disk /dev/nope not found")
    assert pick("sda").startswith("no disk selector 'sda'")
    mounts.write_text(f"{dev}/sda2 /mnt ext4 rw 0 0\n")
    assert pick("/dev/sda") == "no disk /dev/sda is mounted"


def test_installer_event_url_format(tmp_path: Path) -> None:
    need(["busybox"])
    res = run_lib('nbd_event_url failed 0 "disk /dev/vda: too small & 100% used"', tmp_path,
                  EVENTS="http://10.0.0.1:8080/api/v1/install/events", MAC="52:54:00:aa:bb:cc",
                  TOKEN="a+b/c")
    assert res.stdout.strip() == (
        "http://10.0.0.1:8080/api/v1/install/events?mac=52%3A54%3A00%3Aaa%3Abb%3Acc"
        "&phase=failed&token=a%2Bb%2Fc&progress=0"
        "&reason=disk%20%2Fdev%2Fvda%3A%20too%20small%20%26%20100%25%20used")


@pytest.fixture(scope="module")
def installer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(["busybox", "zstd", "openssl", "qemu-system-x86_64", "apt-get", "dpkg-deb", "depmod"])
    bi = _load("build_installer")
    return bi.build(name="installer-e2e", version="e2e-1", cache=CACHE,
                    out=tmp_path_factory.mktemp("inst") / "installer-e2e-1", incoming=None)


def test_installer_image_installs_in_qemu(installer: Path, small_image: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    """The installer boots, loads virtio drivers by modalias, takes a lease, writes the image
    to the virtio disk (one dropped connection on the way), reports, reboots. The guest's
    only way out is QEMU's user network restricted to one forwarded address, whose every
    connection QEMU hands to `busybox nc` towards the test's server on 127.0.0.1."""
    raw, zst = small_image
    target = tmp_path / "target.raw"
    with target.open("wb") as f:
        f.truncate(16 << 20)
    drop = zst.stat().st_size // 3
    with RangeServer(zst.parent, drop_at=drop) as srv:
        base = "http://10.0.2.100"
        cmdline = " ".join([
            "console=ttyS0", f"netbootd.install={base}/{zst.name}",
            f"netbootd.sha256={sha256(raw)}", f"netbootd.size={zst.stat().st_size}",
            f"netbootd.usize={raw.stat().st_size}", "netbootd.compression=zst",
            "netbootd.disk=/dev/disk/by-path/pci-0000:00:05.0", f"netbootd.events={base}/events",
            "netbootd.token=e2e-token", "netbootd.mac=52:54:00:12:34:56"])
        nic = ("user,model=virtio-net-pci,mac=52:54:00:12:34:56,restrict=on,"
               f"guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 {srv.port}")
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
             "-kernel", str(installer / "boot/vmlinuz"),
             "-initrd", str(installer / "boot/initrd.img"), "-append", cmdline,
             "-device", "virtio-blk-pci,drive=d0,addr=05.0",
             "-drive", f"id=d0,file={target},format=raw,if=none", "-nic", nic],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            text = _read_console(proc, tmp_path / "console.log",
                                 re.compile(r"NETBOOTD-INSTALL: (installed; rebooting|stopped)"),
                                 bound=300)
            proc.wait(60)                 # -no-reboot: `reboot -f` ends QEMU
        finally:
            _stop(proc)
    assert "NETBOOTD-INSTALL: installed; rebooting" in text, text[-3000:]
    assert "target disk /dev/vda" in text
    assert srv.dropped and f"resuming at byte {drop}" in text
    with target.open("rb") as f:
        assert f.read(raw.stat().st_size) == raw.read_bytes()
    phases = [(e["phase"], int(e["progress"])) for e in srv.events()]
    assert phases[0] == ("installing", 0) and phases[-1] == ("installed", 100), phases
    assert {e["token"] for e in srv.events()} == {"e2e-token"}
