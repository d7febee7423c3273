#!/usr/bin/env python3
"""Build netbootd's installer image (kind ``installer``): Debian cloud kernel + an initrd that
streams a disk image onto the node's disk.

Standard library only (like build_image.py, whose kernel download, cpio writer and manifest
helpers it uses). The initrd holds:

* busybox-static (shell, wget, udhcpc, modprobe, the rest);
* curl (the image download: Range requests written straight into the decompressor), zstd,
  xz, gzip, openssl (sha256 with the CPU's SHA instructions), coreutils tee (8 KiB reads
  where busybox's applet does 1 KiB), each with the shared libraries ``ldd`` names, copied
  from this machine into ``/usr/local/bin`` and their library paths;
* the kernel's block, NVMe, ATA, SCSI, virtio and network driver modules with everything
  they depend on, plus ``modules.dep`` / ``modules.alias`` so busybox modprobe loads what
  the hardware's modalias asks for;
* ``/init`` (images/installer/init) and ``/lib/netbootd/install-lib.sh`` (the streaming
  functions, images/installer/install-lib.sh).

The kernel command line contract is in docs/provisioning.md. Output: a build directory with
``boot/vmlinuz``, ``boot/initrd.img`` and ``manifest.json`` (kind ``installer``), assembled
under a dot-name and renamed into place. Progress on stderr, the build path on stdout.

``--pi`` builds a *synthetic* Raspberry Pi 5 installer instead: a Pi boot tree
(``boot/config.txt``, ``kernel_2712.img``, ``initramfs_2712``, ``bcm2712-rpi-5-b.dtb``,
``overlays/``) with pseudo-random content that differs per version, declared as kind
``installer``, boards ``rpi5``, ``boot.boot_tree`` = ``boot`` and kernel/initrd inside that
tree. It exercises netbootd's Pi install path (TFTP tree, cmdline.txt, lifecycle) in tests
and the lab; it cannot install anything on a real Pi, which needs an arm64 kernel and an
arm64 initrd with the same ``/init``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_image import (
    BUSYBOX,
    PI_CONFIG,
    PI_FILES,
    UDHCPC_SCRIPT,
    BuildError,
    Cpio,
    _fsync_tree,
    _kernel_package,
    default_version,
    download_kernel_deb,
    fetch_kernel,
    progress,
    write_manifest,
)

INSTALLER_DIR = HERE / "installer"
#: Tools copied from this machine (with their libraries) into the initrd's /usr/local/bin.
TOOLS = ["curl", "zstd", "xz", "gzip", "openssl", "tee"]
#: Module directories (below lib/modules/<release>/kernel) taken whole, plus dependencies.
MODULE_DIRS = ["drivers/block", "drivers/nvme", "drivers/ata", "drivers/scsi",
               "drivers/virtio", "drivers/net"]
MODULE_SKIP = re.compile(r"/(wireless|can|usb|wwan|ieee802154|hamradio|appletalk)/")
#: Bumped when the initrd's layout or scripts change in a way the cache must notice.
RECIPE = "1"


def installer_modules(cache: Path) -> Path:
    """A directory ``lib/modules/<release>/...`` with the installer's driver modules and
    their dependencies, cached per kernel package (the .deb is deleted afterwards)."""
    pkg = _kernel_package()
    if pkg is None:
        cached = sorted(p for p in cache.glob("installer-modules-*") if (p / "release").exists())
        if not cached:
            raise BuildError("cannot resolve the kernel package with apt-cache and no "
                             f"installer modules are cached in {cache}")
        return cached[-1]
    mdir = cache / f"installer-modules-{pkg}-r{RECIPE}"
    if (mdir / "release").exists():
        progress(f"installer modules {pkg}: cached")
        return mdir
    debs = download_kernel_deb(cache, pkg)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        progress(f"extracting driver modules from {debs[-1].name}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), tmp], check=True)
        moddirs = sorted((Path(tmp) / "lib" / "modules").glob("*"))
        if not moddirs:
            raise BuildError(f"{debs[-1].name} has no /lib/modules")
        src = moddirs[-1]
        release = src.name
        # The package ships no modules.dep/alias (its postinst runs depmod): make them.
        try:
            subprocess.run(["depmod", "-b", tmp, release], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BuildError(f"depmod failed ({exc}); apt-get install kmod") from exc
        deps = _modules_dep(src / "modules.dep")
        wanted = {rel for rel in deps
                  if any(rel.startswith(f"kernel/{d}/") for d in MODULE_DIRS)
                  and not MODULE_SKIP.search(rel)}
        todo = list(wanted)
        while todo:                      # closure over modules.dep
            for dep in deps.get(todo.pop(), []):
                if dep not in wanted:
                    wanted.add(dep)
                    todo.append(dep)
        stage = cache / f".installer-modules-{pkg}.tmp"
        shutil.rmtree(stage, ignore_errors=True)
        dst = stage / "lib" / "modules" / release
        for rel in sorted(wanted):
            if rel.endswith((".xz", ".zst", ".gz")):
                raise BuildError(f"module {rel} is compressed; busybox modprobe cannot load it")
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
        with (dst / "modules.dep").open("w") as f:
            for rel in sorted(wanted):
                f.write(f"{rel}: {' '.join(deps[rel])}".rstrip() + "\n")
        names = {Path(rel).name.split(".ko")[0].replace("-", "_") for rel in wanted}
        with (dst / "modules.alias").open("w") as f:
            for line in (src / "modules.alias").read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[2].replace("-", "_") in names:
                    f.write(line + "\n")
        for extra in ("modules.builtin", "modules.softdep", "modules.order"):
            if (src / extra).exists():
                shutil.copy2(src / extra, dst / extra)
        (stage / "release").write_text(release + "\n")
        shutil.rmtree(mdir, ignore_errors=True)
        stage.rename(mdir)
        progress(f"{len(wanted)} modules for {release}")
    for deb in debs:
        deb.unlink()
    return mdir


def _modules_dep(path: Path) -> dict[str, list[str]]:
    deps = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            mod, rest = line.split(":", 1)
            deps[mod.strip()] = rest.split()
    return deps


def _libraries(binary: str) -> list[str]:
    """Absolute paths of the shared libraries (and the loader) ``ldd`` lists."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def add_tree(cp: Cpio, root: Path, prefix: str, seen: set[str]) -> None:
    for p in sorted(root.rglob("*")):
        rel = f"{prefix}/{p.relative_to(root).as_posix()}"
        if p.is_dir():
            _dirs(cp, rel, seen)
        else:
            _dirs(cp, rel.rsplit("/", 1)[0], seen)
            cp.file(rel, p.read_bytes(), 0o644)


