"""Lifecycle records on disk: compare-and-set, crash-safe writes, readers see writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from netbootd.errors import Conflict
from netbootd.model import Action, NodeView
from netbootd.nodestate import LocalNodeState, NodeRecord, Stage
from netbootd.planner import effective_action

MAC = "52:54:00:00:00:0b"


def test_compare_and_set_writes_only_on_the_expected_revision(tmp_path):
    state = LocalNodeState(tmp_path / "lifecycle")
    first = state.compare_and_set(MAC, None, NodeRecord(mac=MAC, stage=Stage.INSTALL))
    assert first.rev == 1 and state.get(MAC).stage is Stage.INSTALL
    with pytest.raises(Conflict):
        state.compare_and_set(MAC, None, NodeRecord(mac=MAC, stage=Stage.LOCAL))
    second = state.compare_and_set(MAC, 1, NodeRecord(mac=MAC, stage=Stage.INSTALLING,
                                                      progress=40))
    assert (second.rev, second.progress) == (2, 40)
    assert state.compare_and_set(MAC, 2, None) is None and state.get(MAC) is None


def test_a_write_from_another_process_is_seen_and_no_temp_file_is_left(tmp_path):
    state = LocalNodeState(tmp_path / "lifecycle")
    state.put(NodeRecord(mac=MAC, stage=Stage.INSTALLED, image="gold", version="1"))
    assert state.get(MAC).stage is Stage.INSTALLED
    code = ("from netbootd.nodestate import LocalNodeState, NodeRecord, Stage\n"
            f"s = LocalNodeState({str(tmp_path / 'lifecycle')!r})\n"
            f"s.put(NodeRecord(mac={MAC!r}, stage=Stage.INSTALL, by='cli'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    rec = state.get(MAC)
    assert (rec.stage, rec.by, rec.rev) == (Stage.INSTALL, "cli", 2)
    assert sorted(os.listdir(tmp_path / "lifecycle")) == [".lock", "52-54-00-00-00-0b.json"]


def test_a_torn_record_reads_as_absent_not_as_garbage(tmp_path):
    state = LocalNodeState(tmp_path / "lifecycle")
    (tmp_path / "lifecycle" / "52-54-00-00-00-0b.json").write_text('{"mac": "52:54:00:00')
    assert state.get(MAC) is None
    (tmp_path / "lifecycle" / "52-54-00-00-00-0b.json").write_text(json.dumps(
        {"mac": MAC, "stage": "local", "rev": 3}))
    assert state.get(MAC).stage is Stage.LOCAL


def test_readers_leave_no_trace(tmp_path):
    LocalNodeState(tmp_path / "lifecycle", create=False).get(MAC)
    assert not (tmp_path / "lifecycle").exists()


def view(action: Action | None) -> NodeView:
    return NodeView(mac=MAC, hostname="n", known=True, profile="default", action=action,
                    desired=action)


@pytest.mark.parametrize(("inventory", "stage", "want"), [
    (Action.INSTALL, None, Action.INSTALL),
    (Action.INSTALL, Stage.INSTALLING, Action.INSTALL),  # power cut mid-install: again
    (Action.INSTALL, Stage.INSTALLED, Action.LOCAL),
    (Action.INSTALL, Stage.LOCAL, Action.LOCAL),
    (Action.INSTALL, Stage.FAILED, Action.INSTALL),  # retried by default
    (Action.NETBOOT, Stage.INSTALL, Action.INSTALL),  # operator: reinstall
    (Action.INSTALL, Stage.NETBOOT, Action.NETBOOT),  # operator: netboot
    (Action.IGNORE, Stage.INSTALL, Action.IGNORE),  # ignore in nodes.yaml always wins
])
def test_precedence_of_lifecycle_over_inventory(inventory, stage, want):
    rec = None if stage is None else NodeRecord(mac=MAC, stage=stage, reason="x",
                                                desired=inventory.value)
    assert effective_action(view(inventory), rec)[0] is want


def test_an_edit_of_nodes_yaml_wins_over_older_runtime_state():
    rec = NodeRecord(mac=MAC, stage=Stage.INSTALLED, desired="install")
    assert effective_action(view(Action.NETBOOT), rec)[0] is Action.NETBOOT
    failed = NodeRecord(mac=MAC, stage=Stage.FAILED, desired="install", reason="sha")
    assert effective_action(view(Action.INSTALL), failed, retry_failed=False)[0] \
        is Action.LOCAL
