"""The switch interval is lowered while a job shares the GIL, and restored after."""

from __future__ import annotations

import sys
import threading

import pytest

from netbootd.gilshare import BUSY_SWITCH_INTERVAL, sharing_gil


def test_lowered_inside_restored_after() -> None:
    before = sys.getswitchinterval()
    with sharing_gil():
        assert sys.getswitchinterval() == pytest.approx(min(before, BUSY_SWITCH_INTERVAL), rel=0.05)
    assert sys.getswitchinterval() == before


def test_restored_after_an_error() -> None:
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError), sharing_gil():
        raise RuntimeError("boom")
    assert sys.getswitchinterval() == before


def test_never_raised() -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    try:
        with sharing_gil():
            assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    finally:
        sys.setswitchinterval(before)


def test_overlapping_jobs_restore_once_the_last_ends() -> None:
    """A reload and the start-up check may overlap in two threads: the first to leave
    must not restore the interval under the other."""
    before = sys.getswitchinterval()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with sharing_gil():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with sharing_gil():
        pass
    assert sys.getswitchinterval() == pytest.approx(min(before, BUSY_SWITCH_INTERVAL), rel=0.05)
    leave.set()
    t.join(10)
    assert sys.getswitchinterval() == before
