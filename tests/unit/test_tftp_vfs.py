"""The virtual TFTP tree: names, not disk paths; resolution through the planner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netbootd.render import Renderer
from netbootd.tftp import codec
from netbootd.tftp.testkit import make_app, virtual_tree
from netbootd.tftp.vfs import SMALL_FILE, Refused, VirtualTree, normalise

PI_MAC = "d8:3a:dd:12:34:56"
PI_SERIAL = "a1b2c3d4"
NODES = f"""
nodes:
  {PI_MAC}:
    serial: 10000000{PI_SERIAL}
    hostname: pi5-worker-1
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    boot = root / "boot"
    (boot / "overlays").mkdir(parents=True)
    (boot / "config.txt").write_text("arm_64bit=1\nkernel=kernel_2712.img")
    (boot / "kernel_2712.img").write_bytes(b"K" * 5000)
    (boot / "overlays" / "overlay_map.dtb").write_bytes(b"map")
    (boot / "escape").symlink_to("/etc/hostname")
    (tmp_path / "outside.txt").write_text("secret")
    (boot / "escape2").symlink_to(tmp_path / "outside.txt")
    return root


def tree_for(tmp_path: Path, image: Path, **kw) -> VirtualTree:
    return virtual_tree(make_app(tmp_path / "work", image, **kw))


@pytest.mark.parametrize("path,parts", [
    ("a//b", ["a", "b"]), ("/x", ["x"]), ("./x", ["x"]), ("a1b2c3d4//cmdline.txt",
                                                          ["a1b2c3d4", "cmdline.txt"]),
    ("//overlays///x.dtbo", ["overlays", "x.dtbo"]),
])
def test_normalise(path: str, parts: list[str]):
    assert normalise(path) == parts


@pytest.mark.parametrize("path", ["..", "a/../b", "../../etc/passwd", "a\x00b", "a\x01",
                                  "a\\..\\b", "x" * 300, "a/\x7f"])
def test_normalise_refuses(path: str):
    with pytest.raises(Refused) as exc:
        normalise(path)
    assert exc.value.code == codec.ERR_ACCESS


@pytest.mark.parametrize("path", ["", "/", "//", "./"])
def test_empty_is_not_found(path: str):
    with pytest.raises(Refused) as exc:
        normalise(path)
    assert exc.value.code == codec.ERR_NOT_FOUND


def test_ipxe_binaries_from_configured_dirs(tmp_path: Path, image: Path):
    d1, d2 = tmp_path / "ipxe", tmp_path / "ipxe2"
    d1.mkdir()
    d2.mkdir()
    (d1 / "undionly.kpxe").write_bytes(b"U" * 100)
    (d2 / "snp.efi").write_bytes(b"S" * 10)
    tree = tree_for(tmp_path, image, tftp={"ipxe_dir": str(d1), "extra_ipxe_dirs": [str(d2)]})
    assert bytes(tree.open("undionly.kpxe", "10.0.0.5", "10.0.0.1").data) == b"U" * 100
    assert bytes(tree.open("/snp.efi", "10.0.0.5", "10.0.0.1").data) == b"S" * 10
    with pytest.raises(Refused) as exc:
        tree.open("ipxe.efi", "10.0.0.5", "10.0.0.1")
    assert exc.value.code == codec.ERR_NOT_FOUND
    assert any("ipxe.efi" in w for w in tree.startup_warnings())


def test_missing_ipxe_dir_warns(tmp_path: Path, image: Path):
    tree = tree_for(tmp_path, image, tftp={"ipxe_dir": str(tmp_path / "nope"),
                                           "extra_ipxe_dirs": []})
    assert "no iPXE directory" in tree.startup_warnings()[0]


def test_serial_prefix_maps_through_inventory(tmp_path: Path, image: Path):
    tree = tree_for(tmp_path, image, nodes_yaml=NODES, policy="ignore")
    src = tree.open(f"{PI_SERIAL}/kernel_2712.img", "10.0.0.7", "10.0.0.1")
    assert (src.mac, src.image, src.version, src.size) == (PI_MAC, "demo", "1", 5000)
    # an unknown machine is ignored by policy: nothing for it
    with pytest.raises(Refused) as exc:
        tree.open("0badc0de/kernel_2712.img", "10.0.0.8", "10.0.0.1")
    assert exc.value.code == codec.ERR_NOT_FOUND


def test_config_txt_is_image_file_plus_rendered_additions(tmp_path: Path, image: Path):
    tree = tree_for(tmp_path, image, nodes_yaml=NODES)
    text = bytes(tree.open(f"{PI_SERIAL}//config.txt", "10.0.0.7", "10.0.0.1").data).decode()
    assert text.startswith("arm_64bit=1\nkernel=kernel_2712.img\n")
    assert "# netbootd: pi5-worker-1 1" in text


