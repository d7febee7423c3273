"""Planner decisions and the boot-session cache (a boot on N finishes on N)."""

from pathlib import Path

from netbootd.inventory import load_inventory
from netbootd.model import Action, ClientFacts, ClientKind, ImageRef
from netbootd.planner import Planner, decide
from netbootd.settings import load_settings


class SwitchableStore:
    """An image store whose active version a test can change (policy fake, not a peer)."""

    def __init__(self) -> None:
        self.active = "1"
        self.pins: dict[str, str] = {}

    def resolve(self, image, channel, pin, *, mac=None):
        version = pin or self.pins.get(mac or "") or self.active
        return ImageRef(name=image, version=version, root=Path("/store") / image / version,
                        channel=channel, pinned=bool(pin or mac in self.pins))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(tmp_path, unknown="ignore"):
    (tmp_path / "nodes.yaml").write_text("""
profiles:
  rpis: {selectors: {kind: rpi}, image: pi-os, channel: dev}
nodes:
  aa:bb:cc:dd:ee:01: {hostname: n1}
  aa:bb:cc:dd:ee:02: {hostname: n2, action: local}
  aa:bb:cc:dd:ee:03: {hostname: n3, pin: "0.9"}
  aa:bb:cc:dd:ee:04: {hostname: n4, action: ignore}
""")
    settings = load_settings(None, {"paths": {"inventory": str(tmp_path / "nodes.yaml")},
                                    "policy": {"unknown": unknown},
                                    "boot": {"session_ttl": 60}}, use_default_path=False)
    inventory = load_inventory(settings.paths.inventory)
    return settings, inventory


def test_actions(tmp_path):
    settings, inv = setup(tmp_path)
    store = SwitchableStore()
    p = decide(ClientFacts(mac="aa:bb:cc:dd:ee:01"), inv, settings, store)
    assert p.action == Action.NETBOOT and p.image.version == "1" and p.image.name == "demo"
    assert decide(ClientFacts(mac="aa:bb:cc:dd:ee:02"), inv, settings, store).action == Action.LOCAL
    assert decide(ClientFacts(mac="aa:bb:cc:dd:ee:04"), inv, settings, store).action == Action.IGNORE
    pinned = decide(ClientFacts(mac="aa:bb:cc:dd:ee:03"), inv, settings, store)
    assert pinned.image.version == "0.9" and "pinned" in pinned.reason


def test_session_and_token_are_random_unless_given(tmp_path):
    """The render check passes fixed ones (a plan key must be the node's content); a
    boot gets fresh ones each time."""
    settings, inv = setup(tmp_path)
    facts, store = ClientFacts(mac="aa:bb:cc:dd:ee:01"), SwitchableStore()
    a, b = decide(facts, inv, settings, store), decide(facts, inv, settings, store)
    assert a.session != b.session and a.token != b.token
    fixed = decide(facts, inv, settings, store, now=0.0, session="s" * 12, token="t" * 24)
    assert (fixed.session, fixed.token, fixed.created) == ("s" * 12, "t" * 24, 0.0)
    assert (fixed.action, fixed.image, fixed.reason) == (a.action, a.image, a.reason)


def test_unknown_machine_policy(tmp_path):
    settings, inv = setup(tmp_path, unknown="ignore")
    stranger = ClientFacts(mac="02:00:00:00:00:99", kind=ClientKind.RPI)
    p = decide(stranger, inv, settings, SwitchableStore())
    assert p.action == Action.IGNORE and not p.answers
    settings, inv = setup(tmp_path, unknown="default")
    p = decide(stranger, inv, settings, SwitchableStore())
    assert p.action == Action.NETBOOT and p.node.profile == "rpis" and p.image.name == "pi-os"
    assert p.image.channel == "dev"


def test_no_image_is_explained(tmp_path):
    settings, inv = setup(tmp_path)

    class Empty:
        def resolve(self, *a, **k):
            return None

    p = decide(ClientFacts(mac="aa:bb:cc:dd:ee:01"), inv, settings, Empty())
    assert p.image is None and "no version of image 'demo'" in p.reason


def test_boot_session_keeps_version_across_hot_swap(tmp_path):
    settings, inv = setup(tmp_path)
    store, clock = SwitchableStore(), Clock()
    planner = Planner(lambda: settings, lambda: inv, store, clock=clock)
    a = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    first = planner.plan(a)
    store.active = "2"  # hot swap while A is booting
    clock.now += 30
    assert planner.plan(a).image.version == "1", "a boot in flight must stay on N"
    assert planner.plan(a).session == first.session
    b = ClientFacts(mac="aa:bb:cc:dd:ee:03")
    assert planner.plan(b).image.version == "0.9"
    assert planner.versions_in_use() == {("demo", "1"), ("demo", "0.9")}
    planner.end_session(a.mac)  # booted callback
    assert planner.plan(a).image.version == "2", "the next boot gets N+1"


