"""Property: whatever names, symlinks and hard links an archive holds, unpacking either
rejects it or writes only inside the staging directory.

Absolute names and link targets point into a per-example *canary* directory (``@`` in
the strategies), never at the real ``/``: an earlier version of this test aimed them at
``/`` and found a real hole (``x -> /`` then a directory ``x`` made tarfile chmod the
host's ``/``), by damaging the machine. The canary must stay exactly as it was.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netbootd.store.ingest import Rejected, unpack_archive

part = st.sampled_from(["a", "b", "..", ".", "", "file", "dir"])
rel = st.lists(part, min_size=1, max_size=4).map("/".join)
#: "@" becomes the canary directory's absolute path. A small fixed set first, so the
#: same path often comes twice (that is where the holes are), then anything.
few = st.sampled_from(["a", "b", "a/b", "./a", "a/../b", "../a", "a/b/c", "", ".",
                       "@", "@/a", "@/dir", "@/file", "@/dir/a", "../../canary/a"])
name = st.one_of(few, few, few, rel, rel.map(lambda n: "@/" + n))
member = st.tuples(st.sampled_from(["file", "dir", "sym", "hard"]), name, name)


def build_tar(members: list[tuple[str, str, str]], canary: str = "/nonexistent") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, n, target in members:
            n, target = n.replace("@", canary), target.replace("@", canary)
            info = tarfile.TarInfo(n or "x")
            info.mode = 0o777 if kind == "dir" else 0o666
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


def snapshot(d: Path) -> list[tuple[str, int, bytes]]:
    out = [(".", stat.S_IMODE(d.lstat().st_mode), b"")]
    for p in sorted(d.rglob("*")):
        st_ = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
        out.append((str(p.relative_to(d)), stat.S_IMODE(st_.st_mode), data))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(member, min_size=1, max_size=6))
# found by hypothesis: the empty symlink target made tarfile fall back to
# extracting the unfiltered "." symlink in its place
@example([("file", "a", "a"), ("sym", "a", ""), ("sym", ".", "../../canary/a")])
def test_nothing_escapes_staging(members: list[tuple[str, str, str]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="tar-prop-"))
    try:
        canary = base / "canary"
        (canary / "dir" / "a").mkdir(parents=True)
        (canary / "file").write_bytes(b"canary")
        (canary / "a").write_bytes(b"canary a")
        os.chmod(canary / "file", 0o600)
        os.chmod(canary / "dir", 0o700)
        os.chmod(canary, 0o750)
        before = snapshot(canary)
        dest = base / "outside" / "deep" / "staging"
        dest.mkdir(parents=True)
        archive = base / "build.tar"
        archive.write_bytes(build_tar(members, str(canary)))
        try:
            unpack_archive(archive, dest)
        except Rejected:
            pass
        assert snapshot(canary) == before, "the archive reached outside staging"
        assert sorted(os.listdir(base)) == ["build.tar", "canary", "outside"]
        assert os.listdir(base / "outside") == ["deep"]
        assert os.listdir(base / "outside" / "deep") == ["staging"]
        for cur, dirs, files in os.walk(dest):
            for n in dirs + files:
                p = Path(cur) / n
                if p.is_symlink() and not os.readlink(p).startswith("/"):
                    resolved = os.path.normpath(os.path.join(cur, os.readlink(p)))
                    assert resolved.startswith(str(dest)), (p, os.readlink(p))
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


@pytest.mark.parametrize("members", [
    [("sym", "a", "@"), ("dir", "a", "")],         # mkdir tolerated, then chmod through
    [("sym", "a", "@/file"), ("file", "a", "")],   # open(..., "wb") through the link
    [("sym", "a", "@/dir"), ("dir", "a", "")],
    [("file", "f", ""), ("sym", "a", "@/file"), ("hard", "a", "f")],
], ids=["dir-over-link", "file-over-link", "dir-over-link-deep", "hardlink-over-link"])
def test_member_over_a_symlink_is_rejected(tmp_path: Path, members) -> None:
    """Regression: these archives reached the host before (chmod of /, writes through)."""
    canary = tmp_path / "canary"
    (canary / "dir").mkdir(parents=True)
    (canary / "file").write_bytes(b"canary")
    os.chmod(canary, 0o750)
    before = snapshot(canary)
    (tmp_path / "t.tar").write_bytes(build_tar(members, str(canary)))
    with pytest.raises(Rejected, match="symlink|earlier regular file"):
        unpack_archive(tmp_path / "t.tar", tmp_path / "dest")
    assert snapshot(canary) == before
