"""Property: whatever names, symlinks and hard links an archive holds, unpacking either
rejects it or writes only inside the staging directory."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netbootd.store.ingest import Rejected, unpack_archive

part = st.sampled_from(["a", "b", "..", ".", "", "etc", "x.dtb"])
name = st.lists(part, min_size=1, max_size=5).map("/".join).flatmap(
    lambda n: st.sampled_from([n, "/" + n, "./" + n]))
member = st.tuples(st.sampled_from(["file", "dir", "sym", "hard"]), name, name)


def build_tar(members: list[tuple[str, str, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, n, target in members:
            info = tarfile.TarInfo(n or "x")
            if kind == "file":
                data = b"payload"
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, target
            else:
                info.type, info.linkname = tarfile.LNKTYPE, target
            tf.addfile(info)
    return buf.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(member, min_size=1, max_size=6))
def test_nothing_escapes_staging(members: list[tuple[str, str, str]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="tar-prop-"))
    try:
        outside = base / "outside"
        outside.mkdir()
        dest = outside / "deep" / "staging"
        dest.mkdir(parents=True)
        archive = base / "build.tar"
        archive.write_bytes(build_tar(members))
        try:
            unpack_archive(archive, dest)
        except Rejected:
            pass
        # nothing but deep/staging under outside/, and nothing beside it in base
        assert sorted(os.listdir(base)) == ["build.tar", "outside"]
        assert os.listdir(outside) == ["deep"]
        assert os.listdir(outside / "deep") == ["staging"]
        for cur, dirs, files in os.walk(dest):
            for n in dirs + files:
                p = Path(cur) / n
                if p.is_symlink():
                    t = os.readlink(p)
                    if not t.startswith("/"):
                        resolved = os.path.normpath(os.path.join(cur, t))
                        assert resolved.startswith(str(dest)), (p, t)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b"", b"\x1f\x8b", b"\x28\xb5\x2f\xfd"]), st.binary(max_size=2048),
       st.integers(min_value=0, max_value=4096))
def test_garbage_and_cut_archives_are_rejections(magic: bytes, junk: bytes, cut: int) -> None:
    """Random bytes (optionally behind a gzip/zstd magic) or a valid archive cut anywhere:
    unpacking ends in Rejected or success, never another exception."""
    base = Path(tempfile.mkdtemp(prefix="tar-junk-"))
    try:
        good = build_tar([("file", "a/b", ""), ("sym", "a/c", "b"), ("dir", "d", "")])
        for data in (magic + junk, good[:cut]):
            archive = base / "x.tar"
            archive.write_bytes(data)
            dest = base / "out"
            try:
                unpack_archive(archive, dest)
            except Rejected:
                pass
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
