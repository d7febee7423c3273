"""``netbootd`` command line: serve | check | plan | nodes | config | images | lab | version.

Flags given here beat ``NETBOOTD_*`` env, which beats the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .model import ClientFacts, ClientKind, normalise_mac, normalise_serial
from .settings import Settings, default_config_path, load_settings, redacted
from .yamlfile import ConfigError, Problem

log = logging.getLogger("netbootd")


def _optional(module: str) -> Any | None:
    """A module of a service that may not be installed/built yet (skip its commands)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags as nested settings (only those given)."""
    o: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    for svc in ("dhcp", "tftp", "http", "dns"):
        put(svc, "port", getattr(args, f"{svc}_port", None))
        if getattr(args, f"no_{svc}", False):
            put(svc, "enabled", False)
    put("dhcp", "pxe_port", getattr(args, "pxe_port", None))
    bind = getattr(args, "bind", None)
    for svc in ("dhcp", "tftp", "http", "dns"):
        put(svc, "bind", bind)
    if getattr(args, "interface", None):
        put("network", "interfaces", args.interface)
    put("network", "advertise", getattr(args, "advertise", None))
    put("paths", "images", getattr(args, "images", None))
    put("paths", "state", getattr(args, "state", None))
    put("paths", "inventory", getattr(args, "inventory", None))
    put("policy", "unknown", getattr(args, "unknown", None))
    return o


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.config) if args.config else default_config_path()
    return load_settings(path, _overrides(args))


def _resolver(settings: Settings) -> Any:
    """The image store (read-only use) if it is available, else an empty one."""
    mod = _optional("netbootd.store.store")
    if mod is None or not settings.paths.images.exists():
        from .planner import NoImages

        return NoImages()
    from .cluster import store_sharing

    return mod.ImageStore(settings.paths.images, settings.paths.state, settings.store,
                          shared=store_sharing(settings))


def cmd_serve(args: argparse.Namespace) -> int:
    from .inventorycache import InventoryLoader, parse_ahead

    settings = _settings(args)
    if not settings.http.access_log and log.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("netbootd.http.access").setLevel(logging.WARNING)
    # nodes.yaml parsed in a child while this process imports its services (a start
    # without a snapshot of it: inventorycache.parse_ahead says why)
    parsed = parse_ahead(settings.paths.inventory,
                         settings.paths.state / InventoryLoader.SNAPSHOT_NAME)
    from .app import preload_services
    from .daemon import build_app, serve

    preload_services(settings)
    parsed()
    app = build_app(settings, check_later=True)
    return asyncio.run(serve(app))


def cmd_check(args: argparse.Namespace) -> int:
    """Validate settings, inventory and every template for every node."""
    from .inventory import load_inventory
    from .planner import NoImages, fit_warnings
    from .render import Renderer
    from .rendercheck import CheckCache, StoreAnswers, check_forked

    settings = _settings(args)
    inventory = load_inventory(settings.paths.inventory)
    images = _resolver(settings)
    # What the daemon's checks found per node (it saves them in its state directory):
    # a node it rendered cleanly under the same templates, settings and code is not
    # rendered again. Read only: a check never writes the daemon's state.
    cache = CheckCache()
    cache.load(settings.paths.state / CheckCache.FILE_NAME)
    problems = check_forked(Renderer(settings, check_cache=cache), inventory, images, cache,
                            processes=len(os.sched_getaffinity(0)))
    problems += [Problem(str(settings.config_file or "-"), 0, f"secrets.{k}",
                         f"file not found: {p}")
                 for k, p in settings.secrets.items() if not p.exists()]
    if problems:
        raise ConfigError(problems)
    # without a store no image can be unfit for a node: nothing to plan again
    warnings = ([] if isinstance(images, NoImages)
                else fit_warnings(inventory, settings, StoreAnswers(images)))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {settings.config_file or 'defaults'}; {len(inventory.nodes)} nodes, "
          f"{len(inventory.profiles)} profiles, templates in {settings.paths.templates}")
    return 0


def _facts(args: argparse.Namespace) -> ClientFacts:
    serial = normalise_serial(args.serial) if args.serial else None
    kind = ClientKind(args.kind) if args.kind else (ClientKind.RPI if serial else ClientKind.IPXE)
    return ClientFacts(mac=normalise_mac(args.mac), serial=serial, arch=args.arch, kind=kind)


def cmd_plan(args: argparse.Namespace) -> int:
    """What would this machine get if it booted now?"""
    from .inventory import load_inventory
    from .planner import decide
    from .render import Renderer, ServerInfo

    settings = _settings(args)
    inventory = load_inventory(settings.paths.inventory)
    facts = _facts(args)
    found = inventory.node_for(facts)
    record = _node_state(settings).get(found[0] if found else facts.mac)
    plan = decide(facts, inventory, settings, _resolver(settings), record=record)
    out: dict[str, Any] = {
        "mac": plan.mac, "hostname": plan.node.hostname, "known": plan.node.known,
        "action": plan.action.value, "profile": plan.node.profile,
        "image": plan.image.name if plan.image else None,
        "version": plan.image.version if plan.image else None, "reason": plan.reason,
        "lifecycle": record.stage.value if record else None,
        "disk": f"{plan.disk.name} {plan.disk.version}" if plan.disk else None,
    }
    if plan.answers and plan.image is not None:
        r = Renderer(settings)
        server = ServerInfo(ip=args.server, http_port=settings.http.port,
                            public_url=settings.http.public_url)
        out["ipxe"] = r.render("ipxe", plan, server)
        out["cmdline"] = r.render("cmdline.txt", plan, server).strip()
        # What an arm64 board's own loader reads instead of the iPXE script.
        if facts.kind is ClientKind.UBOOT:
            out["extlinux"] = r.render("extlinux.conf", plan, server)
        elif facts.kind is ClientKind.PXE_UEFI_ARM64:
            out["grub"] = r.render("grub.cfg", plan, server)
    placeholder = args.server == PLACEHOLDER_SERVER
    out["server"] = args.server
    out["server_placeholder"] = placeholder
    demo = _demo_note(plan.image)
    out["demo"] = demo
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for key in ("mac", "hostname", "known", "action", "profile", "image", "version", "reason",
                "lifecycle", "disk"):
        if key in ("lifecycle", "disk") and out[key] is None:
            continue
        print(f"{key + ':':10} {out[key]}")
    if demo:
        print(f"{'note:':10} {demo}")
    if "cmdline" in out and placeholder:
        print(f"\nURLs below use {args.server}, a placeholder (TEST-NET-1, never a real "
              "host): a booting machine gets the address of the interface its request "
              "arrived on, or network.advertise; pass --server IP to see real ones.")
    if "cmdline" in out:
        print(f"\ncmdline.txt:\n  {out['cmdline']}\n\niPXE script:")
        print("".join(f"  {line}\n" for line in out["ipxe"].splitlines()), end="")
    for key, title in (("extlinux", "U-Boot pxelinux.cfg/01-<mac>"),
                       ("grub", "GRUB grub/grub.cfg-<mac>")):
        if key in out:
            print(f"\n{title}:")
            print("".join(f"  {line}\n" for line in out[key].splitlines()), end="")
    return 0


#: What ``plan`` renders URLs with when no --server is given: TEST-NET-1 (RFC 5737).
PLACEHOLDER_SERVER = "192.0.2.1"


def _demo_note(image: Any) -> str | None:
    """A sentence when the planned image is one of the embedded demo builds (their
    manifests carry ``boards`` and a boot tree or files that say so)."""
    if image is None:
        return None
    marker = image.root / "DEMO"
    if not marker.is_file():
        tree = image.boot.get("boot_tree")
        marker = image.root / tree / "DEMO.txt" if tree else marker
    if marker.is_file():
        first = marker.read_text(errors="replace").strip().splitlines()
        return (first[0] if first else "demo image") + \
            " (replace it: see 'Netboot your Raspberry Pi OS' in README.md)"
    return None


def _node_state(settings: Any) -> Any:
    """The lifecycle records: etcd's with ``cluster.backend: etcd``, else the local files
    (not created here: LocalNodeState makes its directory when it writes)."""
    from .cluster import open_node_state

    return open_node_state(settings, create=False)


def cmd_nodes(args: argparse.Namespace) -> int:
    """The inventory with what each node would get and its last known state; or an
    operator verb (reinstall | local | netboot) for one node."""
    if getattr(args, "verb", None):
        return _node_verb(args)
    from .events import EventLog
    from .inventory import load_inventory
    from .planner import decide

    settings = _settings(args)
    inventory = load_inventory(settings.paths.inventory)
    resolver = _resolver(settings)
    lifecycle = _node_state(settings)
    state = EventLog(None)
    events_file = settings.paths.state / "events.jsonl"
    if events_file.exists():
        state = EventLog(settings.paths.state)
        state.close()
    rows = []
    for mac, node in inventory.nodes.items():
        record = lifecycle.get(mac)
        plan = decide(ClientFacts(mac=mac, serial=node.serial), inventory, settings, resolver,
                      record=record)
        st = state.nodes.get(mac)
        stage = "-"
        if record is not None:
            stage = record.stage.value + (f" {record.progress}%" if record.stage.value ==
                                          "installing" and record.progress is not None else "")
        shown = plan.image or plan.disk
        rows.append((plan.node.hostname, mac, plan.node.profile, plan.action.value,
                     shown.version if shown else "-", stage,
                     st.phase if st else "-", (st.ip or "-") if st else "-"))
    header = ("HOSTNAME", "MAC", "PROFILE", "ACTION", "VERSION", "LIFECYCLE", "PHASE", "IP")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _node_verb(args: argparse.Namespace) -> int:
    """``netbootd nodes reinstall|local|netboot NODE`` (MAC or hostname). Writes the
    lifecycle record; a running daemon follows it at the node's next request."""
    from .inventory import load_inventory
    from .nodestate import NodeRecord, Stage

    if not args.node:
        print(f"netbootd: nodes {args.verb} needs a NODE (MAC or hostname)", file=sys.stderr)
        return 2
    settings = _settings(args)
    inventory = load_inventory(settings.paths.inventory)
    mac = None
    try:
        mac = normalise_mac(args.node)
    except ValueError:
        mac = next((m for m, n in inventory.nodes.items() if n.hostname == args.node.lower()),
                   None)
    if mac is None or mac not in inventory.nodes:
        print(f"netbootd: no node {args.node!r} in {settings.paths.inventory}", file=sys.stderr)
        return 2
    view = inventory.view(ClientFacts(mac=mac))
    stage = {"reinstall": Stage.INSTALL, "local": Stage.LOCAL, "netboot": Stage.NETBOOT}[
        args.verb]
    state = _node_state(settings)
    current = state.get(mac)
    rec = state.put(NodeRecord(mac=mac, stage=stage, by="cli",
                               desired=view.desired.value if view.desired else None,
                               image=current.image if current else None,
                               version=current.version if current else None))
    print(f"{view.hostname} ({mac}): lifecycle {rec.stage.value} (rev {rec.rev}); "
          "takes effect at its next network boot")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(config_reference())
        return 0
    print(json.dumps(redacted(_settings(args)), indent=2))
    return 0


