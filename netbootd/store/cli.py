"""``netbootd images list | ingest | import | activate | rollback | pin | unpin | gc | rejected``.

Works on the store on disk, not through the daemon: every change is the same
atomic pointer/pins rewrite the daemon does, and a running daemon sees it on
its next resolve (pointer files are re-read when their inode changes). Reading
and pointer/pin edits work while a daemon runs; ``gc`` needs the store's writer
lock, so it is refused while a daemon owns the store (the daemon's GC knows the
open boot sessions, the CLI does not). The CLI never runs start-up recovery.

``ingest PATH`` and ``import IMAGE.img[.xz]`` put the build into ``incoming/`` under a
hidden name first and rename it into place in one step (the drop protocol of
docs/store.md). With no daemon on the store, the CLI then ingests it itself (under the
writer lock); with a daemon, the daemon's watcher ingests it and the CLI waits for the
verdict: the version in ``store/`` (accepted) or the entry in ``rejected/`` (refused).
Exit codes: 0 accepted, 1 rejected (reason printed), 2 a usage mistake, 3 no verdict
within ``--timeout``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..model import normalise_mac
from ..settings import Settings
from .errors import Invalid, StoreError, StoreLocked, valid_name
from .ingest import Rejected
from .layout import READY_SUFFIX
from .manifest import MANIFEST
from .store import ImageStore

#: Exit codes of ``ingest`` and ``import``.
ACCEPTED, REJECTED, USAGE, TIMEOUT = 0, 1, 2, 3


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``images`` and its subcommands to the top-level CLI."""
    p = subparsers.add_parser("images", help="the image store: list, activate, rollback, "
                              "pin, unpin, gc")
    sub = p.add_subparsers(dest="images_command", required=True)
    ls = sub.add_parser("list", help="images, versions, channels, pins, history")
    ls.add_argument("--json", action="store_true")
    a = sub.add_parser("activate", help="make VERSION the active version of IMAGE on a channel")
    a.add_argument("image")
    a.add_argument("version")
    a.add_argument("--channel", required=True)
    a.add_argument("--why", default="", help="reason, kept in the activation history")
    r = sub.add_parser("rollback", help="back to the previously active version of a channel")
    r.add_argument("image")
    r.add_argument("--channel", required=True)
    pn = sub.add_parser("pin", help="keep NODE (MAC or inventory hostname) on VERSION")
    pn.add_argument("node")
    pn.add_argument("version")
    pn.add_argument("--image", help="image (default: the node's image from the inventory)")
    up = sub.add_parser("unpin", help="let NODE follow its channel again")
    up.add_argument("node")
    g = sub.add_parser("gc", help="delete versions retention does not keep")
    g.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    rj = sub.add_parser("rejected", help="builds ingest refused, with the reason")
    rj.add_argument("--json", action="store_true")
    ig = sub.add_parser("ingest", help="add a build (directory or tar/tar.gz/tar.zst with "
                        "manifest.json); exit 0 accepted, 1 rejected, 3 timed out")
    ig.add_argument("path", type=Path)
    ig.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds to wait for a running daemon's verdict (default 3600)")
    im = sub.add_parser("import", help="turn a Raspberry Pi OS image (.img, .img.xz, .img.gz, "
                        ".img.zst) into a pi-boot+rootfs build and ingest it")
    im.add_argument("path", type=Path)
    im.add_argument("--name", help="image name (default: from the file name)")
    im.add_argument("--version", dest="image_version",
                    help="version (default: the file name's date, else its mtime)")
    im.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds to wait for a running daemon's verdict (default 3600)")
    return p


def _say(msg: str) -> None:
    print(f"netbootd: {msg}", file=sys.stderr, flush=True)


