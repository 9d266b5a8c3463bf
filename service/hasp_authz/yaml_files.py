"""Read the operator's YAML files (the route file, the settings file) defensively.

Both files are read at start-up, and the route file again on SIGHUP, so a bad
file must end in one clear error and never in a traceback, a hang or a huge
allocation:

- only a regular file is read, so a FIFO or a device such as /dev/zero is
  rejected instead of blocking or filling memory;
- a file larger than ``max_bytes`` is rejected before it is parsed;
- a mapping with the same key twice is an error, because PyYAML's own loader
  would keep the last value and silently drop the first;
- nesting deep enough to exhaust Python's recursion limit is an error.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

# Upper bound of a file's size. A route file of 1,000 entries is about 60 KiB.
MAX_BYTES = 1024 * 1024


class YamlFileError(ValueError):
    """The file cannot be read or parsed. The message names the file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated mapping key is an error."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable; the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path | str, description: str, max_bytes: int = MAX_BYTES) -> Any:
    """Parse the YAML document in ``path``; ``description`` names the file in errors.

    Raises YamlFileError.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise YamlFileError(f"{description} {path} is not a regular file")
        if info.st_size > max_bytes:
            raise YamlFileError(
                f"{description} {path} is {info.st_size} bytes; the limit is "
                f"{max_bytes}"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise YamlFileError(f"cannot read {description} {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise YamlFileError(f"{description} {path} is not UTF-8: {error}") from error
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        raise YamlFileError(
            f"{description} {path} is not valid YAML: {error}"
        ) from error
    except RecursionError:
        raise YamlFileError(f"{description} {path} is nested too deeply") from None