def config_reference() -> str:
    """Markdown table of every setting, from the model itself (docs stay true)."""
    lines = ["| key | default | env | description |", "|---|---|---|---|"]
    for section, field in Settings.model_fields.items():
        if field.exclude:
            continue
        model = field.annotation if isinstance(field.annotation, type) else None
        sub = getattr(model, "model_fields", None)
        if not sub:
            lines.append(f"| `{section}` | | `NETBOOTD_{section.upper()}` | "
                         f"{field.description or ''} |")
            continue
        lines += _reference_rows([section], sub)
    return "\n".join(lines)


def _reference_rows(where: list[str], fields: dict[str, Any]) -> list[str]:
    """Rows for a section's fields; a nested section (``rpi.http_boot``) is flattened."""
    rows = []
    for key, f in fields.items():
        model = f.annotation if isinstance(f.annotation, type) else None
        sub = getattr(model, "model_fields", None)
        if sub:
            rows += _reference_rows([*where, key], sub)
            continue
        default = f.default_factory() if f.default_factory else f.default
        default = json.dumps(default, default=str)
        name, env = ".".join([*where, key]), "__".join(w.upper() for w in [*where, key])
        rows.append(f"| `{name}` | `{default}` | `NETBOOTD_{env}` | {f.description or ''} |")
    return rows


