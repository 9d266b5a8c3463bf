"""Unit tests of the YAML configuration file reader."""

from __future__ import annotations

import pytest

from hasp_authz.config import ENVIRONMENT
from hasp_authz.config_file import ConfigFileError, load_config_file


def write(tmp_path, text: str):
    path = tmp_path / "hasp-authz.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_setting_names(tmp_path):
    path = write(tmp_path, "check_budget_ms: 150\nredis_prefix: 'app:'\n")
    values = load_config_file(path, ENVIRONMENT)
    assert values == {"check_budget_ms": 150, "redis_prefix": "app:"}


def test_empty_file_has_no_settings(tmp_path):
    assert load_config_file(write(tmp_path, ""), ENVIRONMENT) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("check_budget: 150\n", "unknown setting 'check_budget'"),
        ("- listen\n", "must be a mapping of setting names to values, got list"),
        ("listen: [a, b]\n", "listen must be a single value"),
        ("listen:\n", "listen must be a single value"),
        ("listen: 'a\n", "is not valid YAML"),
    ],
)
def test_invalid_file_raises(tmp_path, text, message):
    with pytest.raises(ConfigFileError, match=message):
        load_config_file(write(tmp_path, text), ENVIRONMENT)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ConfigFileError, match="cannot read configuration file"):
        load_config_file(tmp_path / "absent.yaml", ENVIRONMENT)
