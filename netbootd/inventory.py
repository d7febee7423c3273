"""The fleet inventory (``config/nodes.yaml``): nodes, profiles, selectors.

Pure: load + validate + look up. No sockets, no watching (``reload.py`` does
that). A node is keyed by its MAC in any common notation; a profile is chosen
for a machine the matchbox way: every selector of a profile must match, and the
profile with the most selectors wins. Two profiles that could match the same
machine with the same number of selectors are a config error, found at load
time, so the winner is always predictable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .model import Action, ClientFacts, NodeView, normalise_mac, normalise_serial
from .yamlfile import ConfigError, LineDict, Problem, line_of, load_yaml, paused_gc

DEFAULT_PROFILE = "default"
_SELECTOR_KEYS = ("mac", "serial", "arch", "kind")


class Selectors(BaseModel):
    """What a machine must look like for a profile to apply. All given keys must match."""

    model_config = ConfigDict(extra="forbid")
    mac: str | None = None
    serial: str | None = None
    arch: int | None = None
    kind: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return normalise_mac(v) if v is not None else None

    @field_validator("serial", mode="before")
    @classmethod
    def _serial(cls, v: Any) -> str | None:
        return normalise_serial(v) if v is not None else None

    def pairs(self) -> dict[str, str]:
        out = {k: str(getattr(self, k)) for k in _SELECTOR_KEYS if getattr(self, k) is not None}
        out.update({f"label.{k}": str(v) for k, v in self.labels.items()})
        return out


class InstallSpec(BaseModel):
    """What ``action: install`` writes to the node's disk, and with which installer."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="Disk image (kind disk) to install.")
    channel: str | None = Field(None, description="Its channel (default: the node's).")
    pin: str | None = Field(None, description="Install exactly this version.")
    installer: str | None = Field(None, description="Installer image (default: "
                                  "provision.installer_image).")
    upgrade: Literal["manual", "auto"] = Field(
        "manual", description="auto: an installed node installs again at its next network "
        "boot when its channel (or pin) names another version than the one on its disk "
        "(upgrades and rollbacks); manual: only `netbootd nodes reinstall` does.")

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Profile(BaseModel):
    """Defaults for every machine it matches; node entries override them."""

    model_config = ConfigDict(extra="forbid")
    selectors: Selectors = Field(default_factory=Selectors)
    action: Action | None = None
    role: str | None = None
    image: str | None = None
    channel: str | None = None
    install: InstallSpec | None = None
    templates: dict[str, str] = Field(default_factory=dict, description=(
        "artefact -> template file, e.g. {ipxe: custom.ipxe.j2, user-data: k3s.yaml.j2}"))
    vars: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    match: Literal["mac", "serial"] | None = Field(None, description=(
        "serial: the Pi serial alone identifies its nodes (a board whose NIC MAC is not "
        "the one in nodes.yaml); default mac: a serial counts only with the node's MAC"))


class Node(BaseModel):
    """One machine, keyed by MAC."""

    model_config = ConfigDict(extra="forbid")
    hostname: str | None = None
    serial: str | None = None
    role: str | None = None
    profile: str | None = None
    channel: str | None = None
    image: str | None = None
    pin: str | None = Field(None, description="Image version this node stays on.")
    action: Action | None = None
    install: InstallSpec | None = None
    ip: str | None = Field(None, description="Expected address (strict cloud-init, exports).")
    uuid: str | None = Field(None, description="SMBIOS UUID (matchbox-style `/metadata?uuid=`).")
    match: Literal["mac", "serial"] | None = Field(None, description=(
        "serial: this node's Pi serial alone identifies it, whatever MAC asks (default "
        "mac: a request carrying the serial must also come from the node's MAC)"))
    labels: dict[str, str] = Field(default_factory=dict)
    vars: dict[str, Any] = Field(default_factory=dict)
    templates: dict[str, str] = Field(default_factory=dict)

    @field_validator("serial", mode="before")
    @classmethod
    def _serial(cls, v: Any) -> str | None:
        return normalise_serial(v) if v is not None else None

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is None:
            return v
        label_ok = all(
            0 < len(p) <= 63 and p.replace("-", "").isalnum() and not p.startswith("-")
            for p in v.split("."))
        if not label_ok:
            raise ValueError(f"not a valid hostname: {v!r}")
        return v.lower()


class InventoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profiles: dict[str, Profile] = Field(default_factory=dict)
    nodes: dict[str, Node] = Field(default_factory=dict)
    #: This file may drop more nodes than ``reload.max_node_loss`` allows (or all of
    #: them) on a hot reload. Remove it again once the shrink is in force.
    allow_shrink: bool = False


@dataclass(frozen=True)
class Inventory:
    """A validated inventory. Immutable: a reload builds a new one and swaps it in."""

    nodes: dict[str, Node]
    profiles: dict[str, Profile]
    by_serial: dict[str, str]
    source: Path | None = None
    allow_shrink: bool = False  #: the file says a reload may drop many nodes

    @classmethod
    def empty(cls) -> Inventory:
        return cls(nodes={}, profiles={DEFAULT_PROFILE: Profile()}, by_serial={})

    def node_for(self, facts: ClientFacts) -> tuple[str, Node] | None:
        """Find a node by MAC, else by Pi serial when the node says its serial alone
        identifies it (``match: serial``, on the node or its profile). A serial is
        just bytes in option 97: anyone can send a known Pi's serial from another MAC."""
        if facts.mac in self.nodes:
            return facts.mac, self.nodes[facts.mac]
        if facts.serial and facts.serial in self.by_serial:
            mac = self.by_serial[facts.serial]
            node = self.nodes[mac]
            if self.serial_identifies(node):
                return mac, node
        return None

    def serial_identifies(self, node: Node) -> bool:
        """``match: serial`` on the node, else on its named profile."""
        if node.match is not None:
            return node.match == "serial"
        prof = self.profiles.get(node.profile) if node.profile else None
        return bool(prof is not None and prof.match == "serial")

    def mac_for_serial(self, serial: str) -> str | None:
        return self.by_serial.get(serial)

    def find(self, *, uuid: str | None = None, hostname: str | None = None,
             ip: str | None = None) -> str | None:
        """The MAC of the node with this SMBIOS UUID, hostname or static address."""
        for mac, node in self.nodes.items():
            if ip and node.ip == ip:
                return mac
            if uuid and node.uuid and node.uuid.lower() == uuid.lower():
                return mac
            if hostname and node.hostname == hostname.lower():
                return mac
        return None

    def choose_profile(self, facts: ClientFacts, labels: dict[str, str]) -> str:
        """The matching profile with the most selectors; ``default`` when none match."""
        values = facts.selector_values()
        values.update({f"label.{k}": v for k, v in labels.items()})
        best, best_n = DEFAULT_PROFILE, 0
        for name, prof in self.profiles.items():
            pairs = prof.selectors.pairs()
            if not pairs or name == DEFAULT_PROFILE:
                continue
            if all(values.get(k) == v for k, v in pairs.items()) and len(pairs) > best_n:
                best, best_n = name, len(pairs)
        return best

    def view(self, facts: ClientFacts) -> NodeView:
        """The effective node: profile defaults overlaid by the node's own values."""
        found = self.node_for(facts)
        mac, node = found if found else (facts.mac, None)
        labels = dict(node.labels) if node else {}
        pname = node.profile if node and node.profile else self.choose_profile(facts, labels)
        prof = self.profiles.get(pname) or Profile()

        def pick(attr: str, default: Any) -> Any:
            v = getattr(node, attr, None) if node else None
            if v is None:
                v = getattr(prof, attr, None)
            return default if v is None else v

        return NodeView(
            mac=mac,
            hostname=(node.hostname if node and node.hostname
                      else "node-" + mac.replace(":", "")[6:]),
            known=node is not None,
            profile=pname,
            role=pick("role", "worker"),
            serial=(node.serial if node and node.serial else facts.serial),
            channel=pick("channel", ""),
            image=pick("image", None),
            pin=node.pin if node else None,
            action=pick("action", None),
            labels={**prof.labels, **labels},
            vars={**prof.vars, **(node.vars if node else {})},
            templates={**prof.templates, **(node.templates if node else {})},
            install=(pick("install", None).as_dict() if pick("install", None) else {}),
            desired=pick("action", None),
        )