def test_cmdline_is_rendered_with_local_address(tmp_path: Path, image: Path):
    tree = tree_for(tmp_path, image, nodes_yaml=NODES)
    src = tree.open(f"{PI_SERIAL}/cmdline.txt", "10.0.0.7", "10.0.0.1")
    text = bytes(src.data).decode()
    assert text.endswith("\n") and text.count("\n") == 1
    assert f"netbootd.mac={PI_MAC}" in text and "server=10.0.0.1" in text
    assert f"nfsroot=10.0.0.1:{image}/rootfs" in text


def test_render_error_is_a_refusal(tmp_path: Path, image: Path):
    app = make_app(tmp_path / "work", image, nodes_yaml=NODES)
    (app.settings.paths.templates / "rpi" / "cmdline.txt.j2").write_text("{{ nope.x }}")
    app.render = Renderer(app.settings)  # templates take effect when a renderer reads them
    with pytest.raises(Refused) as exc:
        virtual_tree(app).open(f"{PI_SERIAL}/cmdline.txt", "10.0.0.7", "10.0.0.1")
    assert exc.value.code == codec.ERR_UNDEFINED


def test_mac_prefix_and_subdirectories(tmp_path: Path, image: Path):
    tree = tree_for(tmp_path, image)
    src = tree.open("d8-3a-dd-00-00-09/overlays/overlay_map.dtb", "10.0.0.9", "10.0.0.1")
    assert src.mac == "d8:3a:dd:00:00:09" and bytes(src.data) == b"map"


def test_prefix_string(tmp_path: Path, image: Path):
    app = make_app(tmp_path / "work", image)
    app.settings = app.settings.model_copy(update={
        "rpi": app.settings.rpi.model_copy(update={"prefix_string": "fleet"})})
    app.clients.learn("10.0.0.11", "d8:3a:dd:00:00:11")
    src = virtual_tree(app).open("fleet/kernel_2712.img", "10.0.0.11", "10.0.0.1")
    assert src.mac == "d8:3a:dd:00:00:11"


def test_root_path_and_unknown_serial_map_by_client_ip(tmp_path: Path, image: Path):
    app = make_app(tmp_path / "work", image, nodes_yaml=NODES)
    tree = virtual_tree(app)
    for path in ("kernel_2712.img", "0badc0de/kernel_2712.img"):
        with pytest.raises(Refused) as exc:  # no MAC known for this IP yet
            tree.open(path, "10.0.0.7", "10.0.0.1")
        assert exc.value.code == codec.ERR_NOT_FOUND
    app.clients.learn("10.0.0.7", PI_MAC)
    assert tree.open("kernel_2712.img", "10.0.0.7", "10.0.0.1").mac == PI_MAC
    assert tree.open("0badc0de/kernel_2712.img", "10.0.0.7", "10.0.0.1").mac == PI_MAC


@pytest.mark.parametrize("path", ["escape", "escape2"])
def test_symlink_out_of_boot_tree_refused(tmp_path: Path, image: Path, path: str):
    tree = tree_for(tmp_path, image, nodes_yaml=NODES)
    with pytest.raises(Refused) as exc:
        tree.open(f"{PI_SERIAL}/{path}", "10.0.0.7", "10.0.0.1")
    assert exc.value.code == codec.ERR_ACCESS


def test_unknown_file_not_found(tmp_path: Path, image: Path):
    tree = tree_for(tmp_path, image, nodes_yaml=NODES)
    for name in ("pieeprom.sig", "overlays", "start4.elf"):
        with pytest.raises(Refused) as exc:
            tree.open(f"{PI_SERIAL}/{name}", "10.0.0.7", "10.0.0.1")
        assert exc.value.code == codec.ERR_NOT_FOUND


def test_open_file_keeps_bytes_across_replacement(tmp_path: Path, image: Path):
    """A transfer in flight keeps the bytes it started with (mmap holds the inode)."""
    big = image / "boot" / "initramfs_2712"
    old = os.urandom(SMALL_FILE + 10_000)
    big.write_bytes(old)
    tree = tree_for(tmp_path, image, nodes_yaml=NODES)
    src = tree.open(f"{PI_SERIAL}/initramfs_2712", "10.0.0.7", "10.0.0.1")
    tmp = image / "boot" / "new"
    tmp.write_bytes(os.urandom(len(old)))
    os.replace(tmp, big)
    big.unlink()
    assert src.data[:] == old
    src.close()
