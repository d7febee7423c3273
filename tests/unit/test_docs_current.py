"""docs/configuration.md is generated from the settings model; it must not drift."""

from pathlib import Path

from netbootd.cli import config_reference

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert config_reference().strip() in doc, (
        "docs/configuration.md is stale: regenerate the table with "
        "`netbootd config --reference`")
