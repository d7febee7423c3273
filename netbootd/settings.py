"""Daemon configuration: ``config/netbootd.yaml`` + ``NETBOOTD_*`` env + CLI flags.

Precedence: CLI > environment > file > defaults. Environment keys are
``NETBOOTD_<SECTION>__<KEY>`` (e.g. ``NETBOOTD_HTTP__PORT=9000``). Relative
paths in the file are relative to the file's directory, so the repo's
``config/`` runs as it is from anywhere. Every field carries a description:
``netbootd config`` prints the effective values, docs are generated from them.
"""

from __future__ import annotations

import os
import re
import socket
from contextvars import ContextVar
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .yamlfile import ConfigError, LineDict, load_yaml

ENV_PREFIX = "NETBOOTD_"

#: The parsed YAML of the file being loaded; a context variable, not a global, so two
#: daemons in one process (tests) cannot see each other's file.
_FILE_DATA: ContextVar[dict | None] = ContextVar("netbootd_settings_file", default=None)


class _YamlDataSource(PydanticBaseSettingsSource):
    """The config file as a settings source, below the environment in precedence."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_DATA.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get() or {})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkSettings(_Section):
    interfaces: list[str] = Field(
        default_factory=list,
        description="Interfaces to serve on; empty = every interface with an IPv4 address.")
    advertise: IPv4Address | None = Field(
        None, description="Server IPv4 put in replies (option 54, siaddr, URLs). "
        "Default: the address of the interface the request arrived on.")
    max_addresses: int = Field(
        4096, ge=16, description="Client address bindings remembered (learnt from the site "
        "DHCP server's ACKs); beyond it the least recently confirmed is forgotten (counted "
        "in netbootd_table_evictions_total{table=\"addresses\"}).")


class DhcpSettings(_Section):
    enabled: bool = Field(True, description="Run the proxy-DHCP service.")
    port: int = Field(67, ge=1, le=65535, description="Proxy-DHCP broadcast port.")
    pxe_port: int = Field(4011, ge=1, le=65535, description="PXE boot-server port.")
    client_port: int = Field(68, ge=1, le=65535,
                             description="Port replies are sent to (68; tests use others).")
    bind: str = Field("", description="Address to bind (empty = all; tests use a namespace).")
    bios_bootfile: str = Field("undionly.kpxe", description="Boot file for BIOS PXE.")
    uefi_x64_bootfile: str = Field("ipxe.efi", description="Boot file for x86-64 UEFI PXE "
                                   "(snponly.efi is the alternative for picky NICs).")
    uefi_arm64_bootfile: str = Field("snp.efi", description="Boot file for arm64 UEFI PXE.")
    uefi_arm64_grub_bootfile: str = Field(
        "grubnetaa64.efi", description="Boot file for arm64 UEFI PXE when "
        "dhcp.uefi_arm64_bootfile (an arm64 iPXE, which Debian does not ship) is not found: "
        "the GRUB network image images/build_grub.py builds from Debian's grub-efi-arm64-bin, "
        "looked up like the iPXE binaries; it loads a per-node grub.cfg over TFTP.")
    uboot_bootfile: str = Field(
        "boot.scr.uimg", description="Boot file for U-Boot clients: netbootd renders it per "
        "node (a U-Boot script that runs `pxe get; pxe boot`). The default is the name "
        "U-Boot's distro boot (`bootcmd_dhcp`) asks for; U-Boot's `pxe get` looks for "
        "pxelinux.cfg/ next to it.")
    rate_limit_per_mac: float = Field(
        10.0, gt=0, description="Replies per second per MAC at most; a looping client "
        "beyond it is dropped (and counted) so it cannot flood the daemon or the log.")
    memo_entries: int = Field(
        16384, ge=16, description="Distinct requests remembered with their classification "
        "and prepared replies; the oldest is forgotten beyond it (counted).")
    max_clients: int = Field(
        65536, ge=16, description="MACs tracked for rate limiting and event coalescing; "
        "the oldest is forgotten beyond it (counted), so random MACs cannot grow memory.")
    learn_from_acks: bool = Field(
        True, description="Learn client addresses from the site DHCP server's ACKs seen on "
        "the wire (needs CAP_NET_RAW; docs/security.md says what a proxy can observe).")
    site_servers: list[IPv4Address] = Field(
        default_factory=list, description="Only ACKs from these DHCP servers are evidence "
        "of an address (empty: any server whose server identifier is the ACK's source).")


class TftpSettings(_Section):
    enabled: bool = Field(True, description="Run the TFTP service.")
    port: int = Field(69, ge=1, le=65535, description="TFTP listen port.")
    bind: str = Field("", description="Address to bind (empty = all).")
    blksize_max: int = Field(1468, ge=8, le=65464,
                             description="Largest blksize granted (RFC 2348); 1468 fits a "
                             "1500-byte MTU, which is what a Pi asks for.")
    windowsize_max: int = Field(64, ge=1, le=65535, description="Largest windowsize granted "
                                "(RFC 7440).")
    retransmit_timeout: float = Field(1.0, gt=0, description="Seconds before a block is resent "
                                      "when the client does not ask for a timeout.")
    retries: int = Field(6, ge=1, description="Resends of one block before giving up.")
    max_transfers: int = Field(2000, ge=1, description="Concurrent transfers, all clients.")
    max_per_client: int = Field(64, ge=1, description="Concurrent transfers per client IP.")
    workers: int | None = Field(
        None, ge=0, description="Worker processes that run TFTP transfers (the daemon hands "
        "each one its socket and file), so the daemon's own CPU and GIL stay free for DHCP and "
        "HTTP. Unset = one per CPU; 0 = the block loop's threads run in the daemon itself.")
    pump_threads: int = Field(
        16, ge=1, description="Per process that runs transfers: threads running the TFTP "
        "block loop in C (netbootd/tftp/_pump.c). A new transfer goes to the least loaded "
        "thread, so up to this many each get a thread of their own (lowest latency per "
        "block) and more share them (each thread serves every ready transfer per wake-up, "
        "cheaper per block under load). Why 16: docs/tftp.md.")
    timeout_max: int = Field(
        10, ge=1, le=255, description="Largest retransmit timeout a client may ask for with "
        "the RFC 2349 'timeout' option, seconds; a larger value is refused (left out of the "
        "OACK), so nobody makes a silent transfer hold a slot for minutes.")
    stall_max: float = Field(
        20.0, gt=0, description="Seconds a transfer may go without an ACK that moves it on, "
        "whatever its timeout and retries, before it ends with ERROR 0 'Timeout'.")
    listen_rcvbuf: int = Field(
        4 * 1024 * 1024, ge=65536, description="Receive buffer of each TFTP listener, bytes "
        "(SO_RCVBUFFORCE when running as root, else SO_RCVBUF up to net.core.rmem_max), so a "
        "burst of requests (a rack powering on) waits in the kernel instead of being dropped.")
    ipxe_dir: Path = Field(Path("/usr/lib/ipxe"), description="Where the iPXE binaries "
                           "(undionly.kpxe, ipxe.efi, snponly.efi) live: Debian's ipxe package.")
    extra_ipxe_dirs: list[Path] = Field(
        default_factory=lambda: [Path("/usr/lib/ipxe/qemu")],
        description="More directories searched for iPXE binaries.")


class HttpSettings(_Section):
    enabled: bool = Field(True, description="Run the HTTP service.")
    port: int = Field(8080, ge=1, le=65535, description="HTTP listen port.")
    bind: str = Field("", description="Address to bind (empty = all).")
    public_url: str | None = Field(None, description="Base URL nodes use to reach this server "
                                   "(default http://<advertised address>:<port>).")
    api_token_file: Path | None = Field(
        None, description="File holding the bearer token for mutating API calls. "
        "Unset = mutating calls are refused.")
    read_open: bool = Field(True, description="Read-only API and status page need no token.")
    max_upload_bytes: int = Field(
        16 * 1024**3, ge=1, description="Largest build accepted by PUT /api/v1/images/... "
        "(a token holder must not be able to fill the disk).")
    access_log: bool = Field(False, description="Log every HTTP request at INFO (busy fleets: "
                             "a line per file and script fetch).")
    strict_user_data: bool = Field(
        True, description="Serve user-data that carries secrets only to the IP tied to that "
        "MAC by DHCP or the neighbour table; others get 403.")
    # -- slow clients and disk (docs/security.md) --
    idle_timeout: float = Field(
        15.0, gt=0, description="Seconds a connection may sit without a complete request "
        "head: an idle keep-alive connection, or a client still trickling its request line "
        "and headers (slow-header attack), is closed after this.")
    max_connections: int = Field(
        2000, ge=1, description="Concurrent HTTP connections at most; more are closed at "
        "once and counted (netbootd_http_connections_refused). Capped at half the process's "
        "open-file limit, so slow clients cannot take the descriptors TFTP needs.")


class ReloadSettings(_Section):
    settle_seconds: float = Field(
        0.5, ge=0, description="A changed nodes.yaml or template is read only once it has "
        "stayed the same (size, mtime and content) for this long: a file still being written "
        "is never loaded half-way.")
    max_node_loss: float = Field(
        0.5, ge=0, le=1, description="A hot reload that would drop more than this share of "
        "the nodes (or all of them) is refused, unless the new nodes.yaml says "
        "`allow_shrink: true` at its top level (docs/configuration.md).")


class EventSettings(_Section):
    max_nodes: int = Field(
        10000, ge=1, description="Machines kept in the node state table and their event "
        "timelines (also when replaying the event files at start); beyond it the "
        "least recently seen machine is evicted and counted "
        "(netbootd_event_nodes_evicted). Bounds memory under a flood of random MACs.")
    ignored_sample: int = Field(
        32, ge=0, description="Machines the daemon ignored (not in the fleet) are counted, "
        "not given a node row each; this many of the most recent are kept as a sample for "
        "the status page and API.")


class DnsSettings(_Section):
    enabled: bool = Field(False, description="Answer A queries for inventory hostnames.")
    port: int = Field(53, ge=1, le=65535, description="DNS listen port.")
    bind: str = Field("", description="Address to bind (empty = all).")
    domain: str = Field("lan", description="Domain appended to inventory hostnames.")


class PathSettings(_Section):
    images: Path = Field(Path("images"), description="Image store root (incoming/, store/, "
                         "channels/, rejected/, staging/).")
    state: Path = Field(Path("state"), description="Writable state: events, pins, history.")
    inventory: Path = Field(Path("nodes.yaml"), description="The fleet inventory.")
    templates: Path = Field(Path("templates"), description="Template directory.")
    node_state: Path | None = Field(
        None, description="Per-node writable NFS state directories (default <state>/nodes).")


class PolicySettings(_Section):
    unknown: Literal["ignore", "default"] = Field(
        "ignore", description="Machines not in the inventory: 'ignore' (say nothing) or boot "
        "them with the 'default' profile.")


class BootSettings(_Section):
    session_ttl: float = Field(300.0, gt=0, description="Seconds a boot plan stays fixed for a "
                               "machine: a boot that started on version N finishes on N.")
    default_image: str = Field("demo", description="Image used when a node/profile names none.")
    default_channel: str = Field("prod", description="Channel used when none is named.")
    os_plan_ttl: float = Field(86400.0, gt=0, description="Seconds the plan a booted OS "
                               "booted with stays known after its last request (its "
                               "cloud-init and events see that version).")
    max_sessions: int = Field(65536, ge=16, description="Boot sessions kept at most (and as "
                              "many booted-OS plans); the least recently seen are evicted.")


class HttpBootSettings(_Section):
    enabled: bool = Field(
        False, description="Serve Raspberry Pi HTTP boot (EEPROM BOOT_ORDER nibble 7): a "
        "signed boot.img and boot.sig per node, to nodes whose vars say `http_boot: true` "
        "(docs/rpi-netboot.md, section 6).")
    key_file: Path | None = Field(
        None, description="PEM RSA-2048 private key boot.sig is signed with; its public half "
        "goes into the EEPROM (`netbootd keys generate` makes both).")
    path: str = Field(
        "netboot", pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description="EEPROM HTTP_PATH: boot.img and boot.sig are served at "
        "/<path>/boot.img (the Pi found by its address) and /<path>/<serial or MAC with "
        "dashes>/boot.img.")
    host_name: str | None = Field(
        None, description="EEPROM HTTP_HOST as a DNS name (some bootloader releases ignore "
        "an IP address there): with dns.enabled, netbootd answers it with its advertised "
        "address.")
    cache_dir: Path | None = Field(
        None, description="Where built boot.img files are kept, per image version and "
        "content (default <paths.state>/http-boot). Expect one boot tree's size per node "
        "and kept version.")


class RpiSettings(_Section):
    boot_string: str = Field("Raspberry Pi Boot", description="PXE menu text the Pi bootloader "
                             "looks for in option 43 (EEPROM PXE_OPTION43 can change it).")
    ouis: list[str] = Field(
        default_factory=lambda: ["d8:3a:dd", "2c:cf:67", "88:a2:9e", "b8:27:eb", "dc:a6:32",
                                 "e4:5f:01", "28:cd:c1"],
        description="MAC prefixes of Raspberry Pi boards (used with the vendor class).")
    prefix_string: str | None = Field(None, description="EEPROM TFTP_PREFIX_STR, if the fleet "
                                      "uses TFTP_PREFIX=1.")
    pieeprom_dir: Path = Field(
        Path("pieeprom"), description="Directory of operator-made bootloader updates: a node "
        "whose vars name `pieeprom: <file>` in it is served that file as pieeprom.upd, with "
        "a generated pieeprom.sig (docs/rpi-netboot.md, section 7).")
    http_boot: HttpBootSettings = Field(default_factory=HttpBootSettings)


class StoreSettings(_Section):
    auto_activate: dict[str, str] = Field(
        default_factory=lambda: {"*": "dev"},
        description="Image name (or '*') -> channel a validated build is activated on. "
        "prod is never auto-activated unless named here.")
    keep: int = Field(3, ge=1, description="Versions kept per image by GC.")
    keep_booted_hours: float = Field(24.0, ge=0, description="Also keep versions booted within.")
    keep_rejected: int = Field(20, ge=0, description="Rejected builds kept in rejected/ "
                               "(newest first) for inspection; older ones are deleted by GC.")
    keep_history: int = Field(100, ge=1, description="Activation history entries kept per "
                              "image and channel by GC (entries naming a version still in "
                              "the store are always kept).")
    require_signature: bool = Field(False, description="Reject builds without a valid "
                                    "ed25519 signature by a trusted key.")
    trusted_keys: list[Path] = Field(default_factory=list, description="ed25519 public keys.")
    allow_devices: bool = Field(False, description="Allow device nodes in rootfs tarballs.")
    settle_seconds: float = Field(1.0, ge=0, description="A build renamed into incoming/ "
                                  "without a .ready marker is ingested after this many quiet "
                                  "seconds (builds written in place always wait for the marker).")
    gc_interval: float = Field(600.0, gt=0, description="Seconds between retention GC runs "
                               "in the daemon.")
    # -- hostile and careless builds (docs/store.md, "Limits") --
    max_unpacked_bytes: int = Field(64 << 30, ge=1, description="Most bytes one build may "
                                    "unpack or copy into staging; a build past it (a zip bomb) "
                                    "is rejected while it is written. The manifest's declared "
                                    "sizes bound it further.")
    min_free_bytes: int = Field(512 << 20, ge=0, description="Free space the store keeps on "
                                "its file system: an upload or ingest that would pass it stops "
                                "and fails (checked with statvfs while writing).")
    keep_rejected_max_bytes: int = Field(256 << 20, ge=0, description="A rejected build larger "
                                         "than this is deleted; rejected/ keeps only its "
                                         "reason and manifest.")


class ProvisionSettings(_Section):
    installer_image: str = Field("installer", description="Image (kind installer) that "
                                 "writes disk images; a node's install.installer overrides.")
    retry_failed: bool = Field(True, description="After install-failed, the next network "
                               "boot installs again; false = stay silent until "
                               "`netbootd nodes reinstall`.")
    max_nodes: int = Field(100_000, ge=1, description="Lifecycle records kept at most.")


class EtcdSettings(_Section):
    endpoints: list[str] = Field(
        default_factory=list, description="etcd client URLs (http:// or https://), tried in "
        "order; list every member so losing one changes nothing.")
    key_prefix: str = Field(
        "/netbootd/", description="Every key netbootd writes starts with this (one prefix "
        "per group of replicas sharing a fleet); must start and end with '/'.")
    ca_file: Path | None = Field(None, description="CA bundle that signed the etcd servers' "
                                 "certificates (https endpoints).")
    cert_file: Path | None = Field(None, description="Client certificate for etcd "
                                   "(--client-cert-auth); needs key_file.")
    key_file: Path | None = Field(None, description="Private key of cert_file.")
    timeout: float = Field(
        1.0, gt=0, le=30, description="Seconds one etcd request may take before the next "
        "endpoint is tried; past it the cluster counts as unreachable (open boots keep "
        "their plans, activations are refused).")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            scheme, sep, rest = url.partition("://")
            if scheme not in ("http", "https") or not sep or not rest.strip("/"):
                raise ValueError(f"etcd endpoint {url!r} must be an http:// or https:// URL")
        return [u.rstrip("/") for u in v]

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not (v.startswith("/") and v.endswith("/")) or len(v) < 2:
            raise ValueError(f"key_prefix {v!r} must start and end with '/' (e.g. /netbootd/)")
        return v

    @model_validator(mode="after")
    def _pair(self) -> EtcdSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate and key)")
        return self


class ClusterSettings(_Section):
    backend: Literal["local", "etcd"] = Field(
        "local", description="Where boot sessions, node lifecycle state, channel pointers "
        "and pins live: 'local' (this machine's state directory: one replica) or 'etcd' "
        "(shared by every replica using the same etcd key_prefix; docs/replicas.md).")
    name: str = Field(
        "", description="This replica's name in the cluster (status page, who planned a "
        "boot); empty = the host name. Unique per replica.")
    peer_url: str = Field(
        "", description="The URL other replicas reach this replica's HTTP service at (to "
        "copy builds from it); empty = http://<network.advertise, else the host name>:"
        "<http.port>.")
    replicate: bool = Field(
        True, description="Copy every build another replica holds and this one lacks "
        "(over HTTP, verified against the manifest). Activation through the API waits "
        "until enough live replicas hold the version (activation_quorum).")
    activation_quorum: Literal["all"] | int = Field(
        "all", description="How many live replicas must hold a version before an operator "
        "may activate it: 'all' (every live replica) or a number N >= 1 (at least N, this "
        "one included). Replicas that lack an active version stay silent for it until "
        "their copy lands.")
    event_ring: int = Field(
        64, ge=1, le=1024, description="Node events each replica keeps in etcd per node "
        "(a ring of keys, the oldest overwritten), so every replica's timeline of a node "
        "shows what the others saw.")
    event_ttl: float = Field(
        3600.0, ge=60, description="Seconds a replica's events stay in etcd after it "
        "stops renewing their lease (a dead replica's events vanish after this).")
    event_queue: int = Field(
        4096, ge=1, description="Node events waiting to be written to etcd at most; "
        "beyond it (etcd slow or away) new ones are dropped and counted "
        "(netbootd_cluster_events_dropped).")
    unknown_boot_rate: float = Field(
        100.0, gt=0, description="New boots of machines not in the inventory (policy.unknown: "
        "default) this replica agrees with the others per second at most, in bursts of as "
        "many; beyond it such a machine is not answered until a later retry "
        "(netbootd_unknown_boots_deferred). Each new boot is an etcd write that lives a "
        "session, so this bounds what a flood of random MACs costs etcd. Nodes in the "
        "inventory are never held back.")
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)

    @field_validator("peer_url")
    @classmethod
    def _peer_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"peer_url {v!r} must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("activation_quorum", mode="before")
    @classmethod
    def _quorum(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())  # from the environment
        if isinstance(v, bool) or (isinstance(v, int) and v < 1):
            raise ValueError(f"activation_quorum {v!r}: 'all' or a number of replicas >= 1")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v):
            raise ValueError(f"replica name {v!r}: letters, digits, '.', '_', '-' (<= 63)")
        return v

    @model_validator(mode="after")
    def _endpoints_for_etcd(self) -> ClusterSettings:
        if self.backend == "etcd" and not self.etcd.endpoints:
            raise ValueError("cluster.backend is 'etcd' but cluster.etcd.endpoints is empty")
        return self

    @property
    def replica(self) -> str:
        """The replica name in force (the host name unless configured)."""
        return self.name or socket.gethostname()


class NfsSettings(_Section):
    backend: Literal["none", "exportfs", "ganesha"] = Field(
        "none", description="How exports are applied.")
    clients: IPv4Network = Field(IPv4Network("0.0.0.0/0"), description="Network allowed to "
                                 "mount read-only rootfs exports.")
    server: IPv4Address | None = Field(None, description="NFS server address in cmdlines "
                                       "(default: the advertised address).")
    vers: str = Field("3", description="NFS version in cmdlines ('3' or '4.1').")
    exports_file: Path = Field(Path("/etc/exports.d/netbootd.exports"),
                               description="exportfs backend: file written atomically.")
    ganesha_config: Path | None = Field(None, description="ganesha backend: EXPORT file.")
    ganesha_reload: list[str] = Field(default_factory=list,
                                      description="ganesha backend: reload command.")
    ganesha_pidfile: Path | None = Field(None, description="ganesha backend: when no reload "
                                         "command is set, SIGHUP the pid in this file "
                                         "(ganesha >= 2.8 re-reads EXPORT blocks on SIGHUP).")
    state_settle_seconds: float = Field(
        10.0, ge=0, description="A node's read-write state export follows an address only "
        "after the address was confirmed (site server ACK + kernel neighbour table) and "
        "unchanged this long; a static nodes.yaml ip is used at once.")
    exportfs_command: list[str] = Field(default_factory=lambda: ["exportfs"],
                                        description="exportfs backend: the exportfs binary "
                                        "(called with -ra to apply, -s to check).")


class Settings(BaseSettings):
    """The whole effective configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
        case_sensitive=False)

    network: NetworkSettings = Field(default_factory=NetworkSettings)
    dhcp: DhcpSettings = Field(default_factory=DhcpSettings)
    tftp: TftpSettings = Field(default_factory=TftpSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    boot: BootSettings = Field(default_factory=BootSettings)
    rpi: RpiSettings = Field(default_factory=RpiSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    nfs: NfsSettings = Field(default_factory=NfsSettings)
    reload: ReloadSettings = Field(default_factory=ReloadSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    provision: ProvisionSettings = Field(default_factory=ProvisionSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    secrets: dict[str, Path] = Field(
        default_factory=dict, description="Secret name -> file. Read at render time, only into "
        "the user-data of the node being served; never logged.")
    config_file: Path | None = Field(None, exclude=True,
                                     description="Where this configuration came from.")

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, v: dict[str, Path]) -> dict[str, Path]:
        for k in v:
            if not k.isidentifier():
                raise ValueError(f"secret name {k!r} must be an identifier (used in templates)")
        return v

    @model_validator(mode="after")
    def _session_outlives_silence(self) -> Settings:
        # A boot session slides with every request and is held open by a running transfer;
        # between two files a client may be silent for as long as a transfer may stay
        # silent before it is given up (resends x timeout). A shorter TTL would let the
        # next file be planned afresh and mix versions.
        t = self.tftp
        silent = min(t.stall_max, max(t.retransmit_timeout, t.timeout_max) * (t.retries + 1))
        if self.boot.session_ttl < 2 * silent:
            raise ValueError(
                f"boot.session_ttl ({self.boot.session_ttl:g} s) must be at least twice the "
                f"longest silence of a TFTP transfer (min(tftp.stall_max, max("
                f"tftp.retransmit_timeout, tftp.timeout_max) x (tftp.retries + 1)) = "
                f"{silent:g} s)")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI flags (init) > NETBOOTD_* env > the YAML file > field defaults.
        return (init_settings, env_settings, _YamlDataSource(settings_cls))

    @property
    def lifecycle_dir(self) -> Path:
        """Where the provisioning lifecycle of each node is kept (nodestate.py)."""
        return self.paths.state / "lifecycle"

    @property
    def http_boot_dir(self) -> Path:
        """Where built boot.img/boot.sig pairs are cached (netbootd/rpi/bootimg.py)."""
        return self.rpi.http_boot.cache_dir or (self.paths.state / "http-boot")

    @property
    def node_state_dir(self) -> Path:
        return self.paths.node_state or (self.paths.state / "nodes")


def default_config_path() -> Path:
    """``NETBOOTD_CONFIG``, else ``./config/netbootd.yaml``, else ``/etc/netbootd/netbootd.yaml``."""
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    local = Path("config/netbootd.yaml")
    if local.exists():
        return local
    return Path("/etc/netbootd/netbootd.yaml")


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None,
                  *, use_default_path: bool = True) -> Settings:
    """Load and validate; raise ``ConfigError`` (file:line: field: message) when invalid.

    ``overrides`` are CLI flags as nested dicts (``{"http": {"port": 9000}}``).
    """
    if path is None and use_default_path:
        path = default_config_path()
    data: dict = LineDict()
    if path is not None and path.exists():
        data = load_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError.single(path, 1, "", "top level must be a mapping")
    token = _FILE_DATA.set(data)
    try:
        settings = Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError.from_validation(path or "<defaults>", data, exc) from exc
    finally:
        _FILE_DATA.reset(token)
    base = path.parent.resolve() if path is not None else Path.cwd()
    return _resolve_paths(settings, base, path)


def _resolve_paths(s: Settings, base: Path, path: Path | None) -> Settings:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    paths = s.paths.model_copy(update={
        "images": rel(s.paths.images), "state": rel(s.paths.state),
        "inventory": rel(s.paths.inventory), "templates": rel(s.paths.templates),
        "node_state": rel(s.paths.node_state) if s.paths.node_state else None,
    })
    http = s.http.model_copy(update={
        "api_token_file": rel(s.http.api_token_file) if s.http.api_token_file else None})
    secrets = {k: rel(v) for k, v in s.secrets.items()}
    store = s.store.model_copy(update={"trusted_keys": [rel(p) for p in s.store.trusted_keys]})
    hb = s.rpi.http_boot
    rpi = s.rpi.model_copy(update={
        "pieeprom_dir": rel(s.rpi.pieeprom_dir),
        "http_boot": hb.model_copy(update={
            "key_file": rel(hb.key_file) if hb.key_file else None,
            "cache_dir": rel(hb.cache_dir) if hb.cache_dir else None})})
    etcd = s.cluster.etcd
    cluster = s.cluster.model_copy(update={"etcd": etcd.model_copy(update={
        k: rel(getattr(etcd, k)) for k in ("ca_file", "cert_file", "key_file")
        if getattr(etcd, k) is not None})})
    tftp = s.tftp.model_copy(update={"ipxe_dir": rel(s.tftp.ipxe_dir),
                                     "extra_ipxe_dirs": [rel(p) for p in s.tftp.extra_ipxe_dirs]})
    return s.model_copy(update={
        "paths": paths, "http": http, "secrets": secrets, "store": store, "rpi": rpi,
        "tftp": tftp, "cluster": cluster,
        "config_file": path.resolve() if path else None})


def redacted(s: Settings) -> dict[str, Any]:
    """The effective configuration for printing.

    Settings hold only the *paths* of secrets (join tokens, the API token), never their
    contents, so the dump is safe as it is; this is the one place to mask a field should
    a secret value ever become a setting.
    """
    return s.model_dump(mode="json")