def _dirs(cp: Cpio, path: str, seen: set[str]) -> None:
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d and d not in seen:
            seen.add(d)
            cp.dir(d)


def build_initrd(mods: Path, *, version: str) -> bytes:
    cp = Cpio()
    seen: set[str] = set()
    for d in ("bin", "sbin", "etc", "lib", "lib/netbootd", "proc", "sys", "dev", "tmp", "run",
              "usr", "usr/bin", "usr/sbin", "usr/local", "usr/local/bin"):
        _dirs(cp, d, seen)
    cp.chardev("dev/console", 5, 1)
    cp.chardev("dev/null", 1, 3, 0o666)
    cp.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cp.symlink("bin/sh", "busybox")
    cp.file("init", (INSTALLER_DIR / "init").read_bytes(), 0o755)
    cp.file("lib/netbootd/install-lib.sh", (INSTALLER_DIR / "install-lib.sh").read_bytes())
    cp.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    cp.file("etc/netbootd-version", (version + "\n").encode())
    libs: set[str] = set()
    for tool in TOOLS:
        path = shutil.which(tool)
        if path is None:
            raise BuildError(f"{tool} not found on this machine (apt-get install "
                             "curl zstd xz-utils gzip openssl coreutils)")
        cp.file(f"usr/local/bin/{tool}", Path(path).read_bytes(), 0o755)
        libs.update(_libraries(path))
    for lib in sorted(libs):
        rel = lib.lstrip("/")
        _dirs(cp, rel.rsplit("/", 1)[0], seen)
        cp.file(rel, Path(lib).read_bytes(), 0o755)   # read through symlinks: the real bytes
    add_tree(cp, mods / "lib" / "modules", "lib/modules", seen)
    return gzip.compress(cp.finish(), compresslevel=6, mtime=0)


