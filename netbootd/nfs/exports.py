"""The desired NFS export set, computed from the store and the inventory. Pure.

- every version in the store that has a rootfs: ``<root>/<boot.rootfs>`` (the real
  absolute path, the same string the cmdline names), read-only to ``nfs.clients``;
- every inventory node with a known address: ``<node_state_dir>/<hostname>``
  read-write to that one address (its writable state: /var, logs, machine-id).

Versions are exported for as long as they are in the store; the store's GC never
deletes a version a boot session uses, so an export is retired only after the
last boot on it ended. Rendering for each backend is here too (pure text), so
the tests can read exactly what a server would be told.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from ..model import ImageRef


@dataclass(frozen=True, order=True)
class Export:
    """One exported directory and who may mount it."""

    path: Path
    clients: str  #: "10.0.0.0/24", "10.0.0.7" or "*"
    rw: bool
    what: str  #: "rootfs demo/2026.11.23-1" or "state pi-01"

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "clients": self.clients,
                "access": "rw" if self.rw else "ro", "what": self.what}


def clients_spec(network: IPv4Network | str) -> str:
    net = IPv4Network(str(network))
    return "*" if net.prefixlen == 0 else str(net)


def desired_exports(refs: Iterable[ImageRef], nodes: Iterable[tuple[str, str | None]], *,
                    clients: IPv4Network | str, node_state_dir: Path) -> list[Export]:
    """The export set (sorted, one entry per path). ``nodes``: (hostname, ip or None)."""
    out: dict[Path, Export] = {}
    ro = clients_spec(clients)
    for ref in refs:
        rootfs = ref.boot.get("rootfs")
        if not rootfs:
            continue
        path = ref.root / rootfs
        out.setdefault(path, Export(path, ro, False, f"rootfs {ref.name}/{ref.version}"))
    for hostname, ip in nodes:
        if not ip or not hostname:
            continue  # no address yet: exported once DHCP has seen the node
        path = node_state_dir / hostname
        out[path] = Export(path, ip, True, f"state {hostname}")
    return sorted(out.values())


def fsid_for(path: Path) -> str:
    """A stable fsid per path (exportfs needs one for file systems without a UUID)."""
    return str(uuid.UUID(bytes=hashlib.md5(str(path).encode(), usedforsecurity=False).digest()))


def _quote_exports_path(path: Path) -> str:
    """exports(5) path: octal-escape blanks and backslashes."""
    s = str(path)
    return "".join(f"\\{ord(c):03o}" if c in " \t\\#\"" else c for c in s)


def render_exportfs(exports: list[Export]) -> str:
    lines = ["# written by netbootd: do not edit (changes are overwritten)"]
    for e in exports:
        opts = ["rw" if e.rw else "ro", "no_subtree_check", "no_root_squash", "sync",
                f"fsid={fsid_for(e.path)}"]
        lines.append(f"{_quote_exports_path(e.path)} {e.clients}({','.join(opts)})  # {e.what}")
    return "\n".join(lines) + "\n"


def assign_ids(exports: list[Export], known: dict[str, int], first: int = 100
               ) -> dict[str, int]:
    """Export_Id per path, stable for a path's whole life (ganesha refuses a reload that
    moves an id to another path), new paths get fresh ids; retired paths are dropped."""
    ids = {str(e.path): known[str(e.path)] for e in exports if str(e.path) in known}
    nxt = max([first - 1, *known.values()]) + 1
    for e in exports:
        if str(e.path) not in ids:
            ids[str(e.path)] = nxt
            nxt += 1
    return ids


def render_ganesha(exports: list[Export], ids: dict[str, int], *, protocols: str = "3") -> str:
    blocks = ["# written by netbootd: do not edit (changes are overwritten)\n"]
    for e in exports:
        access = "RW" if e.rw else "RO"
        # Everyone: export-level access and no CLIENT block. ganesha takes "*" as a
        # host-name wildcard matched by reverse DNS (flaky on a LAN without PTR records)
        # and refuses mounts for "0.0.0.0/0" (MNT3ERR_ACCES) -- both measured in the lab.
        if e.clients == "*":
            export_access, client = access, ""
        else:
            export_access = "None"
            client = f"    CLIENT {{ Clients = {e.clients}; Access_Type = {access}; }}\n"
        path = str(e.path).replace('"', "")
        blocks.append(f"""# {e.what}
EXPORT {{
    Export_Id = {ids[str(e.path)]};
    Path = "{path}";
    Pseudo = "{path}";
    Protocols = {protocols};
    Transports = TCP;
    Access_Type = {export_access};
    Squash = No_Root_Squash;
    SecType = sys;
{client}    FSAL {{ Name = VFS; }}
}}
""")
    return "\n".join(blocks)
