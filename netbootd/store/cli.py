"""``netbootd images list | activate | rollback | pin | unpin | gc | rejected``.

Works on the store on disk, not through the daemon: every change is the same
atomic pointer/pins rewrite the daemon does, and a running daemon sees it on
its next resolve (pointer files are re-read when their inode changes). Reading
and pointer/pin edits work while a daemon runs; ``gc`` needs the store's writer
lock, so it is refused while a daemon owns the store (the daemon's GC knows the
open boot sessions, the CLI does not). The CLI never runs start-up recovery.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any

from ..model import normalise_mac
from ..settings import Settings
from .errors import Invalid, StoreError, StoreLocked
from .store import ImageStore


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
    return p


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


def _print_list(images: list[dict], pins: dict[str, dict]) -> None:
    if not images:
        print("no images")
    for img in images:
        chans = ", ".join(f"{c}={v}" for c, v in img["channels"].items()) or "no channels"
        print(f"{img['name']}  ({chans})")
        for v in img["versions"]:
            tags = [f"active:{c}" for c in v["active_on"]]
            tags += [f"pinned:{m}" for m in v["pinned_by"]]
            print(f"  {v['version']:24} {v['kind']:15} {v['size'] / 1e6:9.1f} MB  "
                  f"{v['created'][:19]}  {' '.join(tags)}")
    if pins:
        print("pins:")
        for mac, p in sorted(pins.items()):
            print(f"  {mac}  {p.get('image')} {p['version']}  (by {p.get('by')}, {p.get('when')})")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``images`` subcommand; 0 on success, 2 on a user mistake (message printed)."""
    store = ImageStore(settings.paths.images, settings.paths.state, settings.store)
    cmd = args.images_command
    try:
        if cmd == "list":
            images = store.list_images()
            if args.json:
                print(json.dumps({"images": images, "pins": store.pins(),
                                  "rejected": store.rejected()}, indent=2))
            else:
                _print_list(images, store.pins())
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
