"""Inventory validation (file:line: field) and matchbox-style selector matching."""

from pathlib import Path

import pytest

from netbootd.inventory import load_inventory
from netbootd.model import Action, ClientFacts, ClientKind, normalise_mac, normalise_serial
from netbootd.yamlfile import ConfigError

REPO = Path(__file__).resolve().parents[2]


def inv(tmp_path: Path, text: str):
    p = tmp_path / "nodes.yaml"
    p.write_text(text)
    return load_inventory(p)


def problems(tmp_path: Path, text: str):
    with pytest.raises(ConfigError) as err:
        inv(tmp_path, text)
    return err.value.problems


@pytest.mark.parametrize("text", ["DC:A6:32:01:36:C2", "dc-a6-32-01-36-c2", "dca6.3201.36c2",
                                  "dca6320136c2", " dc:a6:32:01:36:c2 "])
def test_mac_notations_normalise(text):
    assert normalise_mac(text) == "dc:a6:32:01:36:c2"


def test_serial_low_32_bits():
    assert normalise_serial("10000000A1B2C3D4") == "a1b2c3d4"
    assert normalise_serial("a1b2c3d4") == "a1b2c3d4"
    assert normalise_serial(0x1A1B2C3D4) == "a1b2c3d4"


def test_shipped_inventory_is_valid():
    i = load_inventory(REPO / "config" / "nodes.yaml")
    assert "d8:3a:dd:12:34:56" in i.nodes
    assert i.mac_for_serial("a1b2c3d4") == "d8:3a:dd:12:34:56"


def test_duplicate_mac_in_two_notations(tmp_path):
    (p,) = problems(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01: {}\n  AA-BB-CC-DD-EE-01: {}\n")
    assert p.line == 3 and "duplicate MAC" in p.message and p.field.startswith("nodes.")


def test_malformed_mac(tmp_path):
    (p,) = problems(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01: {}\n  not-a-mac: {}\n")
    assert p.line == 3 and p.field == "nodes.not-a-mac" and "not a MAC" in p.message


def test_unknown_profile(tmp_path):
    (p,) = problems(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01:\n    hostname: a\n"
                               "    profile: nope\n")
    assert p.line == 4 and p.field.endswith(".profile") and "unknown profile" in p.message


def test_bad_field_value_line(tmp_path):
    (p,) = problems(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01:\n    action: reboot\n")
    assert p.line == 3 and p.field == "nodes.aa:bb:cc:dd:ee:01.action"


def test_yaml_syntax_error(tmp_path):
    (p,) = problems(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01: {hostname: a\n")
    assert p.line >= 2 and "YAML" in p.message


def test_ambiguous_selector_tie(tmp_path):
    ps = problems(tmp_path, "profiles:\n  a:\n    selectors: {kind: rpi}\n"
                            "  b:\n    selectors: {kind: rpi}\n")
    assert ps[0].field == "profiles.b.selectors" and "ambiguous" in ps[0].message
    assert ps[0].line == 5


def test_disjoint_selectors_are_not_a_tie(tmp_path):
    inv(tmp_path, "profiles:\n  a:\n    selectors: {kind: rpi}\n"
                  "  b:\n    selectors: {kind: ipxe}\n")


def test_most_selectors_win(tmp_path):
    i = inv(tmp_path, """
profiles:
  pis: {selectors: {kind: rpi}, role: generic}
  pi-workers: {selectors: {kind: rpi, labels: {role: worker}}, role: worker}
  uefi: {selectors: {kind: pxe-uefi-x64}, action: local}
nodes:
  aa:bb:cc:dd:ee:01: {labels: {role: worker}}
  aa:bb:cc:dd:ee:02: {}
""")
    w = i.view(ClientFacts(mac="aa:bb:cc:dd:ee:01", kind=ClientKind.RPI))
    assert (w.profile, w.role) == ("pi-workers", "worker")
    g = i.view(ClientFacts(mac="aa:bb:cc:dd:ee:02", kind=ClientKind.RPI))
    assert g.profile == "pis"
    u = ClientFacts(mac="aa:bb:cc:dd:ee:03", kind=ClientKind.PXE_UEFI_X64, arch=7)
    assert i.view(u).profile == "uefi" and i.view(u).action == Action.LOCAL
    assert i.view(ClientFacts(mac="aa:bb:cc:dd:ee:04")).profile == "default"


def test_node_found_by_serial_only_with_match_serial(tmp_path):
    """A serial from another MAC names the node only when it says ``match: serial``
    (option 97 is bytes anyone can send; docs/dhcp.md)."""
    facts = ClientFacts(mac="ff:ff:ff:00:00:01", serial="deadbeef", kind=ClientKind.RPI)
    i = inv(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01: {serial: 10000000deadbeef, hostname: p1}\n")
    assert not i.view(facts).known
    i = inv(tmp_path, "nodes:\n  aa:bb:cc:dd:ee:01: {serial: 10000000deadbeef, hostname: p1, "
               "match: serial}\n")
    v = i.view(facts)
    assert v.known and v.hostname == "p1" and v.mac == "aa:bb:cc:dd:ee:01"


@pytest.mark.parametrize("text", [
    (REPO / "config" / "nodes.yaml").read_text(),
    (REPO / "config" / "netbootd.yaml").read_text(),
    "a: 1\nb: '2'\nc: 12:34:56\nd: yes\ne: ~\nf: 1.5\ng: 2026-01-01\nh: [1, {x: y}]\n",
    "", "# only a comment\n", "- 1\n- b: c\n", "a: &A {x: 1}\nb: *A\n", "a: 0x1f\nb: .inf\n",
    "a: !!str 1\n", "<<: {a: 1}\n", "a: 1\na: 2\n", "--- a\n--- b\n", "? [a]\n: 1\n",
    "a: {b: 1\n", "a: *nope\n",
])
def test_fast_yaml_path_builds_what_the_reference_loader_builds(text):
    """Values, key and item lines, and errors are the reference loader's, whichever
    path parsed the text."""
    import yaml

    from netbootd import yamlfile

    def shape(v):
        if isinstance(v, yamlfile.LineDict):
            return ("map", v.line, [(k, v.key_lines[k], shape(x)) for k, x in v.items()])
        if isinstance(v, yamlfile.LineList):
            return ("seq", v.line, list(v.item_lines), [shape(x) for x in v])
        return (type(v).__name__, v)

    def outcome(load):
        try:
            return shape(load(text))
        except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
            return ("error", type(exc).__name__, str(exc))

    assert outcome(yamlfile.parse_yaml_text) == outcome(
        lambda t: yaml.load(t, Loader=yamlfile._Loader))
