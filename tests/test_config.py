"""Tests for hasp_authz.config: defaults, precedence, validation and redaction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hasp_authz.config import (
    ENVIRONMENT,
    ConfigError,
    Settings,
    load_settings,
    redact_url,
)
from hasp_authz.routes import DEFAULT_ROUTES_FILE


def test_environment_variable_names():
    assert ENVIRONMENT == {
        "listen": "HASP_LISTEN",
        "redis_url": "HASP_REDIS_URL",
        "redis_prefix": "HASP_REDIS_PREFIX",
        "routes_file": "HASP_ROUTES_FILE",
        "check_budget_ms": "HASP_CHECK_BUDGET_MS",
        "redis_timeout_ms": "HASP_REDIS_TIMEOUT_MS",
        "redis_max_connections": "HASP_REDIS_MAX_CONNECTIONS",
        "log_level": "HASP_LOG_LEVEL",
        "cache_size": "HASP_CACHE_SIZE",
        "cache_ttl_seconds": "HASP_CACHE_TTL_SECONDS",
        "negative_cache_ttl_seconds": "HASP_NEGATIVE_CACHE_TTL_SECONDS",
        "last_used_flush_seconds": "HASP_LAST_USED_FLUSH_SECONDS",
        "max_concurrent_checks": "HASP_MAX_CONCURRENT_CHECKS",
        "shutdown_grace_seconds": "HASP_SHUTDOWN_GRACE_SECONDS",
        "stale_if_error_seconds": "HASP_STALE_IF_ERROR_SECONDS",
        "metrics_listen": "HASP_METRICS_LISTEN",
        "log_format": "HASP_LOG_FORMAT",
        "config_file": "HASP_CONFIG_FILE",
    }


def test_load_settings_defaults():
    settings = load_settings({}, environ={})

    assert settings == Settings()
    assert settings.listen == "127.0.0.1:9001"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.redis_prefix == "hasp:"
    assert settings.routes_file == DEFAULT_ROUTES_FILE
    assert settings.check_budget_ms == 200
    assert settings.redis_timeout_ms == 100
    assert settings.redis_max_connections == 64
    assert settings.log_level == "INFO"
    assert settings.cache_size == 100_000
    assert settings.cache_ttl_seconds == 30.0
    assert settings.negative_cache_ttl_seconds == 1.0
    assert settings.last_used_flush_seconds == 60.0
    assert settings.max_concurrent_checks == 256
    assert settings.shutdown_grace_seconds == 5.0
    assert settings.stale_if_error_seconds == 0.0


def test_load_settings_defaults_without_overrides():
    assert load_settings(None, environ={}) == Settings()


def test_load_settings_ignores_unrelated_environment():
    environ = {"REDIS_URL": "redis://10.0.0.1/0", "HASP_UNKNOWN": "1", "LISTEN": "x"}

    assert load_settings({}, environ=environ) == Settings()


def test_load_settings_reads_environment():
    environ = {
        "HASP_LISTEN": "0.0.0.0:9100",
        "HASP_REDIS_URL": "redis://127.0.0.1:6380/2",
        "HASP_REDIS_PREFIX": "staging:",
        "HASP_ROUTES_FILE": "/etc/hasp/routes.yaml",
        "HASP_CHECK_BUDGET_MS": "300",
        "HASP_REDIS_TIMEOUT_MS": "150",
        "HASP_REDIS_MAX_CONNECTIONS": "8",
        "HASP_LOG_LEVEL": "debug",
        "HASP_CACHE_SIZE": "500",
        "HASP_CACHE_TTL_SECONDS": "12.5",
        "HASP_NEGATIVE_CACHE_TTL_SECONDS": "0.25",
        "HASP_LAST_USED_FLUSH_SECONDS": "0.5",
        "HASP_MAX_CONCURRENT_CHECKS": "32",
        "HASP_SHUTDOWN_GRACE_SECONDS": "12",
        "HASP_STALE_IF_ERROR_SECONDS": "30",
    }

    settings = load_settings({}, environ=environ)

    assert settings.listen == "0.0.0.0:9100"
    assert settings.redis_url == "redis://127.0.0.1:6380/2"
    assert settings.redis_prefix == "staging:"
    assert settings.routes_file == Path("/etc/hasp/routes.yaml")
    assert settings.check_budget_ms == 300
    assert settings.redis_timeout_ms == 150
    assert settings.redis_max_connections == 8
    assert settings.log_level == "DEBUG"
    assert settings.cache_size == 500
    assert settings.cache_ttl_seconds == 12.5
    assert settings.negative_cache_ttl_seconds == 0.25
    assert settings.last_used_flush_seconds == 0.5
    assert settings.max_concurrent_checks == 32
    assert settings.shutdown_grace_seconds == 12.0
    assert settings.stale_if_error_seconds == 30.0


def test_load_settings_flag_wins_over_environment():
    environ = {
        "HASP_LISTEN": "127.0.0.1:9100",
        "HASP_REDIS_PREFIX": "from-env:",
        "HASP_CHECK_BUDGET_MS": "300",
    }
    flags = {"listen": "127.0.0.1:9200", "check_budget_ms": "400"}

    settings = load_settings(flags, environ=environ)

    assert settings.listen == "127.0.0.1:9200"
    assert settings.check_budget_ms == 400
    assert settings.redis_prefix == "from-env:"


def test_load_settings_unset_flag_keeps_environment():
    environ = {"HASP_REDIS_URL": "redis://127.0.0.1:6380/0"}
    flags = {name: None for name in ENVIRONMENT}

    settings = load_settings(flags, environ=environ)

    assert settings.redis_url == "redis://127.0.0.1:6380/0"
    assert settings.listen == Settings().listen


def test_load_settings_flag_over_default():
    settings = load_settings({"redis_prefix": "flag:"}, environ={})

    assert settings.redis_prefix == "flag:"


def test_load_settings_rejects_invalid_flag():
    with pytest.raises(ConfigError, match="HASP_CHECK_BUDGET_MS"):
        load_settings({"check_budget_ms": "0"}, environ={"HASP_CHECK_BUDGET_MS": "300"})


def test_load_settings_flag_replaces_invalid_environment():
    settings = load_settings(
        {"log_level": "warning"}, environ={"HASP_LOG_LEVEL": "chatty"}
    )

    assert settings.log_level == "WARNING"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://cache.internal:6380/1",
        "redis://user:secret@127.0.0.1:6379/0",
        "redis://[::1]:6379/0",
        "unix:///var/run/redis/redis.sock?db=2",
        "REDIS://127.0.0.1:6379/0",
        "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0",
        "redis+sentinel://:s3cret@sentinel/mymaster?sentinel_password=other",
        "rediss+sentinel://[::1]:26379/mymaster",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
        "rediss+cluster://user:s3cret@cache-0:6379",
    ],
)
def test_load_settings_accepts_redis_url(url):
    assert load_settings({"redis_url": url}, environ={}).redis_url == url


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HASP_LISTEN", "9001"),
        ("HASP_LISTEN", "127.0.0.1:"),
        ("HASP_LISTEN", ":9001"),
        ("HASP_LISTEN", "127.0.0.1:0"),
        ("HASP_LISTEN", "127.0.0.1:65536"),
        ("HASP_LISTEN", "127.0.0.1:http"),
        ("HASP_LISTEN", "127.0.0.1:-1"),
        ("HASP_LISTEN", ""),
        ("HASP_REDIS_URL", "http://127.0.0.1:6379"),
        ("HASP_REDIS_URL", "127.0.0.1:6379"),
        ("HASP_REDIS_URL", "redis:127.0.0.1"),
        ("HASP_REDIS_URL", "redis://127.0.0.1:notaport/0"),
        ("HASP_REDIS_URL", "redis://127.0.0.1:6379/0?db=zero"),
        ("HASP_REDIS_URL", "redis://[::1/0"),
        ("HASP_REDIS_URL", ""),
        ("HASP_REDIS_PREFIX", ""),
        ("HASP_CHECK_BUDGET_MS", "0"),
        ("HASP_CHECK_BUDGET_MS", "-5"),
        ("HASP_CHECK_BUDGET_MS", "fast"),
        ("HASP_CHECK_BUDGET_MS", "1.5"),
        ("HASP_CHECK_BUDGET_MS", ""),
        ("HASP_REDIS_TIMEOUT_MS", "0"),
        ("HASP_REDIS_TIMEOUT_MS", "100ms"),
        ("HASP_REDIS_MAX_CONNECTIONS", "0"),
        ("HASP_REDIS_MAX_CONNECTIONS", "many"),
        ("HASP_LOG_LEVEL", "verbose"),
        ("HASP_LOG_LEVEL", "CRITICAL"),
        ("HASP_LOG_LEVEL", ""),
        ("HASP_CACHE_SIZE", "-1"),
        ("HASP_CACHE_SIZE", "many"),
        ("HASP_CACHE_SIZE", "1.5"),
        ("HASP_CACHE_SIZE", ""),
        ("HASP_CACHE_TTL_SECONDS", "0"),
        ("HASP_CACHE_TTL_SECONDS", "-1"),
        ("HASP_CACHE_TTL_SECONDS", "soon"),
        ("HASP_CACHE_TTL_SECONDS", "nan"),
        ("HASP_CACHE_TTL_SECONDS", "inf"),
        ("HASP_CACHE_TTL_SECONDS", ""),
        ("HASP_NEGATIVE_CACHE_TTL_SECONDS", "-0.5"),
        ("HASP_NEGATIVE_CACHE_TTL_SECONDS", "never"),
        ("HASP_NEGATIVE_CACHE_TTL_SECONDS", "31"),
        ("HASP_LAST_USED_FLUSH_SECONDS", "0"),
        ("HASP_LAST_USED_FLUSH_SECONDS", "-60"),
        ("HASP_LAST_USED_FLUSH_SECONDS", "1m"),
        ("HASP_MAX_CONCURRENT_CHECKS", "0"),
        ("HASP_MAX_CONCURRENT_CHECKS", "-5"),
        ("HASP_MAX_CONCURRENT_CHECKS", "unlimited"),
        ("HASP_SHUTDOWN_GRACE_SECONDS", "-1"),
        ("HASP_SHUTDOWN_GRACE_SECONDS", "5s"),
        ("HASP_SHUTDOWN_GRACE_SECONDS", "inf"),
        ("HASP_STALE_IF_ERROR_SECONDS", "-1"),
        ("HASP_STALE_IF_ERROR_SECONDS", "301"),
        ("HASP_STALE_IF_ERROR_SECONDS", "forever"),
    ],
)
def test_load_settings_error_names_variable(variable, value):
    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ={variable: value})

    assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("timeout", "budget"), [("100", "100"), ("250", "200"), ("200", "100")]
)
def test_load_settings_redis_timeout_must_be_below_budget(timeout, budget):
    environ = {"HASP_REDIS_TIMEOUT_MS": timeout, "HASP_CHECK_BUDGET_MS": budget}

    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ=environ)

    message = str(caught.value)
    assert f"HASP_REDIS_TIMEOUT_MS={timeout}" in message
    assert f"HASP_CHECK_BUDGET_MS={budget}" in message


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("HASP_CACHE_SIZE", "0", "cache_size", 0),
        ("HASP_NEGATIVE_CACHE_TTL_SECONDS", "0", "negative_cache_ttl_seconds", 0.0),
        ("HASP_NEGATIVE_CACHE_TTL_SECONDS", "30", "negative_cache_ttl_seconds", 30.0),
        ("HASP_LAST_USED_FLUSH_SECONDS", "0.05", "last_used_flush_seconds", 0.05),
        ("HASP_SHUTDOWN_GRACE_SECONDS", "0", "shutdown_grace_seconds", 0.0),
        ("HASP_STALE_IF_ERROR_SECONDS", "300", "stale_if_error_seconds", 300.0),
    ],
)
def test_load_settings_accepts_cache_edge(variable, value, field, expected):
    settings = load_settings({}, environ={variable: value})

    assert getattr(settings, field) == expected


def test_load_settings_stale_if_error_needs_cache():
    environ = {"HASP_STALE_IF_ERROR_SECONDS": "10", "HASP_CACHE_SIZE": "0"}

    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ=environ)

    message = str(caught.value)
    assert "HASP_STALE_IF_ERROR_SECONDS=10" in message
    assert "HASP_CACHE_SIZE" in message


def test_load_settings_negative_ttl_must_not_exceed_ttl():
    environ = {
        "HASP_CACHE_TTL_SECONDS": "2",
        "HASP_NEGATIVE_CACHE_TTL_SECONDS": "5",
    }

    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ=environ)

    message = str(caught.value)
    assert "HASP_NEGATIVE_CACHE_TTL_SECONDS=5" in message
    assert "HASP_CACHE_TTL_SECONDS=2" in message


def test_load_settings_cache_flags_win_over_environment():
    environ = {"HASP_CACHE_SIZE": "10", "HASP_CACHE_TTL_SECONDS": "5"}
    flags = {"cache_size": "0", "cache_ttl_seconds": "300"}

    settings = load_settings(flags, environ=environ)

    assert settings.cache_size == 0
    assert settings.cache_ttl_seconds == 300.0


def test_load_settings_error_says_expected_form():
    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ={"HASP_LISTEN": "9001"})

    assert "expected HOST:PORT" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://:s3cret@127.0.0.1:6379/0",
        "redis://:s3cret@127.0.0.1:notaport/0",
        "redis://user:s3cret@127.0.0.1:6379/0?db=zero",
        "redis://:s3cret@[::1/0",
        "redis+sentinel://:s3cret@127.0.0.1:26379",
        "redis+sentinel://:s3cret@127.0.0.1:26379/svc/x?sentinel_password=s3cret",
        "redis+cluster://:s3cret@127.0.0.1:7000/3",
        "redis+cluster://user:s3cret@127.0.0.1:notaport",
    ],
)
def test_load_settings_error_hides_password(url):
    with pytest.raises(ConfigError) as caught:
        load_settings({"redis_url": url}, environ={})

    assert "s3cret" not in str(caught.value)
    assert "HASP_REDIS_URL" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "example"),
    [
        ("redis+sentinel://127.0.0.1:26379", "redis+sentinel://127.0.0.1:26379,"),
        ("redis+cluster://127.0.0.1:7000/5", "redis+cluster://127.0.0.1:7000,"),
        ("redis://127.0.0.1:notaport/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_load_settings_redis_url_error_shows_example(url, example):
    with pytest.raises(ConfigError) as caught:
        load_settings({"redis_url": url}, environ={})

    message = str(caught.value)
    assert message.startswith("HASP_REDIS_URL=")
    assert f"expected a URL such as {example}" in message


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://app:s3cret@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("rediss://app:s3cret@cache:6380/1", "rediss://app:***@cache:6380/1"),
        ("redis://app:s3cr%40et@cache/0", "redis://app:***@cache/0"),
        ("redis://app:s3cret@[::1]:6379/0", "redis://app:***@[::1]:6379/0"),
        ("redis://cache/0?password=s3cret", "redis://cache/0?password=***"),
        (
            "redis://cache/0?db=1&password=s3cret&ssl_cert_reqs=none",
            "redis://cache/0?db=1&password=***&ssl_cert_reqs=none",
        ),
        ("unix://:s3cret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://app@cache:6379/0", "redis://app@cache:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        (
            "redis+sentinel://:s3cret@h1:26379,h2:26379/mymaster/0",
            "redis+sentinel://:***@h1:26379,h2:26379/mymaster/0",
        ),
        (
            "redis+sentinel://app:s3cret@h1,h2/mymaster?sentinel_password=s3cret",
            "redis+sentinel://app:***@h1,h2/mymaster?sentinel_password=***",
        ),
        (
            "redis+sentinel://h1:26379/mymaster?sentinel_password=s3cret",
            "redis+sentinel://h1:26379/mymaster?sentinel_password=***",
        ),
        (
            "rediss+cluster://:s3cret@[::1]:7000,[::2]:7000",
            "rediss+cluster://:***@[::1]:7000,[::2]:7000",
        ),
        (
            "redis+cluster://app:s3cret@h1:7000,h2:7001,h3:7002",
            "redis+cluster://app:***@h1:7000,h2:7001,h3:7002",
        ),
        ("redis+cluster://h1:7000,h2:7001", "redis+cluster://h1:7000,h2:7001"),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:6379/0",
        "redis://app:s3cret@127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?password=s3cret",
        "redis+sentinel://:s3cret@h1:26379,h2:26379/mymaster/0",
        "redis+sentinel://h1:26379/mymaster/0?sentinel_password=s3cret",
        "redis+cluster://:s3cret@h1:7000,h2:7001",
    ],
)
def test_settings_repr_redacts_redis_password(url):
    settings = load_settings({"redis_url": url}, environ={})

    assert settings.redis_url == url
    for text in (repr(settings), str(settings), f"{[settings]}"):
        assert "s3cret" not in text
        assert "***" in text


def test_settings_repr_shows_every_field():
    text = repr(load_settings({}, environ={}))

    for item in dataclasses.fields(Settings):
        assert f"{item.name}=" in text
    assert "redis_url='redis://127.0.0.1:6379/0'" in text


def test_settings_is_frozen():
    settings = Settings()

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.redis_url = "redis://127.0.0.1:6380/0"  # type: ignore[misc]


# The configuration file, and its place below the environment and the flags.


def test_config_file_values_used(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text("check_budget_ms: 300\nlog_format: text\n")

    settings = load_settings({}, environ={"HASP_CONFIG_FILE": str(config)})

    assert settings.check_budget_ms == 300
    assert settings.log_format == "text"
    assert settings.config_file == config


def test_config_file_below_environment_and_flags(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text("check_budget_ms: 300\ncache_size: 5\nlog_level: DEBUG\n")
    environ = {"HASP_CONFIG_FILE": str(config), "HASP_CACHE_SIZE": "7"}

    settings = load_settings({"log_level": "ERROR"}, environ=environ)

    assert settings.check_budget_ms == 300
    assert settings.cache_size == 7
    assert settings.log_level == "ERROR"


def test_config_file_flag_wins_over_environment(tmp_path: Path):
    from_env = tmp_path / "env.yaml"
    from_env.write_text("cache_size: 1\n")
    from_flag = tmp_path / "flag.yaml"
    from_flag.write_text("cache_size: 2\n")

    settings = load_settings(
        {"config_file": str(from_flag)}, environ={"HASP_CONFIG_FILE": str(from_env)}
    )

    assert settings.cache_size == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cache_sise: 5\n", "unknown setting 'cache_sise'"),
        ("- 1\n", "must be a mapping"),
        ("cache_size: [1, 2]\n", "cache_size must be a single value"),
        ("config_file: other.yaml\n", "unknown setting 'config_file'"),
        ("cache_size: {\n", "not valid YAML"),
    ],
)
def test_config_file_errors(tmp_path: Path, text: str, message: str):
    config = tmp_path / "hasp.yaml"
    config.write_text(text)

    with pytest.raises(ConfigError, match=message):
        load_settings({}, environ={"HASP_CONFIG_FILE": str(config)})


def test_config_file_missing(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_settings({"config_file": str(tmp_path / "absent.yaml")}, environ={})


def test_config_file_value_validated(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text("check_budget_ms: -1\n")

    with pytest.raises(ConfigError, match="HASP_CHECK_BUDGET_MS=-1 is invalid"):
        load_settings({}, environ={"HASP_CONFIG_FILE": str(config)})


@pytest.mark.parametrize("value", ["off", "OFF"])
def test_metrics_listen_off(value: str):
    settings = load_settings({}, environ={"HASP_METRICS_LISTEN": value})

    assert settings.metrics_listen == "off"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HASP_METRICS_LISTEN", "9002"),
        ("HASP_METRICS_LISTEN", "127.0.0.1:0"),
        ("HASP_LOG_FORMAT", "xml"),
    ],
)
def test_operations_settings_rejected(variable: str, value: str):
    with pytest.raises(ConfigError, match=f"{variable}={value!r} is invalid"):
        load_settings({}, environ={variable: value})


def test_config_file_unquoted_off_explains_quoting(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text("metrics_listen: off\n")

    with pytest.raises(
        ConfigError, match='quote the value, for example metrics_listen: "off"'
    ):
        load_settings({}, environ={"HASP_CONFIG_FILE": str(config)})


def test_config_file_quoted_off(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text('metrics_listen: "off"\n')

    settings = load_settings({}, environ={"HASP_CONFIG_FILE": str(config)})

    assert settings.metrics_listen == "off"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://:ab/hunter2@127.0.0.1:6379/0", "hunter2"),
        ("redis://:ab?hunter2@127.0.0.1:6379/0", "hunter2"),
        ("redis://:ab#hunter2@127.0.0.1:6379/0", "hunter2"),
        ("redis://127.0.0.1:6379/0?PASSWORD=hunter2", "hunter2"),
        ("redis://127.0.0.1:6379/0?pass%77ord=hunter2", "hunter2"),
        ("redis://127.0.0.1:6379/0?password=hunt@er2", "hunt"),
        ("not a url with hunter2@host", "hunter2"),
    ],
)
def test_redact_url_hides_awkward_passwords(url: str, secret: str):
    assert secret not in redact_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?foo=bar",
        "redis://127.0.0.1:6379/0?socket_timout=1",
        "unix:///run/redis.sock?db=1&colour=red",
    ],
)
def test_load_settings_rejects_unknown_query_parameter(url: str):
    with pytest.raises(ConfigError, match="unknown query parameter"):
        load_settings({}, environ={"HASP_REDIS_URL": url})


def test_load_settings_error_hides_unencoded_password():
    url = "redis://:ab/hunter2@127.0.0.1:notaport/0"

    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ={"HASP_REDIS_URL": url})
    assert "hunter2" not in str(caught.value)
