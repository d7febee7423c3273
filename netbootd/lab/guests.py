"""QEMU guests for the lab: BIOS (SeaBIOS + iPXE ROM) and UEFI (OVMF) network boots.

Every guest:

* runs with ``-accel tcg`` (pitfall 1: /dev/kvm exists here but hangs ordinary guests);
* has a virtio NIC on its own tap in the lab's ``sw`` namespace (so QEMU runs there);
* writes its serial console to a log file (tests and the demo read markers from it);
* is started in the background under coreutils ``timeout -s KILL`` (pitfalls 7 and 9: OVMF
  falls into the EFI shell forever when nothing boots, and a foreground wait would keep a
  timeout or Ctrl-C from reaching the cleanup). The outer timeout also fires if the Python
  process that started the guest is itself SIGKILLed.

``Guest.direct(...)`` boots a kernel + initrd with ``-kernel/-initrd/-append``: the test image
can be checked without any netboot in between.

``Guest.arm64(...)`` is an arm64 board: QEMU's ``virt`` machine (TCG, Cortex-A57) with
Debian's U-Boot for it (``u-boot-qemu``: ``qemu_arm64/u-boot.bin`` as ``-bios``), whose
distro boot reaches ``bootcmd_dhcp`` after finding no disk, or with AAVMF (UEFI).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

from .netns import Topology, random_mac

OVMF_CANDIDATES = ("/usr/share/qemu/OVMF.fd", "/usr/share/ovmf/OVMF.fd")
#: Debian's ipxe-qemu ROM QEMU loads by default for virtio-net (combined BIOS + EFI image).
VIRTIO_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"
QEMU = "qemu-system-x86_64"
QEMU_ARM64 = "qemu-system-aarch64"
UBOOT_QEMU_ARM64 = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
AAVMF_CANDIDATES = ("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd", "/usr/share/AAVMF/AAVMF_CODE.fd")

Firmware = Literal["bios", "uefi"]


def ovmf_path() -> str | None:
    return next((p for p in OVMF_CANDIDATES if Path(p).exists()), None)


@dataclass
class Guest:
    """One QEMU process. Create via :meth:`netboot` or :meth:`direct`, then ``start()``."""

    name: str
    argv: list[str]
    console: Path
    mac: str
    timeout: float
    lab: Topology | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started: float = field(default=0.0, init=False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def netboot(cls, lab: Topology, outdir: Path, *, firmware: Firmware = "bios",
                name: str | None = None, mac: str | None = None, timeout: float = 90,
                memory: str = "512M", ipxe_rom: bool = True, disk: Path | None = None,
                reboot: bool = False) -> Guest:
        """A guest that network-boots from its virtio NIC on a fresh tap of ``lab``.

        ``ipxe_rom=False`` (UEFI only) leaves the NIC without iPXE's option ROM, so OVMF's
        own PXE client boots: it fetches ``ipxe.efi`` over TFTP first, as real UEFI
        machines do. With the ROM, the firmware already *is* iPXE and goes straight to HTTP.

        ``disk``: a raw file as a virtio disk, second in the boot order (network first, then
        disk, as a provisioned machine is set up): when netbootd stays silent the firmware
        falls through to it. ``reboot=True`` lets a guest reboot in place (a reboot is a
        new firmware run with the same disk) instead of QEMU exiting (``-no-reboot``).
        """
        mac = mac or random_mac()
        name = name or f"{firmware}-{mac[-5:].replace(':', '')}"
        tap = lab.add_tap()
        console = outdir / f"{name}.serial.log"
        argv = _base_argv(memory, console, reboot=reboot) + [
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            # bootindex, not -boot n, and QEMU's default ROM (ipxe-qemu's efi-virtio.rom):
            # measured here, -boot n or an explicit romfile= leave SeaBIOS without a
            # network boot entry.
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},bootindex=1"
            + ("" if ipxe_rom else ",romfile="),
        ]
        if disk is not None:
            argv += ["-drive", f"id=d0,file={disk},format=raw,if=none,cache=writeback",
                     "-device", "virtio-blk-pci,drive=d0,bootindex=2"]
        if firmware == "uefi":
            ovmf = ovmf_path()
            if ovmf is None:
                raise FileNotFoundError("OVMF firmware missing: apt-get install ovmf")
            argv += ["-bios", ovmf]
        argv += ["-serial", f"file:{console}"]
        return cls(name=name, argv=argv, console=console, mac=mac, timeout=timeout, lab=lab)

    @classmethod
    def arm64(cls, lab: Topology, outdir: Path, *, firmware: Literal["uboot", "uefi"] = "uboot",
              name: str | None = None, mac: str | None = None, timeout: float = 240,
              memory: str = "768M") -> Guest:
        """An arm64 ``virt`` board that network-boots from a virtio NIC (no option ROM: the
        firmware's own network stack does it) on a fresh tap of ``lab``."""
        mac = mac or random_mac()
        name = name or f"arm64-{firmware}-{mac[-5:].replace(':', '')}"
        if firmware == "uboot":
            bios = UBOOT_QEMU_ARM64
        else:
            bios = next((p for p in AAVMF_CANDIDATES if Path(p).exists()), AAVMF_CANDIDATES[0])
        if not Path(bios).exists():
            raise FileNotFoundError(f"{bios} missing: apt-get install u-boot-qemu "
                                    "qemu-efi-aarch64")
        tap = lab.add_tap()
        console = outdir / f"{name}.serial.log"
        # U-Boot: virtio-mmio, not virtio-net-pci: U-Boot 2023.01 reads a virtio-pci NIC's
        # MAC as its first byte six times (52:52:52:52:52:52), so every board would be the
        # same unknown machine. UEFI (AAVMF) reads it right: the usual PCI NIC, no option
        # ROM (ipxe-qemu's is x86 only). The test kernel loads both virtio transports.
        nic = (f"virtio-net-device,netdev=n0,mac={mac}" if firmware == "uboot"
               else f"virtio-net-pci,netdev=n0,mac={mac},romfile=")
        argv = [QEMU_ARM64, "-M", "virt", "-cpu", "cortex-a57", "-accel", "tcg",
                "-m", memory, "-smp", "1", "-display", "none", "-monitor", "none",
                "-no-reboot", "-nodefaults", "-bios", bios,
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", nic, "-serial", f"file:{console}"]
        return cls(name=name, argv=argv, console=console, mac=mac, timeout=timeout, lab=lab)

    @classmethod
    def direct(cls, outdir: Path, kernel: Path, initrd: Path, append: str, *,
               lab: Topology | None = None, name: str = "direct", mac: str | None = None,
               timeout: float = 60, memory: str = "512M") -> Guest:
        """Boot ``kernel``+``initrd`` directly; with ``lab``, on a tap of its bridge, else
        without a NIC."""
        mac = mac or random_mac()
        console = outdir / f"{name}.serial.log"
        argv = _base_argv(memory, console) + ["-kernel", str(kernel), "-initrd", str(initrd),
                                     "-append", append]
        if lab is not None:
            tap = lab.add_tap()
            argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]
        else:
            argv += ["-nic", "none"]
        argv += ["-serial", f"file:{console}"]
        return cls(name=name, argv=argv, console=console, mac=mac, timeout=timeout, lab=lab)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Guest:
        self.console.parent.mkdir(parents=True, exist_ok=True)
        self.console.write_bytes(b"")
        wrapped = ["timeout", "-s", "KILL", str(int(self.timeout)), *self.argv]
        qlog = self.console.with_suffix(".qemu.log")
        if self.lab is not None:
            self.proc = self.lab.popen("sw", wrapped, log_file=qlog)
        else:
            with open(qlog, "ab") as out:
                self.proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill the guest (``timeout`` forwards SIGTERM to QEMU); wait for it to be gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(3)

    def qemu_pid(self) -> int | None:
        """QEMU's own PID: the child of the ``timeout`` wrapper this object started."""
        if not self.running():
            return None
        assert self.proc is not None
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        pids = [int(p) for p in kids.split()]
        return pids[0] if pids else None

    def power_cut(self, timeout: float = 10) -> None:
        """Pull the plug: SIGKILL QEMU by its PID (no shutdown, no flush of the guest's
        caches), then wait for the wrapper to end."""
        pid = self.qemu_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop()

    def wait_exit(self, timeout: float) -> int | None:
        """Wait until QEMU ends by itself (e.g. ``-no-reboot`` and a reboot); its exit
        code, or None if it still runs after ``timeout`` s."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ console
    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def wait_for(self, pattern: str, timeout: float | None = None) -> re.Match[str] | None:
        """First match of ``pattern`` (regex) on the console within ``timeout`` s (default:
        the guest's remaining hard timeout); None if it never appears or QEMU exits."""
        rx = re.compile(pattern)
        limit = self.timeout - self.elapsed() if timeout is None else timeout
        deadline = time.monotonic() + max(0.0, limit)
        while True:
            m = rx.search(self.text())
            if m:
                return m
            if not self.running() or time.monotonic() >= deadline:
                return rx.search(self.text())
            time.sleep(0.2)

    def markers(self) -> list[str]:
        """The ``NETBOOTD-TEST:`` lines printed by the test image, in order."""
        return [line.split("NETBOOTD-TEST:", 1)[1].strip() for line in self.text().splitlines()
                if "NETBOOTD-TEST:" in line]


def _base_argv(memory: str, console: Path, *, reboot: bool = False) -> list[str]:
    return [QEMU, "-accel", "tcg", "-m", memory, "-smp", "1", "-display", "none",
            "-monitor", "none", *([] if reboot else ["-no-reboot"]), "-nodefaults",
            # SeaBIOS' debug port: its boot decisions, for diagnosing "nothing booted".
            "-debugcon", f"file:{console.with_suffix('.firmware.log')}", "-global", "isa-debugcon.iobase=0x402"]
