#!/usr/bin/env python3
"""Build netbootd's network boot loader for arm64 UEFI machines: GRUB, from Debian's packages.

Debian ships no arm64 iPXE, so an arm64 UEFI machine that PXE-boots from netbootd gets this
GRUB instead (``dhcp.uefi_arm64_grub_bootfile``, served from ``tftp.ipxe_dir`` /
``tftp.extra_ipxe_dirs`` like an iPXE binary). It is made with ``grub-mkimage -O arm64-efi``
(package grub-common) from the modules of ``grub-efi-arm64-bin:arm64`` (``apt-get
download``: the host needs ``dpkg --add-architecture arm64``), with the network modules and
a small embedded configuration built in: it loads ``grub/grub.cfg-<mac>`` over TFTP from
the server it was loaded from, which netbootd renders per node from the node's plan
(docs/tftp.md "GRUB").

Standard library only (like build_image.py, whose download helpers it reuses). The output
is one file, written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_image import BuildError, download_deb, progress

HERE = Path(__file__).resolve().parent
NAME = "grubnetaa64.efi"
#: What the image needs without any module file to load: network (EFI NIC, TFTP, HTTP),
#: the Linux loader, the config language and the commands the embedded config uses.
MODULES = ["efinet", "net", "tftp", "http", "linux", "boot", "normal", "configfile", "echo",
           "test", "sleep", "reboot", "gzio", "fdt", "regexp"]
#: 48 bytes netbootd's TFTP server overwrites with the address the image was fetched from
#: (``netbootd.tftp.uboot.GRUB_SERVER_SLOT``, the same bytes): GRUB 2.06 takes its server
#: from the firmware's cached DHCP ACK, which is the *site* server's, never from the proxy
#: offer or the PXE boot-server reply that named this image.
SERVER_SLOT = "@netbootd-server" + "@" * 32
#: ``$net_default_mac`` comes from the firmware's NIC; the server from the slot.
EMBEDDED = f"set netbootd_server={SERVER_SLOT}\n" + """\
set net_default_server=$netbootd_server
echo "netbootd: GRUB network boot, ${net_default_mac} from ${netbootd_server}"
set timeout=0
configfile (tftp,$netbootd_server)/grub/grub.cfg-${net_default_mac}
echo "netbootd: nothing to boot for ${net_default_mac}; leaving it to the firmware"
sleep 10
"""


def build(out: Path, cache: Path) -> Path:
    """Write ``out`` (the .efi); reuse it when it exists."""
    if out.exists():
        progress(f"{out}: exists")
        return out
    mkimage = shutil.which("grub-mkimage")
    if mkimage is None:
        raise BuildError("grub-mkimage missing: apt-get install grub-common")
    debs = download_deb(cache, "grub-efi-arm64-bin", "arm64")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".grub-") as tmp:
        t = Path(tmp)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(t / "root")], check=True)
        moddir = t / "root" / "usr" / "lib" / "grub" / "arm64-efi"
        if not (moddir / "linux.mod").exists():
            raise BuildError(f"{debs[-1].name} has no usr/lib/grub/arm64-efi modules")
        (t / "embedded.cfg").write_text(EMBEDDED)
        part = out.with_name(f".{out.name}.tmp")
        subprocess.run([mkimage, "-O", "arm64-efi", "-d", str(moddir), "-c",
                        str(t / "embedded.cfg"), "-p", "(tftp)/grub", "-o", str(part),
                        *MODULES], check=True)
        os.chmod(part, 0o644)
        part.rename(out)
    progress(f"{out}: {out.stat().st_size / 1e3:.0f} kB")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "grub" / NAME,
                    help=f"the image to write (default {HERE / 'grub' / NAME})")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="download cache")
    args = ap.parse_args(argv)
    try:
        print(build(args.out, args.cache))
    except BuildError as exc:
        print(f"build-grub: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