def cmd_keys(args: argparse.Namespace) -> int:
    """``netbootd keys generate``: the RSA-2048 pair for Raspberry Pi HTTP boot, and what
    goes into the EEPROM."""
    from .rpi import sign

    settings = _settings(args)
    hb = settings.rpi.http_boot
    out = Path(args.out) if args.out else (hb.key_file.parent if hb.key_file else
                                            settings.paths.state / "keys")
    try:
        priv, pub, key = sign.write_key_pair(out, force=args.force)
    except FileExistsError as exc:
        print(f"netbootd: {exc}", file=sys.stderr)
        return 1
    host = hb.host_name or (str(settings.network.advertise) if settings.network.advertise
                            else "<this server's name or address>")
    print(f"private key: {priv} (mode 0600; netbootd signs boot.sig with it)")
    print(f"public key:  {pub}\n")
    print(sign.public_pem(key).decode(), end="")
    print(f"""
# netbootd.yaml
rpi:
  http_boot:
    enabled: true
    key_file: {priv}
{f"    host_name: {hb.host_name}" if hb.host_name else "    # host_name: netboot.lan   (answered by netbootd's DNS, dns.enabled)"}

# EEPROM settings (sudo rpi-eeprom-config --edit, or a boot.conf for a fleet update):
BOOT_ORDER=0xf17   # read from the right: 7 = HTTP boot first, then 1 = SD card, f = again
HTTP_HOST={host}
HTTP_PORT={settings.http.port}
HTTP_PATH={hb.path}

# and the public key, on a Pi (docs/rpi-netboot.md, section 7):
#   rpi-eeprom-config --config boot.conf --pubkey {pub.name} --out pieeprom.upd pieeprom.bin
""")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"netbootd {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netbootd", description=__doc__)
    p.add_argument("--config", "-c", help="config file (default: $NETBOOTD_CONFIG, "
                   "./config/netbootd.yaml, /etc/netbootd/netbootd.yaml)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    for svc in ("dhcp", "tftp", "http", "dns"):
        s.add_argument(f"--{svc}-port", type=int)
        s.add_argument(f"--no-{svc}", action="store_true", help=f"disable {svc}")
    s.add_argument("--pxe-port", type=int)
    s.add_argument("--bind", help="bind DHCP/TFTP/HTTP to this address only")
    s.add_argument("--interface", action="append", help="serve on this interface (repeat)")
    s.add_argument("--advertise", help="server IPv4 put in replies")
    s.add_argument("--images", help="image store directory")
    s.add_argument("--state", help="state directory")
    s.add_argument("--inventory", help="nodes.yaml")
    s.add_argument("--unknown", choices=["ignore", "default"], help="policy for unknown MACs")
    s.set_defaults(func=cmd_serve)

    sub.add_parser("check", help="validate config, inventory and templates").set_defaults(
        func=cmd_check)

    pl = sub.add_parser("plan", help="what would this machine get?")
    pl.add_argument("mac")
    pl.add_argument("--serial", help="Raspberry Pi serial (hex)")
    pl.add_argument("--arch", type=int, help="DHCP option 93 client arch (0 BIOS, 7 UEFI x64)")
    pl.add_argument("--kind", choices=[k.value for k in ClientKind])
    pl.add_argument("--server", default=PLACEHOLDER_SERVER,
                    help="server address for rendered URLs (default: a placeholder)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    nd = sub.add_parser("nodes", help="list the inventory and node state; or reinstall | "
                        "local | netboot NODE")
    nd.add_argument("verb", nargs="?", choices=["reinstall", "local", "netboot"],
                    help="reinstall: install at the next network boot; local: boot from "
                    "disk, netbootd stays silent; netboot: network boots")
    nd.add_argument("node", nargs="?", help="MAC or hostname")
    nd.set_defaults(func=cmd_nodes)
    cf = sub.add_parser("config", help="print the effective configuration (secrets redacted)")
    cf.add_argument("--reference", action="store_true", help="print every setting as markdown")
    cf.set_defaults(func=cmd_config)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    ky = sub.add_parser("keys", help="generate: the key pair for Raspberry Pi HTTP boot")
    ky.add_argument("verb", choices=["generate"])
    ky.add_argument("--out", help="directory for http-boot.key and http-boot.pub.pem "
                    "(default: the directory of rpi.http_boot.key_file, else <state>/keys)")
    ky.add_argument("--force", action="store_true", help="replace an existing pair")
    ky.set_defaults(func=cmd_keys)

    store_cli = _optional("netbootd.store.cli")
    if store_cli is not None:
        store_cli.add_parsers(sub)
        images = sub.choices.get("images")
        if images is not None and images.get_default("func") is None:
            images.set_defaults(func=lambda a: store_cli.run(a, _settings(a)))
    lab = _optional("netbootd.lab.demo")
    if lab is not None and hasattr(lab, "add_parser"):
        lab.add_parser(sub)
    for child in _subparsers(p):
        _global_flags(child)
    return p


def _global_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--log-level`` on a subcommand too (``netbootd serve --config F``).
    SUPPRESS: given nowhere, the top-level default stands; given after the subcommand,
    it wins."""
    have = {o for a in parser._actions for o in a.option_strings}
    if "--config" not in have:
        parser.add_argument("--config", "-c", default=argparse.SUPPRESS,
                            help="config file (also accepted before the subcommand)")
    if "--log-level" not in have:
        parser.add_argument("--log-level", default=argparse.SUPPRESS,
                            help="DEBUG, INFO, WARNING, ERROR")


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand parser below ``parser``, at any depth."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += [child, *_subparsers(child)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"netbootd: configuration rejected ({len(exc.problems)} problem"
              f"{'s' if len(exc.problems) != 1 else ''}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad CLI argument such as a malformed MAC
        print(f"netbootd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
