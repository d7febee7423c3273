"""Event log: persisted, rotated, bounded; node table rebuilt at start; no secrets."""

import json
import time

from netbootd.events import EventLog


def test_node_state_rebuilt_after_restart(tmp_path):
    log = EventLog(tmp_path)
    log.record("dhcp", "aa:bb:cc:dd:ee:01", ip="10.231.0.50")
    log.record("tftp", "aa:bb:cc:dd:ee:01", file="kernel8.img", image="demo", version="1")
    log.record("booted", "aa:bb:cc:dd:ee:01", token="s3cret")
    log.close()
    again = EventLog(tmp_path)
    st = again.nodes["aa:bb:cc:dd:ee:01"]
    assert (st.phase, st.ip, st.version) == ("booted", "10.231.0.50", "1")
    assert [e.kind for e in again.timeline("aa:bb:cc:dd:ee:01")] == ["dhcp", "tftp", "booted"]
    assert "s3cret" not in (tmp_path / "events.jsonl").read_text()


def test_aborted_transfer_does_not_move_phase(tmp_path):
    log = EventLog(None)
    log.record("kernel", "aa:bb:cc:dd:ee:01")
    log.record("tftp", "aa:bb:cc:dd:ee:01", outcome="aborted")
    assert log.nodes["aa:bb:cc:dd:ee:01"].phase == "kernel"


def test_rotation_is_bounded(tmp_path):
    log = EventLog(tmp_path, max_bytes=2000, keep_files=2)
    for i in range(500):
        log.record("dhcp", f"aa:bb:cc:dd:ee:{i % 200:02x}", n=i)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 3 * 2000 + 500


def test_torn_last_line_is_skipped(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"ts": 1, "kind": "dhcp", "mac": "a"}\n{"ts": 2, "ki')
    log = EventLog(tmp_path)
    assert "a" in log.nodes


class _SlowFile:
    """The real file, with each write taking as long as a throttled disk's."""

    def __init__(self, fh, delay: float) -> None:
        self._fh, self._delay = fh, delay

    def write(self, text: str) -> int:
        time.sleep(self._delay)
        return self._fh.write(text)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def test_record_never_waits_for_the_disk(tmp_path):
    log = EventLog(tmp_path)
    log._fh = _SlowFile(log._fh, 0.5)
    log.record("dhcp", "aa:bb:cc:dd:ee:01", n=0)
    time.sleep(0.1)  # the writer is now inside its slow write
    t0 = time.monotonic()
    for i in range(1, 100):
        log.record("dhcp", "aa:bb:cc:dd:ee:01", n=i)
    assert time.monotonic() - t0 < 0.2, "record() waited for the file"
    assert len(log.timeline("aa:bb:cc:dd:ee:01")) == 100, "memory is current at once"
    assert log.flush(timeout=5)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["fields"]["n"] for x in lines] == list(range(100))
    log.close()


def test_close_writes_everything_queued(tmp_path):
    log = EventLog(tmp_path)
    for i in range(50):
        log.record("tftp", "aa:bb:cc:dd:ee:02", n=i)
    log.close()
    log.close()  # idempotent
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 50