def _link_or_copy_tree(src: Path, dest: Path) -> None:
    """Copy a build directory keeping symlinks, modes and (as root) owners; hard links when
    ``src`` is on the same file system (no bytes copied)."""
    def copy(s: str, d: str) -> None:
        try:
            os.link(s, d, follow_symlinks=False)
        except OSError:
            shutil.copy2(s, d, follow_symlinks=False)
            if os.geteuid() == 0:
                st = os.lstat(s)
                os.lchown(d, st.st_uid, st.st_gid)
                if not os.path.islink(d):
                    os.chmod(d, st.st_mode & 0o7777)  # after chown (it clears setuid)

    shutil.copytree(src, dest, symlinks=True, copy_function=copy)
    if os.geteuid() == 0:
        for root, dirs, _ in os.walk(src):
            for name in ["", *dirs]:
                s = os.path.join(root, name) if name else root
                d = os.path.join(dest, os.path.relpath(s, src))
                st = os.lstat(s)
                if not os.path.islink(s):
                    os.lchown(d, st.st_uid, st.st_gid)
                    os.chmod(d, st.st_mode & 0o7777)


def _entry_name(store: ImageStore, base: str) -> str:
    name = base.rstrip("/") or "build"
    if name.startswith(".") or name.endswith((".tmp", ".partial", READY_SUFFIX)):
        name = "build-" + name.lstrip(".")
    inc = store.layout.incoming
    if os.path.lexists(inc / name) or os.path.lexists(inc / (name + READY_SUFFIX)):
        name = f"{name}-{os.getpid()}-{time.time_ns() % 10**6}"
    return name


