"""Reloading nodes.yaml through the InventoryLoader: only changed entries are parsed and
validated, and every outcome (values, order, errors with file, line and field) is the
full load's."""

from pathlib import Path

import pytest

from netbootd.inventory import load_inventory
from netbootd.inventorycache import InventoryLoader, cut
from netbootd.yamlfile import ConfigError

HEAD = """\
# fleet
profiles:
  pis:
    selectors: {kind: rpi}
    image: pi-demo
  x86:
    selectors: {kind: ipxe, arch: 7}
    image: demo
"""


def fleet(n: int, *, edit: int | None = None, extra: str = "") -> str:
    lines = [HEAD.rstrip("\n"), "nodes:"]
    for i in range(n):
        mac = f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}"
        name = f"n{i}-b" if i == edit else f"n{i}"
        if i % 2:
            lines += [f"  {mac}:", f"    hostname: {name}", "    profile: x86",
                      "    vars: {join: kubeadm}"]
        else:
            lines += [f"  # node {i}", f"  {mac}:", f"    hostname: {name}",
                      f"    serial: 10000000{i:08x}", "    labels: {rack: r1}"]
    return "\n".join(lines) + "\n" + extra


def outcome(load, path: Path, text: str):
    try:
        inv = load(path, text)
    except ConfigError as exc:
        return ("error", [str(p) for p in exc.problems])
    return (list(inv.nodes.items()), inv.profiles, inv.by_serial, inv.allow_shrink)


def same_as_full(loader: InventoryLoader, path: Path, text: str):
    got = outcome(loader.load, path, text)
    assert got == outcome(load_inventory, path, text)
    return got


def test_a_one_node_edit_parses_that_node_only(tmp_path):
    path = tmp_path / "nodes.yaml"
    loader = InventoryLoader()
    same_as_full(loader, path, fleet(200))
    assert loader.parsed == 200
    same_as_full(loader, path, fleet(200, edit=101))
    assert (loader.reused, loader.parsed) == (199, 1)
    # added, removed and reordered entries, a comment between them, a profile edit
    same_as_full(loader, path, fleet(210, edit=101))
    assert loader.parsed == 11  # the new ten, and the last, which gains their comment
    same_as_full(loader, path, fleet(150))
    assert loader.parsed == 1 and loader.reused == 149  # the last lost its comment
    same_as_full(loader, path, fleet(150).replace("image: demo", "image: other"))
    same_as_full(loader, path, fleet(150, extra="allow_shrink: true\n"))
    assert loader.reused == 150


@pytest.mark.parametrize("change", [
    ("    hostname: n7\n", "    hostname: n7\n    bogus: 1\n"),                 # unknown field
    ("    hostname: n7\n", "    hostname: -bad-\n"),                           # validator
    ("  52:54:00:00:00:07:", "  52:54:00:00:00:zz:"),                          # malformed MAC
    ("  52:54:00:00:00:07:", "  52-54-00-00-00-05:"),                          # same MAC twice
    ("    profile: x86\n    vars: {join: kubeadm}\n    hostname: n7",
     "    profile: nope\n    vars: {join: kubeadm}\n    hostname: n7"),         # unknown profile
    ("    serial: 1000000000000004", "    serial: 1000000000000002"),          # serial twice
    ("    hostname: n7\n", "    hostname: [n7\n"),                            # YAML syntax
    ("  x86:\n", "  x86:\n    nonsense: 1\n"),                                 # bad profile
    ("    selectors: {kind: ipxe, arch: 7}", "    selectors: {kind: rpi}"),    # ambiguous
])
def test_a_bad_edit_is_reported_exactly_as_by_the_full_load(tmp_path, change):
    path = tmp_path / "nodes.yaml"
    loader = InventoryLoader()
    good = fleet(20).replace("    hostname: n7\n    profile: x86\n",
                             "    profile: x86\n    vars: {join: kubeadm}\n    hostname: n7\n"
                             ).replace("    vars: {join: kubeadm}\n    vars: {join: kubeadm}\n",
                                       "    vars: {join: kubeadm}\n")
    same_as_full(loader, path, good)
    old, new = change
    assert old in good
    bad = good.replace(old, new, 1)
    kind, problems = same_as_full(loader, path, bad)
    assert kind == "error" and problems and all(p.startswith(f"{path}:") for p in problems)
    same_as_full(loader, path, good)  # and the next good file loads again


