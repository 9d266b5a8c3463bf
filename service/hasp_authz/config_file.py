"""Read the optional YAML configuration file (HASP_CONFIG_FILE or --config).

The file is a mapping of setting names, as in Settings (``redis_url``,
``check_budget_ms``, ...), to scalar values. It sits below the environment
and the flags: a value from either replaces the file's. The values are
validated afterwards with every other source, so an error names the
environment variable and the fix. An unknown name is an error, so a typo
never silently keeps a default.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hasp_authz.yaml_files import YamlFileError, read_yaml


class ConfigFileError(ValueError):
    """The configuration file is unreadable or invalid. The message names it."""


def load_config_file(
    path: Path | str, names: Iterable[str], text_names: Iterable[str] = ()
) -> dict[str, object]:
    """Return the settings in the YAML file at ``path``, keyed by setting name.

    ``names`` lists the valid setting names, and ``text_names`` those whose
    values are text, where a YAML boolean is an error. An empty file yields no
    settings. Raises ConfigFileError.
    """
    try:
        document = read_yaml(path, "configuration file")
    except YamlFileError as error:
        raise ConfigFileError(str(error)) from error
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigFileError(
            f"configuration file {path} must be a mapping of setting names to "
            f"values, got {type(document).__name__}"
        )
    return _checked(document, path, frozenset(names), frozenset(text_names))


def _checked(
    document: dict,
    path: Path | str,
    valid: frozenset[str],
    text_names: frozenset[str],
) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, value in document.items():
        if name not in valid:
            raise ConfigFileError(
                f"configuration file {path}: unknown setting {name!r}; expected "
                f"one of {', '.join(sorted(valid))}"
            )
        if isinstance(value, dict | list) or value is None:
            raise ConfigFileError(
                f"configuration file {path}: {name} must be a single value "
                "(string, number or boolean)"
            )
        if isinstance(value, bool) and name in text_names:
            # YAML 1.1 reads an unquoted off, no or false as a boolean.
            raise ConfigFileError(
                f"configuration file {path}: {name} must be text; YAML read "
                f"{value} as a boolean, so quote the value, for example "
                f'{name}: "off"'
            )
        values[name] = value
    return values
