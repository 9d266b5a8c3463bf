"""Settings for ``hasp-authz``, from flags, HASP_* variables and a YAML file.

Flags win over the environment, which wins over the configuration file
(HASP_CONFIG_FILE or ``--config``), which wins over the defaults. Everything is
validated once at start-up into a frozen Settings; an error names the setting
and says what a valid value looks like.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import unquote

from hasp_authz.config_file import ConfigFileError, load_config_file
from hasp_authz.records import DEFAULT_PREFIX
from hasp_authz.redis_clients import example_for, parse_redis_url
from hasp_authz.routes import DEFAULT_ROUTES_FILE


class ConfigError(ValueError):
    """A setting is invalid. The message names the setting and the fix."""


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:9001"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    routes_file: Path = DEFAULT_ROUTES_FILE
    # Upper bound for one Check, below Envoy's ext_authz timeout (0.5 s in
    # envoy.yaml) so the sidecar answers 503 itself before Envoy gives up.
    check_budget_ms: int = 200
    # Connect and socket timeout of each Redis call, within the Check budget.
    redis_timeout_ms: int = 100
    redis_max_connections: int = 64
    log_level: str = "INFO"
    # Max entries in each in-process cache (keys, orgs, unknown hashes). 0 turns
    # the cache off, so every Check reads Redis.
    cache_size: int = 100_000
    cache_ttl_seconds: float = 30.0
    # TTL of "no such key" entries. 0 turns negative caching off.
    negative_cache_ttl_seconds: float = 1.0
    # Interval between writes of key last-used times to Redis.
    last_used_flush_seconds: float = 60.0
    # Checks running at once. Past this, a Check gets the 503 deny at once
    # instead of waiting for a slot past Envoy's timeout.
    max_concurrent_checks: int = 256
    # Time that in-flight Checks get to finish after SIGTERM or SIGINT.
    shutdown_grace_seconds: float = 5.0
    # While lookups in the Redis copy fail, keys verified within this many
    # seconds are still decided from memory. 0 turns it off, so every such
    # Check gets the 503.
    stale_if_error_seconds: float = 0.0
    # HOST:PORT of the HTTP server for /metrics, /healthz and /readyz, or "off".
    metrics_listen: str = "127.0.0.1:9002"
    # "json" (one JSON object per line) or "text".
    log_format: str = "json"
    # Optional YAML file of settings, below the environment and the flags.
    config_file: Path | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{item.name}={getattr(self, item.name)!r}"
            for item in fields(self)
            if item.name != "redis_url"
        )
        return f"Settings(redis_url={redact_url(self.redis_url)!r}, {shown})"


# Setting name -> environment variable.
ENVIRONMENT = {item.name: f"HASP_{item.name.upper()}" for item in fields(Settings)}


# A query parameter whose name, decoded and in lower case, ends in "password":
# redis-py's ``password=`` and redis+sentinel://'s ``sentinel_password=``.
_QUERY_PARAMETER_RE = re.compile(r"(?:^|(?<=[?&]))([^&=#]*)=([^&#]*)")


def redact_url(url: str) -> str:
    """Return ``url`` with any password, in the user info or the query, as ``***``.

    The host and port are kept as written when the URL is well formed. The
    user info ends at the last ``@``, so a password that contains an
    unencoded ``/``, ``?``, ``#`` or ``@`` is still hidden, even at the cost of
    hiding more than the password.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "<invalid URL>" if "@" in url or "password" in url.lower() else url
    user_info, at, after = rest.rpartition("@")
    if at and ":" in user_info:
        rest = user_info.partition(":")[0] + ":***@" + after
    base, question, query = rest.partition("?")
    if question:
        rest = base + "?" + _QUERY_PARAMETER_RE.sub(_redact_parameter, query)
    return f"{scheme}://{rest}"


def _redact_parameter(match: re.Match[str]) -> str:
    name = match.group(1)
    if unquote(name).lower().endswith("password"):
        return f"{name}=***"
    return match.group(0)


# Value of HASP_METRICS_LISTEN that turns the HTTP server off.
METRICS_OFF = "off"
# Settings whose values are text, where the settings file must quote a value
# that YAML would read as a boolean (off, no, false).
TEXT_SETTINGS = tuple(
    item.name for item in fields(Settings) if isinstance(item.default, str)
)


