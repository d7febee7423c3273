"""tcpdump into a pcap inside one lab namespace (evidence for "netbootd said nothing").

The pcap is the proof a test keeps on failure and the only honest way to show that a
silent server stayed silent: the daemon's own log cannot prove an absence.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Self

from .netns import LabError, Topology


class Capture:
    """``tcpdump -U -w FILE`` on ``iface`` in the namespace of ``role``."""

    def __init__(self, lab: Topology, role: str, pcap: Path, *, iface: str = "eth0",
                 bpf: str = "") -> None:
        self.lab, self.role, self.pcap, self.iface, self.bpf = lab, role, pcap, iface, bpf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> Capture:
        self.pcap.parent.mkdir(parents=True, exist_ok=True)
        log = self.pcap.with_suffix(".tcpdump.log")
        argv = ["tcpdump", "-i", self.iface, "-U", "-n", "-s", "0", "-w", str(self.pcap)]
        if self.bpf:
            argv.append(self.bpf)
        self.proc = self.lab.popen(self.role, argv, log_file=log)
        deadline = time.monotonic() + timeout
        # tcpdump prints "listening on ..." once the socket is open; packets before that
        # would be missed, so wait for it.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"tcpdump exited ({self.proc.returncode}); see {log}")
            if "listening on" in log.read_text(errors="replace"):
                return self
            time.sleep(0.05)
        raise LabError(f"tcpdump did not start within {timeout}s; see {log}")

    def stop(self) -> None:
        """SIGINT makes tcpdump flush and close the pcap properly."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(2)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(3)

    def read(self, bpf: str, *, since: float | None = None) -> list[str]:
        """Packets in the pcap matching ``bpf``, one summary line each (tcpdump -r).
        ``since`` (Unix time): only packets captured then or later; their lines then
        start with the Unix timestamp (``-tt``)."""
        argv = ["tcpdump", "-n", "-e", *(["-tt"] if since is not None else []),
                "-r", str(self.pcap), bpf]
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        if since is not None:
            lines = [line for line in lines if float(line.split()[0]) >= since]
        return lines

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
