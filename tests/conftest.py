"""Shared fixtures: a throw-away config directory built from the shipped one."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# CI runs the property tests derandomized: the same examples every run, so a landing never
# depends on luck. Locally they stay random, which is how they find new bugs.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
hypothesis_settings.register_profile("dev", deadline=None, print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

REPO = Path(__file__).resolve().parent.parent


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``pred`` until it returns something true, and return that. Tests wait for
    conditions, never for fixed times: ``timeout`` is only the bound after which the
    condition is taken to be broken (generous: the suite runs on loaded 2-core machines)."""
    checks = _checks(pred, timeout, what)
    while (got := next(checks)) is _NOT_YET:
        time.sleep(0.05)
    return got


async def eventually(pred: Callable[[], object], timeout: float, what: str) -> object:
    """:func:`wait_for` for a test on the event loop: polls without holding the loop, so
    the services running on it go on working while the test waits."""
    checks = _checks(pred, timeout, what)
    while (got := next(checks)) is _NOT_YET:
        await asyncio.sleep(0.02)
    return got


_NOT_YET = object()


def _checks(pred: Callable[[], object], timeout: float, what: str):
    """Each step asks ``pred`` once: its true answer, or ``_NOT_YET``; raises once
    ``timeout`` has passed (the waiting between steps is the caller's)."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            yield got
            return
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield _NOT_YET


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on right now (for tests on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A copy of config/ whose paths point into tmp_path (images, state)."""
    dst = tmp_path / "config"
    shutil.copytree(REPO / "config", dst)
    text = (dst / "netbootd.yaml").read_text()
    text = text.replace("images: ../images", f"images: {tmp_path / 'images'}")
    text = text.replace("state: ../images/state", f"state: {tmp_path / 'state'}")
    (dst / "netbootd.yaml").write_text(text)
    return dst


_RUN_MARK = f"NETBOOTD_TEST_RUN={os.getpid()}-{os.urandom(4).hex()}"
os.environ["NETBOOTD_TEST_RUN"] = _RUN_MARK.split("=", 1)[1]


def _stray_processes() -> list[int]:
    """PIDs of processes started by this test run (they inherit our marker) still alive."""
    mark = _RUN_MARK.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes():
    """Safety net: every process a test started is gone when the run ends.

    Each test cleans up after itself; this catches the one that did not (a wrapper
    killed while its child lives on). Only processes carrying this run's marker in
    their environment are touched, so nothing we did not start is ever killed.
    """
    yield
    import signal
    import time

    strays = _stray_processes()
    if not strays:
        return
    time.sleep(1.0)  # let processes that are already exiting finish
    strays = _stray_processes()
    for pid in strays:
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            os.kill(pid, signal.SIGKILL)
            print(f"\nWARNING: killed stray test process {pid}: {cmd[:200].decode(errors='replace')}")
        except (OSError, ProcessLookupError):
            continue


# -- Skips are failures in CI ---------------------------------------------------------------
#
# A skip hides a test that did not run: under ``CI=true`` a missing tool, a missing
# privilege or an optional import must fail the run loudly, with its reason, instead of
# turning green. Outside CI a skip with a reason is fine (a laptop without QEMU).
# ``xfail`` is not a skip and is left alone.

def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip(report: pytest.BaseReport) -> None:
    reason = _skip_reason(report.longrepr).removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which is a failure: {reason}\n"
                       "(install the tool or grant the privilege the test needs; "
                       "a skip in CI hides a test that did not run)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module-level ``importorskip``/``skip(allow_module_level=True)``."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        _fail_skip(report)