def load_settings(
    overrides: Mapping[str, object | None] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Merge defaults, the configuration file, environment and flags, then validate.

    Raises ConfigError, also for an unreadable or invalid configuration file.
    """
    values: dict[str, object] = {}
    for name, variable in ENVIRONMENT.items():
        if variable in environ:
            values[name] = environ[variable]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    config_file = values.get("config_file")
    if config_file:
        file_names = [name for name in ENVIRONMENT if name != "config_file"]
        try:
            from_file = load_config_file(str(config_file), file_names, TEXT_SETTINGS)
        except ConfigFileError as error:
            raise ConfigError(str(error)) from error
        values = {**from_file, **values}
    return _validated(values)


def _validated(values: dict[str, object]) -> Settings:
    defaults = Settings()
    settings = Settings(
        listen=_listen(str(values.get("listen", defaults.listen))),
        redis_url=_redis_url(str(values.get("redis_url", defaults.redis_url))),
        redis_prefix=str(values.get("redis_prefix", defaults.redis_prefix)),
        routes_file=Path(str(values.get("routes_file", defaults.routes_file))),
        check_budget_ms=_positive_int(values, "check_budget_ms", defaults),
        redis_timeout_ms=_positive_int(values, "redis_timeout_ms", defaults),
        redis_max_connections=_positive_int(values, "redis_max_connections", defaults),
        log_level=_log_level(str(values.get("log_level", defaults.log_level))),
        cache_size=_non_negative_int(values, "cache_size", defaults),
        cache_ttl_seconds=_seconds(values, "cache_ttl_seconds", defaults),
        negative_cache_ttl_seconds=_seconds(
            values, "negative_cache_ttl_seconds", defaults, zero_allowed=True
        ),
        last_used_flush_seconds=_seconds(values, "last_used_flush_seconds", defaults),
        max_concurrent_checks=_positive_int(values, "max_concurrent_checks", defaults),
        shutdown_grace_seconds=_seconds(
            values, "shutdown_grace_seconds", defaults, zero_allowed=True
        ),
        stale_if_error_seconds=_seconds(
            values, "stale_if_error_seconds", defaults, zero_allowed=True
        ),
        metrics_listen=_metrics_listen(
            str(values.get("metrics_listen", defaults.metrics_listen))
        ),
        log_format=_log_format(str(values.get("log_format", defaults.log_format))),
        config_file=Path(str(values["config_file"]))
        if values.get("config_file")
        else None,
    )
    _check_relations(settings)
    return settings


# Upper bound of HASP_STALE_IF_ERROR_SECONDS. A revocation made while Redis is
# failing is not seen for up to this long, so the window stays short.
MAX_STALE_IF_ERROR_SECONDS = 300.0


def _check_relations(settings: Settings) -> None:
    if settings.redis_timeout_ms >= settings.check_budget_ms:
        raise ConfigError(
            f"{ENVIRONMENT['redis_timeout_ms']}={settings.redis_timeout_ms} must be "
            f"below {ENVIRONMENT['check_budget_ms']}={settings.check_budget_ms}, so "
            "a slow Redis call still leaves time to answer 503"
        )
    if not settings.redis_prefix:
        raise ConfigError(f"{ENVIRONMENT['redis_prefix']} must not be empty")
    if settings.negative_cache_ttl_seconds > settings.cache_ttl_seconds:
        raise ConfigError(
            f"{ENVIRONMENT['negative_cache_ttl_seconds']}="
            f"{settings.negative_cache_ttl_seconds:g} must not exceed "
            f"{ENVIRONMENT['cache_ttl_seconds']}={settings.cache_ttl_seconds:g}; "
            "lower the negative TTL or raise the cache TTL"
        )
    _check_stale_if_error(settings)


def _check_stale_if_error(settings: Settings) -> None:
    variable = ENVIRONMENT["stale_if_error_seconds"]
    if settings.stale_if_error_seconds > MAX_STALE_IF_ERROR_SECONDS:
        raise ConfigError(
            f"{variable}={settings.stale_if_error_seconds:g} is too long; expected "
            f"at most {MAX_STALE_IF_ERROR_SECONDS:g} seconds, because a key revoked "
            "while Redis is failing stays usable for that long"
        )
    if settings.stale_if_error_seconds > 0 and settings.cache_size == 0:
        raise ConfigError(
            f"{variable}={settings.stale_if_error_seconds:g} needs the in-process "
            f"cache, which keeps the verified keys; set {ENVIRONMENT['cache_size']} "
            f"above 0 or {variable} to 0"
        )


def _listen(value: str, name: str = "listen", example: str = "127.0.0.1:9001") -> str:
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{ENVIRONMENT[name]}={value!r} is invalid; expected HOST:PORT, "
            f"for example {example}"
        )
    return value


def _metrics_listen(value: str) -> str:
    if value.lower() == METRICS_OFF:
        return METRICS_OFF
    try:
        return _listen(value, "metrics_listen", "127.0.0.1:9002")
    except ConfigError as error:
        raise ConfigError(f'{error}, or "off"') from None


def _log_format(value: str) -> str:
    log_format = value.lower()
    if log_format not in ("json", "text"):
        raise ConfigError(
            f"{ENVIRONMENT['log_format']}={value!r} is invalid; expected json or text"
        )
    return log_format


def _redis_url(value: str) -> str:
    # Parse as the server will at start-up, so a bad port or db query value is
    # a ConfigError here and not a traceback from the server.
    try:
        parse_redis_url(value)
    except ValueError as error:
        raise ConfigError(
            f"{ENVIRONMENT['redis_url']}={redact_url(value)!r} is invalid ({error}); "
            f"expected a URL such as {example_for(value)}"
        ) from error
    return value


def _positive_int(values: dict[str, object], name: str, defaults: Settings) -> int:
    raw = values.get(name, getattr(defaults, name))
    try:
        number = int(str(raw))
    except ValueError:
        number = 0
    if number <= 0:
        raise ConfigError(
            f"{ENVIRONMENT[name]}={raw!r} is invalid; expected a positive integer"
        )
    return number


def _non_negative_int(values: dict[str, object], name: str, defaults: Settings) -> int:
    raw = values.get(name, getattr(defaults, name))
    try:
        number = int(str(raw))
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(
            f"{ENVIRONMENT[name]}={raw!r} is invalid; expected an integer, 0 or more"
        )
    return number


def _seconds(
    values: dict[str, object],
    name: str,
    defaults: Settings,
    *,
    zero_allowed: bool = False,
) -> float:
    raw = values.get(name, getattr(defaults, name))
    try:
        number = float(str(raw))
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_allowed):
        expected = "0 or more" if zero_allowed else "more than 0"
        raise ConfigError(
            f"{ENVIRONMENT[name]}={raw!r} is invalid; expected a number of seconds, "
            f"{expected}, such as {getattr(defaults, name):g}"
        )
    return number


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"{ENVIRONMENT['log_level']}={value!r} is invalid; expected DEBUG, INFO, "
            "WARNING or ERROR"
        )
    return level