def _peek(path: Path) -> tuple[str | None, str | None]:
    """Image and version a staged directory build says it is (None when unknown)."""
    try:
        m = json.loads((path / MANIFEST).read_text())
        return str(m["image"]), str(m["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def submit(store: ImageStore, staged: Path, name: str, *, timeout: float) -> dict:
    """Rename the hidden ``staged`` entry to ``incoming/<name>`` and get the verdict:
    ingest here when no daemon owns the store, else wait for the daemon's."""
    final = store.layout.incoming_entry(name)
    try:
        with store.writer.held("cli-ingest"):
            os.rename(staged, final)
            _say(f"no daemon owns {store.layout.incoming.parent}: ingesting here")
            result = store.intake.ingest_entry(name)
            if result is None:
                return {"accepted": False, "reason": "ingest was interrupted", "name": name}
            return result.to_dict()
    except StoreLocked as exc:
        _say(f"{exc}; handing {name} to that daemon and waiting for its verdict")
    image, version = _peek(staged) if staged.is_dir() else (None, None)
    t0 = time.monotonic()
    os.rename(staged, final)
    last = t0
    while os.path.lexists(final):
        now = time.monotonic()
        if now - t0 > timeout:
            return {"accepted": None, "name": name, "reason": f"no verdict after {timeout:.0f} "
                    f"s; the build stays in {final} and the daemon will still take it"}
        if now - last >= 10:
            last = now
            _say(f"waiting for the daemon: {name} ({now - t0:.0f} s)")
        time.sleep(0.1)
    for r in store.rejected():
        reason_file = store.layout.reason_file(r["name"])
        try:
            source = json.loads(reason_file.read_text()).get("source")
        except (OSError, ValueError):
            source = None
        if source == name:
            return {"accepted": False, "name": r["name"], "reason": r["reason"],
                    "image": r.get("image"), "version": r.get("version")}
    if image is None:  # an archive or an image: find the version that appeared
        newest = max(((i, v) for i in store.images() for v in store.versions(i)),
                     key=lambda iv: store.layout.version_dir(*iv).stat().st_mtime,
                     default=(None, None))
        image, version = newest
    activated = None
    if image and version:
        activated = next((c for c, v in store.channels(image).items() if v == version), None)
    return {"accepted": True, "name": name, "image": image, "version": version,
            "activated": activated}


def _report(cmd: str, result: dict) -> int:
    if result.get("accepted"):
        where = f", active on {result['activated']}" if result.get("activated") else \
            " (not activated: see store.auto_activate)"
        already = " (already in the store)" if result.get("already_present") else ""
        print(f"accepted: {result.get('image')} {result.get('version')}{already}{where}")
        return ACCEPTED
    if result.get("accepted") is None:
        print(f"netbootd images {cmd}: {result['reason']}")
        return TIMEOUT
    print(f"rejected: {result.get('reason')} (kept in rejected/{result.get('name')})")
    return REJECTED


def cmd_ingest(store: ImageStore, path: Path, timeout: float) -> int:
    if not os.path.lexists(path):
        print(f"netbootd images ingest: {path}: no such file or directory")
        return USAGE
    path = path.resolve()
    name = _entry_name(store, path.name)
    staged = store.layout.cli_temp(name)
    _say(f"copying {path} into {store.layout.incoming}")
    try:
        if path.is_dir():
            _link_or_copy_tree(path, staged)
        else:
            try:
                os.link(path, staged)
            except OSError:
                shutil.copyfile(path, staged)
        result = submit(store, staged, name, timeout=timeout)
    finally:
        if os.path.lexists(staged):
            shutil.rmtree(staged) if staged.is_dir() else staged.unlink()
    return _report("ingest", result)


def cmd_import(store: ImageStore, path: Path, name: str | None, version: str | None,
               timeout: float) -> int:
    from .importer import import_image, is_disk_image_name, name_version

    if not path.is_file():
        print(f"netbootd images import: {path}: not a file")
        return USAGE
    if not is_disk_image_name(path.name):
        _say(f"{path.name} is not named *.img, *.img.xz, *.img.gz or *.img.zst; trying anyway")
    guess_name, guess_version = name_version(path.name, path.stat().st_mtime)
    name, version = name or guess_name, version or guess_version
    valid_name(name, "image name")
    valid_name(version, "version")
    if os.geteuid() != 0:
        _say("not root: files in the root file system will belong to you, not to their "
             "owners (root, the system users); run as root for a usable rootfs")
    entry = _entry_name(store, f"{name}-{version}")
    staged = store.layout.cli_temp(entry)
    try:
        t0 = time.monotonic()
        try:
            got = import_image(path, staged, image=name, version=version, progress=_say,
                               scratch=store.layout.incoming)
        except Rejected as exc:
            print(f"rejected: {exc.reason}")
            return REJECTED
        _say(f"imported {name} {version} for {', '.join(got.boards)}: {got.files} files, "
             f"{got.bytes / 1e6:.0f} MB, {got.modes_fixed} modes restored"
             + (f", {got.skipped_special} device nodes/FIFOs skipped" if got.skipped_special
                else "") + f" ({time.monotonic() - t0:.1f} s)")
        result = submit(store, staged, entry, timeout=timeout)
    finally:
        if os.path.lexists(staged):
            shutil.rmtree(staged)
    return _report("import", result)


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry in a container
        return "cli"


def _node(settings: Settings, node: str) -> tuple[str, str | None]:
    """MAC and inventory image for NODE (a MAC or an inventory hostname)."""
    inv = None
    if Path(settings.paths.inventory).exists():
        from ..inventory import load_inventory

        inv = load_inventory(settings.paths.inventory)
    try:
        mac = normalise_mac(node)
    except ValueError:
        mac = None
    if inv is not None:
        for m, n in inv.nodes.items():
            if m == mac or (mac is None and n.hostname == node.lower()):
                prof = inv.profiles.get(n.profile or "default")
                return m, n.image or (prof.image if prof else None)
    if mac is None:
        raise Invalid(f"{node!r} is neither a MAC address nor an inventory hostname")
    return mac, None


def _bytes(d: dict) -> str:
    return (f"{d.get('physical_bytes', 0) / 1e6:.1f} MB on disk, "
            f"{d.get('logical_bytes', 0) / 1e6:.1f} MB logical")


def _print_list(images: list[dict], pins: dict[str, dict], total: dict[str, int]) -> None:
    if not images:
        print("no images")
    for img in images:
        chans = ", ".join(f"{c}={v}" for c, v in img["channels"].items()) or "no channels"
        print(f"{img['name']}  ({chans})  {_bytes(img)}")
        for v in img["versions"]:
            tags = [f"active:{c}" for c in v["active_on"]]
            tags += [f"pinned:{m}" for m in v["pinned_by"]]
            print(f"  {v['version']:24} {v['kind']:15} {v['size'] / 1e6:9.1f} MB  "
                  f"{v['created'][:19]}  {' '.join(tags)}")
    if images:
        print(f"store: {_bytes(total)} (files equal between versions are stored once)")
    if pins:
        print("pins:")
        for mac, p in sorted(pins.items()):
            print(f"  {mac}  {p.get('image')} {p['version']}  (by {p.get('by')}, {p.get('when')})")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``images`` subcommand; 0 on success, 2 on a user mistake (message printed)."""
    from ..cluster import store_sharing

    store = ImageStore(settings.paths.images, settings.paths.state, settings.store,
                       shared=store_sharing(settings))
    cmd = args.images_command
    try:
        if cmd == "ingest":
            return cmd_ingest(store, args.path, args.timeout)
        if cmd == "import":
            return cmd_import(store, args.path, args.name, args.image_version, args.timeout)
        if cmd == "list":
            images = store.list_images()
            if args.json:
                print(json.dumps({"images": images, "pins": store.pins(),
                                  "rejected": store.rejected(), "store": store.bytes_used()},
                                 indent=2))
            else:
                _print_list(images, store.pins(), store.bytes_used())
        elif cmd == "activate":
            store.activate(args.image, args.version, args.channel, by=_who(), why=args.why)
            print(f"{args.image} {args.version} is active on {args.channel}")
        elif cmd == "rollback":
            v = store.rollback(args.image, args.channel, by=_who())
            print(f"{args.image} rolled back to {v} on {args.channel}")
        elif cmd == "pin":
            mac, inv_image = _node(settings, args.node)
            image = args.image or inv_image
            store.pin(mac, args.version, image, by=_who())
            print(f"{mac} pinned to {store.pins()[mac]['image']} {args.version}")
        elif cmd == "unpin":
            mac, _ = _node(settings, args.node)
            store.unpin(mac)
            print(f"{mac} unpinned")
        elif cmd == "gc":
            if settings.cluster.backend == "etcd":
                # what is retired is the cluster leader's decision (cluster/retire.py):
                # this replica's rules alone could delete a version booting elsewhere
                print("netbootd images gc: with cluster.backend etcd the cluster's leader "
                      "decides what is deleted; run POST /api/v1/images/gc on any running "
                      "replica (each also runs it every store.gc_interval)")
                return 2
            victims = store.gc(dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            for image, version in victims:
                print(f"{verb} {image} {version}")
            old = store.prune_rejected(settings.store.keep_rejected, dry_run=args.dry_run)
            for name in old:
                print(f"{verb} rejected build {name}")
            pruned = store.prune_history(settings.store.keep_history, dry_run=args.dry_run)
            if pruned:
                print(f"{verb} {pruned} old activation history entries")
            if not victims and not old and not pruned:
                print("nothing to delete")
        elif cmd == "rejected":
            rows = store.rejected()
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in [] if args.json else rows:
                print(f"{r['when']}  {r['name']}: {r['reason']}")
        else:  # pragma: no cover - argparse prevents it
            raise Invalid(f"unknown images command {cmd!r}")
    except StoreLocked as exc:
        print(f"netbootd images {cmd}: {exc}; the daemon runs GC every store.gc_interval, "
              "POST /api/v1/images/gc runs it now")
        return 2
    except StoreError as exc:
        print(f"netbootd images {cmd}: {exc}")
        return 2
    return 0
