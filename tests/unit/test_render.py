"""Templates: shipped ones render for every node; errors name template and line."""

from pathlib import Path

import pytest

from netbootd.inventory import load_inventory
from netbootd.model import ClientFacts, ClientKind, ImageRef
from netbootd.planner import decide
from netbootd.render import Renderer, RenderError, ServerInfo
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
