"""Reading the operator's YAML files: every bad file is one clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hasp_authz.yaml_files import YamlFileError, read_yaml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "file.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_yaml_parses_mapping(tmp_path: Path) -> None:
    assert read_yaml(write(tmp_path, "a: 1\nb: [x, y]\n"), "test file") == {
        "a": 1,
        "b": ["x", "y"],
    }


def test_read_yaml_rejects_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "a: 1\nb: 2\na: 3\n")

    with pytest.raises(YamlFileError, match="duplicate key 'a'"):
        read_yaml(path, "test file")


def test_read_yaml_rejects_nested_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, "routes:\n  - path: /a\n    path: /b\n")

    with pytest.raises(YamlFileError, match="duplicate key 'path'"):
        read_yaml(path, "test file")


def test_read_yaml_rejects_deep_nesting(tmp_path: Path) -> None:
    path = write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")

    with pytest.raises(YamlFileError, match="nested too deeply"):
        read_yaml(path, "test file")


def test_read_yaml_rejects_large_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a: " + "x" * 200 + "\n")

    with pytest.raises(YamlFileError, match="the limit is 100"):
        read_yaml(path, "test file", max_bytes=100)


def test_read_yaml_rejects_device() -> None:
    with pytest.raises(YamlFileError, match="/dev/zero is not a regular file"):
        read_yaml("/dev/zero", "test file")


def test_read_yaml_rejects_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)

    with pytest.raises(YamlFileError, match="is not a regular file"):
        read_yaml(fifo, "test file")


def test_read_yaml_rejects_python_tag(tmp_path: Path) -> None:
    path = write(tmp_path, "a: !!python/object/apply:os.system ['true']\n")

    with pytest.raises(YamlFileError, match="not valid YAML"):
        read_yaml(path, "test file")


def test_read_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(YamlFileError, match="cannot read test file"):
        read_yaml(tmp_path / "absent.yaml", "test file")
