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

import yaml


class ConfigFileError(ValueError):
    """The configuration file is unreadable or invalid. The message names it."""


def load_config_file(path: Path | str, names: Iterable[str]) -> dict[str, object]:
    """Return the settings in the YAML file at ``path``, keyed by setting name.

    ``names`` lists the valid setting names. An empty file yields no settings.
    Raises ConfigFileError.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(
            f"cannot read configuration file {path}: {error}"
        ) from error
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigFileError(
            f"configuration file {path} is not valid YAML: {error}"
        ) from error
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigFileError(
            f"configuration file {path} must be a mapping of setting names to "
            f"values, got {type(document).__name__}"
        )
    return _checked(document, path, frozenset(names))


def _checked(
    document: dict, path: Path | str, valid: frozenset[str]
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
        values[name] = value
    return values
