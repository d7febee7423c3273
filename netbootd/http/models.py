"""pydantic models of the REST API: request bodies and responses.

They validate input (a bad body is a 400 naming the field, never a 500) and they
are the source of the OpenAPI document (``openapi.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..model import normalise_mac

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
#: MAC notations the API documents (normalise_mac accepts a few more, e.g. Cisco dots).
MAC_PATTERN = r"^[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}$"
SERIAL_PATTERN = r"^(0x)?[0-9A-Fa-f]{1,16}$"
Phase = Literal["booted", "provisioned", "joined", "failed", "installed", "installing"]


class _In(BaseModel):
    # strict: "true" is not a bool and 1 is not a string; a client bug shows up as a 400.
    model_config = ConfigDict(extra="forbid", str_max_length=4096, strict=True)


class EventIn(BaseModel):
    """A node reporting progress (from its image: booted, joined, ...)."""

    # Unknown keys are ignored, not refused: images in the field may send more.
    model_config = ConfigDict(extra="ignore", str_max_length=4096, strict=True)
    mac: str = Field(description="The node's MAC address (aa:bb:.., aa-bb-.., aabb..).",
                     max_length=32, pattern=MAC_PATTERN)
    phase: Phase = Field(description="What happened.")
    message: str = Field("", max_length=1000, description="Free text (shown on the status "
                         "page; never put secrets here).")
    image: str | None = Field(None, pattern=NAME_PATTERN, description="Image it runs.")
    version: str | None = Field(None, pattern=NAME_PATTERN, description="Version it runs.")
    token: str = Field("", max_length=64, description="The boot's token (``netbootd.token=`` "
                       "on its kernel command line); required for installing, installed, "
                       "booted and failed, which also must come from the node's address.")
    progress: int | None = Field(None, ge=0, le=100, description="Percent, with installing.")
    reason: str = Field("", max_length=1000, description="Why, with failed.")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return normalise_mac(v)


class ActivateIn(_In):
    version: str = Field(pattern=NAME_PATTERN, description="Version to make active.")
    channel: str = Field("prod", pattern=NAME_PATTERN, description="Channel to activate on.")


class RollbackIn(_In):
    channel: str = Field("prod", pattern=NAME_PATTERN,
                         description="Channel to point back at its previous version.")


class PinIn(_In):
    version: str = Field(pattern=NAME_PATTERN, description="Version this node stays on.")
    image: str | None = Field(None, pattern=NAME_PATTERN,
                              description="Image (default: the node's image).")


class GcIn(_In):
    dry_run: bool = Field(True, description="Only report what would be deleted.")


class Ok(BaseModel):
    ok: bool = True
    message: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)


class Error(BaseModel):
    error: str


class EventOut(BaseModel):
    ts: float = Field(description="Unix time.")
    kind: str
    message: str = ""
    fields: dict[str, Any] = Field(default_factory=dict)
    replica: str | None = Field(
        None, description="The replica that saw it (cluster.backend etcd: the timeline "
        "merges every replica's events); null with a single daemon.")


class NodeOut(BaseModel):
    mac: str
    hostname: str
    known: bool = Field(description="Listed in the inventory (else only seen on the wire).")
    profile: str
    role: str
    action: str = Field(description="What it gets now: netboot | install | local | ignore.")
    ip: str | None = None
    phase: str = Field("unknown", description="Last boot phase seen (dhcp, tftp, http, "
                       "kernel, booted, provisioned, installed, joined, failed).")
    image: str | None = None
    version: str | None = None
    last_seen: float | None = Field(None, description="Unix time of the last event.")
    message: str = ""
    lifecycle: str | None = Field(None, description="Provisioning stage: install, installing, "
                                  "installed, local, install-failed, netboot (none: never "
                                  "provisioned).")
    progress: int | None = Field(None, description="Install progress in percent.")
    installed: str | None = Field(None, description="Disk image and version installed.")


class NodeActionIn(_In):
    action: Literal["reinstall", "local", "netboot"] = Field(
        description="reinstall: install at the next network boot; local: boot from disk "
        "(netbootd stays silent); netboot: network boots whatever nodes.yaml says.")


class NodeDetail(NodeOut):
    timeline: list[EventOut] = Field(default_factory=list)


class NodeList(BaseModel):
    nodes: list[NodeOut]


class ImagesOut(BaseModel):
    images: list[dict[str, Any]] = Field(description="Images with versions and channels, as "
                                         "the store reports them.")
    rejected: list[dict[str, Any]] = Field(default_factory=list,
                                           description="Builds rejected by ingest, with reason.")
    store: dict[str, int] = Field(default_factory=dict, description=(
        "The whole store: logical_bytes (every version a full tree) and physical_bytes "
        "(each file shared between versions counted once). Each image has the same two."))


class PlanOut(BaseModel):
    mac: str
    action: str
    hostname: str
    known: bool
    profile: str
    image: str | None = None
    version: str | None = None
    channel: str | None = None
    pinned: bool = False
    reason: str
    ipxe: str | None = Field(None, description="The iPXE script it would get.")
    cmdline: str | None = Field(None, description="The Pi cmdline.txt it would get.")
    render_errors: list[str] = Field(default_factory=list)


class ReloadOut(BaseModel):
    ok: bool
    error: str | None = None