def load_inventory(path: Path, text: str | None = None) -> Inventory:
    """Parse and validate ``nodes.yaml`` (or ``text``, its content as already read);
    every problem names file, line and field."""
    with paused_gc():
        return inventory_from_data(path, load_yaml(path, text))


def inventory_from_data(path: Path, data: Any) -> Inventory:
    """Validate nodes.yaml's content as parsed (``load_yaml``: lines known, so problems
    name them; plain data: problems name line 1)."""
    if not isinstance(data, dict):
        raise ConfigError.single(path, 1, "", "top level must be a mapping with nodes/profiles")
    problems: list[Problem] = []

    # MAC keys: normalise, reject malformed and duplicates (aa:.. and AA-.. are the same).
    raw_nodes = data.get("nodes") or LineDict()
    nodes_in = LineDict()
    seen: dict[str, str] = {}
    if isinstance(raw_nodes, dict):
        for key, value in raw_nodes.items():
            line = raw_nodes.key_lines.get(key, 0) if isinstance(raw_nodes, LineDict) else 0
            try:
                mac = normalise_mac(str(key))
            except ValueError as exc:
                problems.append(Problem(str(path), line, f"nodes.{key}", str(exc)))
                continue
            if mac in seen:
                problems.append(Problem(str(path), line, f"nodes.{key}",
                                        f"duplicate MAC {mac} (also listed as {seen[mac]!r})"))
                continue
            seen[mac] = str(key)
            nodes_in[mac] = value if value is not None else LineDict()
            nodes_in.key_lines[mac] = line
        cleaned = dict(data)
        cleaned["nodes"] = nodes_in
    else:
        cleaned = data

    try:
        parsed = InventoryFile.model_validate(cleaned)
    except ValidationError as exc:
        err = ConfigError.from_validation(path, _relined(data, nodes_in), exc)
        raise ConfigError(problems + err.problems) from exc

    profiles = dict(parsed.profiles)
    profiles.setdefault(DEFAULT_PROFILE, Profile())
    by_serial: dict[str, str] = {}
    for mac, node in parsed.nodes.items():
        line = nodes_in.key_lines.get(mac, 0)
        if node.profile and node.profile not in profiles:
            problems.append(Problem(
                str(path), line_of(nodes_in, (mac, "profile")) or line,
                f"nodes.{seen[mac]}.profile",
                f"unknown profile {node.profile!r} (known: {', '.join(sorted(profiles))})"))
        if node.serial:
            if node.serial in by_serial:
                problems.append(Problem(str(path), line_of(nodes_in, (mac, "serial")) or line,
                                        f"nodes.{seen[mac]}.serial",
                                        f"serial {node.serial} also used by {by_serial[node.serial]}"))
            by_serial[node.serial] = mac
    problems.extend(ambiguous_profiles(path, data, profiles))
    if problems:
        raise ConfigError(problems)
    return Inventory(nodes=dict(parsed.nodes), profiles=profiles, by_serial=by_serial,
                     source=path, allow_shrink=parsed.allow_shrink)


def _relined(data: Any, nodes_in: LineDict) -> Any:
    """The YAML data with normalised node keys, so error lines still resolve."""
    if not isinstance(data, LineDict):
        return data
    out = LineDict(data)
    out.line, out.key_lines = data.line, dict(data.key_lines)
    out["nodes"] = nodes_in
    return out


def ambiguous_profiles(path: Path, data: Any, profiles: dict[str, Profile]) -> list[Problem]:
    """Two profiles with equally many selectors that one machine could satisfy both of."""
    problems = []
    names = [n for n in profiles if n != DEFAULT_PROFILE and profiles[n].selectors.pairs()]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = profiles[a].selectors.pairs(), profiles[b].selectors.pairs()
            if len(pa) != len(pb):
                continue
            if all(pb[k] == v for k, v in pa.items() if k in pb):
                problems.append(Problem(
                    str(path), line_of(data, ("profiles", b, "selectors")),
                    f"profiles.{b}.selectors",
                    f"ambiguous: ties with profile {a!r} ({len(pa)} selectors each) for a "
                    "machine that matches both; add a selector to one of them"))
    return problems