@pytest.mark.parametrize("text", [
    # layouts that are never cut, or whose pieces do not stand alone
    HEAD + "nodes: {52:54:00:00:00:01: {hostname: a}}\n",
    HEAD + "nodes:\n  52:54:00:00:00:01: &n {hostname: a}\n  52:54:00:00:00:02: *n\n",
    HEAD + "nodes:\n  52:54:00:00:00:01:\n    vars: {a: \"x\n  52:54:00:00:00:02: y\"}\n",
    HEAD + "nodes:\n  52:54:00:00:00:01:\n    vars:\n      a: 'x\n  q: y'\n",
    HEAD + "nodes:\n  52:54:00:00:00:01:\n    vars:\n      a: |\n        x\n  52:54:00:00:00:02:\n",
    HEAD + "nodes:\n  52:54:00:00:00:01:\n    hostname: a\n   52:54:00:00:00:02:\n",
    HEAD + "nodes:\n\t52:54:00:00:00:01: {}\n",
    HEAD + "nodes:\n  52:54:00:00:00:01: {}\n---\nnodes: {}\n",
    HEAD + "nodes:\n  52:54:00:00:00:01:\n  52:54:00:00:00:01:\n",
    HEAD + "nodes:\n# nothing yet\n",
    "nodes:\n  52:54:00:00:00:01: {hostname: a}\nprofiles: {}\n",
    HEAD + "nodes:\n  52:54:00:00:00:01:\n    hostname: a\n" + HEAD.replace("profiles:", "allow_shrink: true\nzz:"),
])
def test_unusual_layouts_load_as_the_full_load_does(tmp_path, text):
    path = tmp_path / "nodes.yaml"
    loader = InventoryLoader()
    same_as_full(loader, path, fleet(4))  # something to reuse
    same_as_full(loader, path, text)
    same_as_full(loader, path, text + "# again\n")


def test_cut_keeps_every_byte_of_the_nodes_block():
    text = fleet(5)
    pieces = cut(text)
    assert pieces is not None and len(pieces.entries) == 5
    block = text[text.index("nodes:\n") + len("nodes:\n"):]
    assert "".join(pieces.entries) == block[block.index("  52:"):]
    assert pieces.head.startswith("# fleet\nprofiles:") and "nodes:" not in pieces.head


def test_a_start_reads_the_snapshot_of_the_same_text_only(tmp_path):
    """The first load of a daemon validates the content its last start saved, for the
    very same text; anything else (another text, a broken or foreign file, content JSON
    cannot carry) is loaded from the YAML, with the same outcome."""
    path, snap = tmp_path / "nodes.yaml", tmp_path / "state.json"
    text = fleet(30)
    first = InventoryLoader(snap)
    same_as_full(first, path, text)
    assert not first.from_snapshot and not snap.exists()
    first.save_snapshot()
    assert snap.exists()
    again = InventoryLoader(snap)
    same_as_full(again, path, text)
    assert again.from_snapshot
    same_as_full(again, path, fleet(30, edit=3))  # and reloads reuse entries as ever
    assert again.parsed == 1
    other = InventoryLoader(snap)
    same_as_full(other, path, fleet(30, edit=4))
    assert not other.from_snapshot
    head, _ = snap.read_text().split("\n", 1)
    for body in ("{not json", '{"nodes": {"52:54:00:00:00:01": {"bogus": 1}}}'):
        snap.write_text(head + "\n" + body)
        broken = InventoryLoader(snap)
        same_as_full(broken, path, text)
        assert not broken.from_snapshot
    dated = InventoryLoader(tmp_path / "dated.json")
    same_as_full(dated, path, text.replace("{join: kubeadm}", "{since: 2026-01-01}", 1))
    dated.save_snapshot()
    assert not (tmp_path / "dated.json").exists()


def test_a_start_without_a_snapshot_parses_ahead_in_a_child_process(tmp_path):
    """``netbootd serve`` has nodes.yaml parsed into the snapshot by a child while it
    imports its services; its first load then only validates. A text the child cannot
    save (broken YAML) leaves no snapshot, and the load reports it as ever."""
    from netbootd.inventorycache import parse_ahead

    path, snap = tmp_path / "nodes.yaml", tmp_path / "state" / "snapshot.json"
    text = fleet(40)
    path.write_text(text)
    parse_ahead(path, snap)()
    assert snap.exists()
    loader = InventoryLoader(snap)
    same_as_full(loader, path, text)
    assert loader.from_snapshot
    assert parse_ahead(path, snap) is parse_ahead(path, snap)  # up to date: no child
    broken = text.replace("nodes:\n", "nodes:\n  - [\n", 1)
    path.write_text(broken)
    snap.unlink()
    parse_ahead(path, snap)()
    assert not snap.exists()
    with pytest.raises(ConfigError) as err:
        InventoryLoader(snap).load(path, broken)
    assert "nodes.yaml" in str(err.value) and ":" in str(err.value)
