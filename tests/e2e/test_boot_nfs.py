"""A guest boots into the active rootfs version over NFS, through
netbootd's cmdline (nfsroot= of the planned version) and netbootd's ganesha exports."""

from __future__ import annotations

import pytest

from netbootd.lab.guests import random_mac
from netbootd.lab.tools import NFS_TOOLS, require

pytestmark = pytest.mark.slow


def test_nfs_root_guest_boots_the_active_rootfs(boot_lab, lab_nfs, lab_out, boot_image) -> None:
    require(NFS_TOOLS)
    exports = lab_out / "nfs" / "netbootd-exports.conf"
    nfs = lab_nfs(include=exports)
    mac = random_mac()
    bl = boot_lab(
        nodes={mac: {"hostname": "nfs-1", "image": "demo", "channel": "prod",
                     "vars": {"cmdline": nfs.kernel_args}}},
        settings={"nfs": {"backend": "ganesha", "ganesha_config": str(exports),
                          "ganesha_pidfile": str(nfs.dir / "ganesha.pid")}})
    version = bl.publish(boot_image)
    rootfs = bl.nbd.images / "store" / "demo" / version / "rootfs"
    assert rootfs.is_dir()
    g = bl.guest("bios", mac=mac, timeout=90)
    with g:
        m = g.wait_for(r"NETBOOTD-TEST: (reported provisioned|.*failed)", 85)
        assert m and m.group(1) == "reported provisioned", f"console: {g.console}"
        node = bl.nbd.wait_node(mac, "provisioned", 10, version=version)
    assert node is not None, f"API never showed {mac} provisioned; see {bl.nbd.log}"
    # netbootd exported the planned version's rootfs, and that is what the guest mounted.
    assert str(rootfs) in exports.read_text()
    assert f"nfs root mounted {bl.lab.ip('srv')}:{rootfs}" in g.text()
    assert f"rootfs init version={version}" in g.text()
    booted = [e for e in node["timeline"] if e["kind"] == "booted"]
    assert booted and str(rootfs) in booted[-1]["message"]
