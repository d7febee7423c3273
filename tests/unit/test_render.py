"""Templates: shipped ones render for every node; errors name template and line."""

from pathlib import Path

import pytest

from netbootd.inventory import load_inventory
from netbootd.model import ClientFacts, ClientKind, ImageRef
from netbootd.planner import decide
from netbootd.render import ARTEFACTS, Renderer, RenderError, ServerInfo
from netbootd.rendercheck import CheckCache
from netbootd.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


class OneImage:
    def resolve(self, image, channel, pin, *, mac=None):
        return ImageRef(name=image, version="2026.11.23-1", root=Path("/srv/store/demo/v1"),
                        boot={"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                              "cmdline": "console=ttyS0", "rootfs": "rootfs"})


@pytest.fixture
def shipped():
    settings = load_settings(REPO / "config" / "netbootd.yaml")
    return settings, load_inventory(settings.paths.inventory), Renderer(settings)


def test_shipped_templates_check_clean(shipped):
    _settings, inv, r = shipped
    assert r.check(inv, OneImage()) == []


def test_pi_cmdline_is_one_line_with_nfs_root_and_seed(shipped):
    settings, inv, r = shipped
    plan = decide(ClientFacts(mac="d8:3a:dd:12:34:56", serial="a1b2c3d4", kind=ClientKind.RPI),
                  inv, settings, OneImage())
    text = r.render("cmdline.txt", plan, ServerInfo("10.231.0.2", 8080))
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "nfsroot=10.231.0.2:/srv/store/demo/v1/rootfs,vers=3" in text
    assert "ds=nocloud;s=http://10.231.0.2:8080/cloud-init/d8-3a-dd-12-34-56/" in text


def test_ipxe_names_the_planned_version(shipped):
    settings, inv, r = shipped
    plan = decide(ClientFacts(mac="52:54:00:a0:00:01", kind=ClientKind.IPXE), inv, settings,
                  OneImage())
    text = r.render("ipxe", plan, ServerInfo("10.231.0.2", 8080))
    assert text.startswith("#!ipxe")
    assert "kernel http://10.231.0.2:8080/files/demo/2026.11.23-1/boot/vmlinuz" in text
    assert "/api/v1/beacon/52-54-00-a0-00-01" in text


def test_secrets_only_in_user_data(shipped):
    settings, inv, r = shipped
    plan = decide(ClientFacts(mac="d8:3a:dd:12:34:56", kind=ClientKind.RPI), inv, settings,
                  OneImage())
    token = (REPO / "config" / "secrets" / "k3s-token").read_text().strip()
    server = ServerInfo("10.231.0.2", 8080)
    assert token in r.render("user-data", plan, server)
    for other in ("ipxe", "cmdline.txt", "meta-data", "network-config", "vendor-data"):
        assert token not in r.render(other, plan, server)
    assert r.has_secrets(plan)
    plain = decide(ClientFacts(mac="52:54:00:a0:00:02"), inv, settings, OneImage())
    assert not r.has_secrets(plain)


def test_undefined_variable_is_a_check_problem_with_line(tmp_path, shipped):
    settings, inv, _ = shipped
    tdir = tmp_path / "templates"
    import shutil

    shutil.copytree(settings.paths.templates, tdir)
    (tdir / "cloud-init" / "meta-data.j2").write_text("instance-id: x\nhost: {{ nope }}\n")
    s2 = settings.model_copy(update={"paths": settings.paths.model_copy(
        update={"templates": tdir})})
    problems = Renderer(s2).check(inv, OneImage())
    assert problems, "undefined variable must be found by check"
    p = problems[0]
    assert p.file.endswith("meta-data.j2") and p.line == 2 and "nope" in p.message
    with pytest.raises(RenderError):
        plan = decide(ClientFacts(mac="52:54:00:a0:00:01"), inv, s2, OneImage())
        Renderer(s2).render("meta-data", plan, ServerInfo("10.0.0.1"))


def _edited(tmp_path, text: str):
    p = tmp_path / "nodes.yaml"
    p.write_text(text)
    return load_inventory(p)


FLEET = """
profiles:
  pis: {selectors: {kind: rpi}, vars: {join: none}}
nodes:
  aa:bb:cc:dd:ee:01: {hostname: n1, serial: 10000001}
  aa:bb:cc:dd:ee:02: {hostname: n2, serial: 10000002}
  aa:bb:cc:dd:ee:03: {hostname: n3, vars: {cmdline: quiet}}
"""


def test_a_one_node_edit_renders_only_that_node(tmp_path, shipped):
    """A reload keeps what the last check found per node: only the edited node (and
    nothing else) is rendered again; a template edit renders every node again."""
    settings, _inv, _ = shipped
    cache = CheckCache()
    first = Renderer(settings, check_cache=cache)
    assert first.check(_edited(tmp_path, FLEET), OneImage(), cache=cache) == []
    per_node = len(ARTEFACTS)
    assert first.check_renders == 4 * per_node  # three nodes and the default profile
    again = Renderer(settings, check_cache=cache)
    edited = FLEET.replace("hostname: n2,", "hostname: n2b,")
    assert again.check(_edited(tmp_path, edited), OneImage(), cache=cache) == []
    assert again.check_renders == per_node
    unchanged = Renderer(settings, check_cache=cache)
    assert unchanged.check(_edited(tmp_path, edited), OneImage(), cache=cache) == []
    assert unchanged.check_renders == 0
    sources = dict(first.sources)
    sources["cloud-init/meta-data.j2"] += "# edited\n"
    new_templates = Renderer(settings, sources, check_cache=cache)
    assert new_templates.check(_edited(tmp_path, edited), OneImage(), cache=cache) == []
    assert new_templates.check_renders == 4  # meta-data only, for each machine


def test_a_missing_var_is_reported_with_its_node_also_from_the_cache(tmp_path, shipped):
    settings, _inv, _ = shipped
    sources = dict(Renderer(settings).sources)
    sources["cloud-init/meta-data.j2"] = ("instance-id: x\n"
                                          "{% if node.hostname == 'n3' %}{{ vars.nope }}{% endif %}\n")
    cache = CheckCache()
    for _ in range(2):  # the second check finds it in the cache, renders nothing
        r = Renderer(settings, sources, check_cache=cache)
        problems = r.check(_edited(tmp_path, FLEET), OneImage(), cache=cache)
        (p,) = problems
        assert p.file.endswith("meta-data.j2") and p.line == 2 and "nope" in p.message
        assert p.field == "meta-data for n3"
    assert r.check_renders == 0


def test_saved_check_results_are_trusted_only_for_the_same_generation(tmp_path, shipped):
    settings, _inv, _ = shipped
    inv = _edited(tmp_path, FLEET)
    cache = CheckCache()
    Renderer(settings, check_cache=cache).check(inv, OneImage(), cache=cache)
    cache.save(tmp_path / "saved")
    loaded = CheckCache()
    loaded.load(tmp_path / "saved")
    warm = Renderer(settings, check_cache=loaded)
    assert warm.check(inv, OneImage(), cache=loaded) == [] and warm.check_renders == 0
    sources = dict(warm.sources)
    sources["rpi/config.txt.j2"] = "{{ nope }}\n"
    loaded = CheckCache()
    loaded.load(tmp_path / "saved")
    broken = Renderer(settings, sources, check_cache=loaded)
    problems = broken.check(inv, OneImage(), cache=loaded)
    assert problems and problems[0].file.endswith("config.txt.j2")
    (tmp_path / "saved").write_bytes(b"garbage")
    ignored = CheckCache()
    ignored.load(tmp_path / "saved")
    assert ignored.generation is None


def test_k3s_user_data_of_a_node_running_its_installed_disk(shipped):
    """After `installed`, the plan is `local` with the installed disk image and no netboot
    image; the k3s recipe names the image the node runs, so it must still render."""
    from dataclasses import replace

    from netbootd.nodestate import NodeRecord, Stage

    settings, inv, r = shipped
    disk = ImageRef(name="gold", version="2026.12.05-1", root=Path("/srv/store/gold/v1"),
                    kind="disk", boot={"disk": "gold.img.zst"})

    class Installed:
        def resolve(self, image, channel, pin, *, mac=None):
            return disk if (image, pin) == ("gold", "2026.12.05-1") else None

    mac = "52:54:00:a0:00:01"  # x86-worker-1 of the shipped inventory
    desired = inv.view(ClientFacts(mac=mac)).desired
    record = NodeRecord(mac=mac, stage=Stage.INSTALLED, image="gold", version="2026.12.05-1",
                        desired=desired.value if desired is not None else None)
    plan = decide(ClientFacts(mac=mac), inv, settings, Installed(), record=record)
    assert plan.action.value == "local" and plan.image is None and plan.disk is disk
    plan = replace(plan, node=replace(plan.node, vars={"join": "k3s",
                                                      "k3s_server": "https://10.0.0.1:6443"}))
    server = ServerInfo("10.231.0.2", 8080)
    text = r.render("user-data", plan, server)
    assert "netbootd.io/image=gold-2026.12.05-1" in text
    assert f"node-name: {plan.node.hostname}" in text
    assert f"instance-id: {plan.node.hostname}-gold-2026.12.05-1" in r.render("meta-data", plan,
                                                                                server)


class StoreLike(OneImage):
    """A resolver that says when it changes, as the image store does (``on_change``)."""

    def __init__(self) -> None:
        self.on_change: list = []

    def changed(self) -> None:
        for fn in self.on_change:
            fn()


def test_a_store_change_plans_every_node_again(tmp_path, shipped):
    """Unchanged nodes are skipped only while the store is unchanged: an activation may
    change what a node's templates see."""
    settings, _inv, _ = shipped
    cache, store = CheckCache(), StoreLike()
    inv = _edited(tmp_path, FLEET)
    assert Renderer(settings, check_cache=cache).check(inv, store, cache=cache) == []
    same = Renderer(settings, check_cache=cache)
    assert same.check(_edited(tmp_path, FLEET), store, cache=cache) == []
    assert (same.check_planned, same.check_renders) == (0, 0)
    store.changed()
    after = Renderer(settings, check_cache=cache)
    assert after.check(inv, store, cache=cache) == []
    assert after.check_planned == 4 and after.check_renders == 0  # same plans: cached
    other = Renderer(settings, check_cache=cache)
    assert other.check(inv, OneImage(), cache=cache) == [] and other.check_planned == 4


def test_a_broken_node_is_found_after_clean_checks(tmp_path, shipped):
    """Skipping unchanged nodes never hides a new problem in a changed one."""
    settings, _inv, _ = shipped
    sources = dict(Renderer(settings).sources)
    sources["cloud-init/meta-data.j2"] = ("instance-id: x\n"
                                          "{% if node.hostname == 'bad' %}{{ vars.nope }}{% endif %}\n")
    cache, store = CheckCache(), StoreLike()
    assert Renderer(settings, sources, check_cache=cache).check(
        _edited(tmp_path, FLEET), store, cache=cache) == []
    broken = Renderer(settings, sources, check_cache=cache)
    (p,) = broken.check(_edited(tmp_path, FLEET.replace("n3,", "bad,")), store, cache=cache)
    assert p.field == "meta-data for bad" and broken.check_planned == 1
    # the rejected check is no base: the next one starts from the last clean check
    fixed = Renderer(settings, sources, check_cache=cache)
    assert fixed.check(_edited(tmp_path, FLEET), store, cache=cache) == []
    assert fixed.check_planned == 0


def test_an_edit_of_an_included_template_renders_what_includes_it(tmp_path, shipped):
    """A template's outcome is kept by the stamp of its source and of those it includes:
    editing an included template renders its includers again, nothing else."""
    settings, _inv, _ = shipped
    sources = dict(Renderer(settings).sources)
    sources["cloud-init/meta-data.j2"] = "{% include 'cloud-init/part.j2' %}\n"
    sources["cloud-init/part.j2"] = "instance-id: {{ instance_id }}\n"
    cache, inv = CheckCache(), _edited(tmp_path, FLEET)
    assert Renderer(settings, sources, check_cache=cache).check(inv, OneImage(), cache=cache) == []
    sources["cloud-init/part.j2"] = "instance-id: {{ nope }}\n"
    edited = Renderer(settings, sources, check_cache=cache)
    problems = edited.check(inv, OneImage(), cache=cache)
    assert edited.check_renders == 4  # meta-data for the three nodes and the default
    assert problems and "nope" in problems[0].message


def test_a_forked_check_finds_what_one_process_finds(tmp_path, shipped):
    """`netbootd check` splits the fleet over forked processes: the same problems, in
    the same order, each named once and after the first node that shows it."""
    from netbootd.rendercheck import check_forked

    settings, _inv, _ = shipped
    sources = dict(Renderer(settings).sources)
    sources["cloud-init/meta-data.j2"] = (
        "instance-id: x\n{% if node.hostname in ('h3', 'h9') %}{{ vars.nope }}{% endif %}\n"
        "{% if not node.known or node.hostname == 'h7' %}{{ vars.unknown_too }}{% endif %}\n")
    text = "nodes:\n" + "".join(f"  aa:bb:cc:dd:ee:{i:02x}: {{hostname: h{i}}}\n"
                                for i in range(12))
    inv = _edited(tmp_path, text)
    one = Renderer(settings, sources).check(inv, OneImage())
    assert [p.field for p in one] == ["meta-data for h3", "meta-data for h7"]
    for processes in (2, 3, 5):
        forked = check_forked(Renderer(settings, sources), inv, OneImage(), CheckCache(),
                              processes=processes, min_nodes=1)
        assert forked == one
