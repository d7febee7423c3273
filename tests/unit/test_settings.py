"""Settings precedence: CLI > env > file > defaults; errors name file, line and field."""

from pathlib import Path

import pytest

from netbootd.settings import load_settings
from netbootd.yamlfile import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "netbootd.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file(monkeypatch):
    monkeypatch.delenv("NETBOOTD_HTTP__PORT", raising=False)
    s = load_settings(None, use_default_path=False)
    assert (s.dhcp.port, s.dhcp.pxe_port, s.tftp.port, s.http.port) == (67, 4011, 69, 8080)
    assert s.dns.enabled is False and s.policy.unknown == "ignore"


def test_file_beats_defaults_env_beats_file_cli_beats_env(tmp_path, monkeypatch):
    path = write(tmp_path, "http:\n  port: 9000\n  bind: 127.0.0.1\ntftp:\n  port: 6969\n")
    assert load_settings(path).http.port == 9000
    monkeypatch.setenv("NETBOOTD_HTTP__PORT", "9100")
    s = load_settings(path)
    assert s.http.port == 9100
    assert s.http.bind == "127.0.0.1", "env for one key must not wipe the file's other keys"
    assert s.tftp.port == 6969
    s = load_settings(path, {"http": {"port": 9200}})
    assert s.http.port == 9200 and s.http.bind == "127.0.0.1"


def test_relative_paths_are_relative_to_the_file(tmp_path):
    path = write(tmp_path, "paths:\n  images: ../img\n  inventory: nodes.yaml\n")
    s = load_settings(path)
    assert s.paths.images == (tmp_path.parent / "img").resolve()
    assert s.paths.inventory == tmp_path / "nodes.yaml"


def test_bad_value_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "http:\n  port: 9000\ntftp:\n  port: abc\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    (p,) = err.value.problems
    assert (p.file, p.line, p.field) == (str(path), 4, "tftp.port")


def test_unknown_key_is_rejected(tmp_path):
    path = write(tmp_path, "http:\n  prot: 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert err.value.problems[0].field == "http.prot"
    assert err.value.problems[0].line == 2


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "http:\n  port: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert err.value.problems[0].line >= 2
    assert "YAML" in err.value.problems[0].message
