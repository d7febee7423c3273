"""Pure parts of the HTTP service: arch mapping, page helpers, OpenAPI, token file."""

from __future__ import annotations

from pathlib import Path

import pytest

from netbootd.http.api import OPS, openapi
from netbootd.http.auth import read_token
from netbootd.http.boot import client_arch
from netbootd.http.ui import human_size, relative


@pytest.mark.parametrize("buildarch,platform,arch", [
    ("i386", "pcbios", 0), ("i386", "", 0), ("i386", "efi", 6), ("x86_64", "efi", 7),
    ("x86_64", "", 7), ("x86_64", "pcbios", 0), ("arm64", "efi", 11), ("arm64", "", 11),
    ("riscv64", "efi", 27), ("mips", "efi", None), ("", "", None),
])
def test_ipxe_buildarch_maps_to_dhcp_arch_and_unknown_is_none(buildarch, platform, arch):
    assert client_arch(buildarch, platform) == arch


def test_relative_and_size():
    assert relative(None, 100) == "—"
    assert relative(99, 100) == "just now"
    assert relative(100 - 42, 100) == "42 s ago"
    assert relative(100 - 7200, 100) == "2 h ago"
    assert human_size(512) == "512 B"
    assert human_size(3 << 20) == "3.1 MB"
    assert human_size(None) == "—"


def test_openapi_has_one_operation_per_route_with_unique_ids():
    ids = [op["operationId"] for path in openapi()["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) == len(OPS) + 1  # + the document itself
    for op in OPS:
        entry = openapi()["paths"]["/api/v1" + op.path][op.method.lower()]
        if op.auth == "write":
            assert {"401", "403"} <= set(entry["responses"])
        assert "500" not in entry["responses"]


def test_token_file_unset_missing_or_empty_means_closed(tmp_path: Path):
    assert read_token(None) is None
    assert read_token(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("\n")
    assert read_token(tmp_path / "empty") is None
    (tmp_path / "tok").write_text("  s3cret \n")
    assert read_token(tmp_path / "tok") == "s3cret"