def test_session_expires_after_idle_ttl(tmp_path):
    settings, inv = setup(tmp_path)
    store, clock = SwitchableStore(), Clock()
    planner = Planner(lambda: settings, lambda: inv, store, clock=clock)
    a = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    planner.plan(a)
    store.active = "2"
    clock.now += 59
    assert planner.plan(a).image.version == "1"  # still asking: session slides
    clock.now += 61
    assert planner.current(a.mac) is None
    assert planner.plan(a).image.version == "2"
    assert planner.peek(a).session != planner.plan(a).session  # peek never caches


class CountingStore(SwitchableStore):
    """SwitchableStore that counts what the planner records as used (retention)."""

    def __init__(self, active: str | None = "1", boards: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.active = active
        self.boards = boards
        self.used: list[tuple[str, str]] = []

    def resolve(self, image, channel, pin, *, mac=None):
        if self.active is None and not pin:
            return None
        ref = super().resolve(image, channel, pin, mac=mac)
        return ImageRef(name=ref.name, version=ref.version, root=ref.root, channel=channel,
                        pinned=ref.pinned, boards=self.boards)

    def mark_used(self, image, version):
        self.used.append((image, version))


def planner_for(tmp_path, store, **boot):
    settings, inv = setup(tmp_path)
    if boot:
        settings = settings.model_copy(update={
            "boot": settings.boot.model_copy(update=boot)})
    clock = Clock()
    return Planner(lambda: settings, lambda: inv, store, clock=clock), clock


def test_plan_without_image_is_never_sticky(tmp_path):
    store = CountingStore(active=None)
    planner, clock = planner_for(tmp_path, store)
    pi = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    assert planner.plan(pi).image is None
    clock.now += 0.4
    assert planner.plan(pi).image is None
    store.active = "1"  # the image goes live while the machine keeps retrying
    planner.changed()  # what the store service does on every activation
    clock.now += 0.4
    assert planner.plan(pi).image.version == "1"


def test_a_plan_that_boots_nothing_is_reused_only_briefly(tmp_path):
    store = CountingStore(active=None)
    planner, clock = planner_for(tmp_path, store)
    pc = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    first = planner.plan(pc)
    clock.now += 0.5
    assert planner.plan(pc) is first, "a retry within the second is not decided again"
    store.active = "1"  # activated without telling the planner: seen within a second
    clock.now += 0.6
    assert planner.plan(pc).image.version == "1"


def test_transfer_in_progress_holds_the_session(tmp_path):
    store = CountingStore()
    planner, clock = planner_for(tmp_path, store)
    a = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    planner.plan(a)
    planner.hold(a.mac)  # a long initramfs transfer starts
    store.active = "2"
    clock.now += 400  # longer than session_ttl (60)
    assert planner.plan(a).image.version == "1", "the next file of the boot stays on N"
    planner.release(a.mac)
    clock.now += 59
    assert planner.current(a.mac).image.version == "1"
    clock.now += 61
    assert planner.plan(a).image.version == "2"


def test_handover_ends_the_firmware_session_but_not_the_os_plan(tmp_path):
    store = CountingStore()
    planner, clock = planner_for(tmp_path, store)
    a = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    planner.plan(a)
    planner.handed_over(a.mac)  # iPXE's beacon: the kernel runs
    store.active = "2"
    clock.now += 400
    assert planner.current(a.mac).image.version == "1", "the OS's cloud-init sees N"
    assert planner.plan(a).image.version == "2", "a power cycle plans afresh"
    assert planner.current(a.mac).image.version == "2", "the new firmware session wins"


def test_peek_has_no_side_effects_and_retention_is_recorded_once_per_session(tmp_path):
    store = CountingStore()
    planner, _clock = planner_for(tmp_path, store)
    a = ClientFacts(mac="aa:bb:cc:dd:ee:01")
    for _ in range(3):
        planner.peek(a)
    assert store.used == [] and planner.sessions() == []
    planner.plan(a)
    planner.plan(a)
    assert store.used == [("demo", "1")]


def test_pi_is_not_planned_onto_an_image_without_a_pi_boot_tree(tmp_path):
    store = CountingStore(boards=("x86_64",))
    planner, _ = planner_for(tmp_path, store)
    pi = ClientFacts(mac="aa:bb:cc:dd:ee:01", kind=ClientKind.RPI, serial="a1b2c3d4")
    p = planner.plan(pi)
    assert p.action == Action.IGNORE and not p.answers
    assert "no Raspberry Pi boot tree" in p.reason
    pc = ClientFacts(mac="aa:bb:cc:dd:ee:01", kind=ClientKind.PXE_BIOS, arch=0)
    assert planner.plan(pc).image.version == "1"
    arm = ClientFacts(mac="aa:bb:cc:dd:ee:05", kind=ClientKind.PXE_UEFI_ARM64, arch=11)
    settings, inv = setup(tmp_path, unknown="default")
    assert "does not boot arm64" in decide(arm, inv, settings, store).reason


def test_session_table_is_bounded_and_evicts_oldest(tmp_path):
    store = CountingStore()
    planner, _clock = planner_for(tmp_path, store, max_sessions=16)
    settings, inv = setup(tmp_path, unknown="default")
    planner._inventory = lambda: inv
    planner._settings = lambda: settings.model_copy(update={
        "boot": settings.boot.model_copy(update={"max_sessions": 16})})
    for i in range(100):
        planner.plan(ClientFacts(mac=f"02:00:00:00:01:{i:02x}"))
    assert len(planner.sessions()) == 16 and planner.evicted == 84
    assert planner.current("02:00:00:00:01:63") is not None  # the newest survive


def test_check_warns_about_a_pi_on_an_image_without_a_pi_boot_tree(tmp_path):
    from netbootd.planner import fit_warnings

    (tmp_path / "nodes.yaml").write_text("""
nodes:
  d8:3a:dd:12:34:56: {hostname: pi1, serial: a1b2c3d4}
  52:54:00:00:00:01: {hostname: pc1}
""")
    settings = load_settings(None, {"paths": {"inventory": str(tmp_path / "nodes.yaml")}},
                             use_default_path=False)
    inv = load_inventory(settings.paths.inventory)
    warnings = fit_warnings(inv, settings, CountingStore(boards=("x86_64",)))
    assert len(warnings) == 1 and "pi1" in warnings[0] and "no Raspberry Pi boot tree" \
        in warnings[0]
    # boards alone are not a Pi boot tree: the image must carry one
    assert len(fit_warnings(inv, settings, CountingStore(boards=("rpi5",)))) == 1


class DiskStore:
    """Channels of a disk image ``gold`` and an installer, switchable by the test."""

    def __init__(self) -> None:
        self.gold = "1"

    def resolve(self, image, channel, pin, *, mac=None):
        from netbootd.model import DiskImage

        if image == "installer":
            return ImageRef(name=image, version="i1", root=Path("/s/installer/i1"),
                            kind="installer", channel=channel)
        version = pin or self.gold
        return ImageRef(name=image, version=version, root=Path(f"/s/gold/{version}"),
                        kind="disk", channel=channel, pinned=bool(pin),
                        disk=DiskImage(path="d.img.zst", compression="zst", size=1,
                                       sha256="0" * 64, uncompressed_size=2,
                                       uncompressed_sha256="1" * 64))


def test_installed_nodes_with_upgrade_auto_follow_their_disk_channel(tmp_path):
    from netbootd.nodestate import NodeRecord, Stage

    (tmp_path / "nodes.yaml").write_text("""
nodes:
  aa:bb:cc:dd:ee:01: {hostname: auto, action: install, install: {image: gold, upgrade: auto}}
  aa:bb:cc:dd:ee:02: {hostname: manual, action: install, install: {image: gold}}
""")
    settings = load_settings(None, {"paths": {"inventory": str(tmp_path / "nodes.yaml")}},
                             use_default_path=False)
    inv = load_inventory(settings.paths.inventory)
    store = DiskStore()

    def plan(mac):
        rec = NodeRecord(mac=mac, stage=Stage.LOCAL, image="gold", version="1",
                         desired="install")
        return decide(ClientFacts(mac=mac, kind=ClientKind.IPXE), inv, settings, store,
                      record=rec)

    assert plan("aa:bb:cc:dd:ee:01").action == Action.LOCAL, "on disk = wanted: silence"
    store.gold = "2"  # a newer disk image activated (or a rollback to an older one)
    up = plan("aa:bb:cc:dd:ee:01")
    assert up.action == Action.INSTALL and up.disk.version == "2"
    assert "upgrade: gold 1 on disk, gold 2 wanted" in up.reason
    assert plan("aa:bb:cc:dd:ee:02").action == Action.LOCAL, "manual nodes wait for reinstall"
