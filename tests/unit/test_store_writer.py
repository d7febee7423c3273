"""One writer per store: a second daemon on the same images is refused, naming the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netbootd.cli import main
from netbootd.errors import Conflict
from netbootd.settings import StoreSettings
from netbootd.store.build import sample_build
from netbootd.store.store import ImageStore, StoreError, StoreLocked

MAC = "d8:3a:dd:00:00:01"

#: A second process that opens the store as its writer (what a daemon does) and holds
#: it until its stdin closes.
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from netbootd.settings import StoreSettings
    from netbootd.store.store import ImageStore
    st = ImageStore(Path(sys.argv[1]), Path(sys.argv[2]), StoreSettings(), writer=True)
    print("ready", flush=True)
    sys.stdin.read()
    st.close()
""")


def store(tmp_path: Path, **kw) -> ImageStore:
    return ImageStore(tmp_path / "images", tmp_path / "state", StoreSettings(keep=1,
                      keep_booted_hours=0), **kw)


@pytest.fixture
def daemon(tmp_path: Path):
    """A real process holding the writer lock of ``tmp_path``'s store."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "images"),
                             str(tmp_path / "state")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(10)


def test_second_writer_in_another_process_is_refused_with_its_pid(tmp_path, daemon) -> None:
    with pytest.raises(StoreLocked) as err:
        store(tmp_path, writer=True)
    assert err.value.pid == daemon.pid and err.value.role == "daemon"
    assert f"pid {daemon.pid}" in str(err.value)
    assert isinstance(err.value, Conflict) and isinstance(err.value, StoreError)


def test_second_writer_in_the_same_process_is_refused_until_close(tmp_path) -> None:
    first = store(tmp_path, writer=True)
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
        store(tmp_path, writer=True)
    first.close()
    store(tmp_path, writer=True).close()


def test_the_lock_goes_with_a_killed_writer(tmp_path, daemon) -> None:
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(10)
    store(tmp_path, writer=True).close()


def test_readers_and_edits_work_next_to_a_writer_gc_and_ingest_do_not(tmp_path,
                                                                     daemon) -> None:
    st = store(tmp_path)  # the CLI
    for v in ("1", "2"):
        sample_build(st.layout.incoming / v, "demo", v, created=f"2026-11-2{v}T00:00:00Z")
    with pytest.raises(StoreLocked):
        st.ingest_entry("1")
    with pytest.raises(StoreLocked):
        st.recover()
    daemon.stdin.close()  # the daemon stops: the CLI may ingest now
    daemon.wait(10)
    assert st.ingest_entry("1").accepted and st.ingest_entry("2").accepted


def test_cli_next_to_a_running_daemon(tmp_path, capsys) -> None:
    cfg = tmp_path / "netbootd.yaml"
    cfg.write_text("paths:\n  images: images\n  state: state\n  inventory: nodes.yaml\n"
                   "store:\n  keep: 1\n  keep_booted_hours: 0\n")
    st = store(tmp_path)
    for v in ("1", "2", "3"):
        sample_build(st.layout.incoming / v, "demo", v, created=f"2026-11-2{v}T00:00:00Z")
        assert st.ingest_entry(v).accepted
    holder = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "images"),
                               str(tmp_path / "state")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"

        def cli(*args: str) -> int:
            return main(["-c", str(cfg), "images", *args])

        assert cli("list") == 0
        assert cli("activate", "demo", "1", "--channel", "prod") == 0
        assert cli("pin", MAC, "2", "--image", "demo") == 0
        assert cli("unpin", MAC) == 0
        assert cli("gc", "--dry-run") == 0
        capsys.readouterr()
        assert cli("gc") == 2
        out = capsys.readouterr().out
        assert f"pid {holder.pid}" in out and "POST /api/v1/images/gc" in out
        assert st.versions("demo") == ["1", "2", "3"], "nothing deleted"
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert cli("gc") == 0 and st.versions("demo") == ["1", "3"]