#: The boot section of a Pi 5 installer: the firmware reads the whole tree over TFTP;
#: kernel and initrd name the files config.txt boots (the store checks they exist).
PI_BOOT = {"boot_tree": "boot", "kernel": "boot/kernel_2712.img",
           "initrd": "boot/initramfs_2712", "cmdline": ""}


def build_pi_tree(dest: Path, *, name: str, version: str, scale: float = 1.0) -> dict:
    """A synthetic Pi 5 installer boot tree under ``dest/boot``; returns the build spec.

    Content is pseudo-random, seeded by name and version, so two versions never share
    bytes; sizes follow a stock Pi 5 boot tree times ``scale``."""
    boot = dest / "boot"
    (boot / "overlays").mkdir(parents=True)
    marker = f"{name}-{version} (installer)"
    (boot / "config.txt").write_text(PI_CONFIG.format(marker=marker, version=version))
    rng = random.Random(f"installer/{name}/{version}")
    for rel, size in PI_FILES.items():
        head = f"netbootd synthetic installer {rel} {name} {version}\n".encode()
        n = max(len(head), int(size * scale))
        (boot / rel).write_bytes(head + rng.randbytes(n - len(head)))
    return {"kind": "installer", "boards": ["rpi5"], "boot": dict(PI_BOOT)}


def build(*, name: str, version: str, cache: Path, out: Path | None,
          incoming: Path | None, pi: bool = False, pi_scale: float = 1.0) -> Path:
    if out is not None:
        final = out.resolve()
        parent = final.parent
    else:
        parent = (incoming or HERE / "incoming").resolve()
        final = parent / f"{name}-{version}"
    if final.exists():
        raise BuildError(f"{final} already exists")
    if pi:
        return _publish(parent, final, name, version,
                        lambda tmp: build_pi_tree(tmp, name=name, version=version,
                                                  scale=pi_scale))
    if not BUSYBOX.exists():
        raise BuildError(f"{BUSYBOX} missing: apt-get install busybox-static")
    cache = cache.resolve()
    kdir = fetch_kernel(cache)
    mods = installer_modules(cache)

    def pc(tmp: Path) -> dict:
        (tmp / "boot").mkdir()
        shutil.copy2(kdir / "vmlinuz", tmp / "boot" / "vmlinuz")
        initrd = build_initrd(mods, version=version)
        (tmp / "boot" / "initrd.img").write_bytes(initrd)
        progress(f"initrd: {len(initrd) / 1e6:.1f} MB")
        return {"kind": "installer", "boards": ["x86_64"],
                "boot": {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                         "cmdline": "console=ttyS0"}}

    return _publish(parent, final, name, version, pc)


def _publish(parent: Path, final: Path, name: str, version: str,
             fill: Callable[[Path], dict]) -> Path:
    """Fill a dot-named directory in ``parent``, write its manifest, rename it to ``final``
    (the store's drop protocol: a half-written build is never seen under its name)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=parent))
    try:
        progress(f"building {name} {version} (installer) in {tmp}")
        spec = fill(tmp)
        write_manifest(tmp, name=name, version=version, spec=spec)
        for p in [tmp, *tmp.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o755)
        _fsync_tree(tmp)
        tmp.rename(final)
        progress(f"done: {final}")
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="installer", help="image name (default: installer)")
    ap.add_argument("--version", default=None, help="version (default: a UTC timestamp)")
    dest = ap.add_mutually_exclusive_group()
    dest.add_argument("--out", type=Path, help="write the build directory here (must not exist)")
    dest.add_argument("--incoming", type=Path,
                      help=f"drop the build into this incoming/ dir (default {HERE / 'incoming'})")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="kernel download cache")
    ap.add_argument("--pi", action="store_true",
                    help="a synthetic Raspberry Pi 5 installer boot tree (tests, lab)")
    ap.add_argument("--pi-scale", type=float, default=1.0,
                    help="size factor for --pi files (1.0 = ~33 MB boot tree)")
    args = ap.parse_args(argv)
    try:
        final = build(name=args.name, version=args.version or default_version(),
                      cache=args.cache, out=args.out, incoming=args.incoming, pi=args.pi,
                      pi_scale=args.pi_scale)
    except BuildError as exc:
        print(f"build-installer: error: {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
