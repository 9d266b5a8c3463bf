"""The ``hasp-authz check-config`` command, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONSOLE_SCRIPT = Path(sys.executable).with_name("hasp-authz")


def check_config(*arguments: str, env: dict[str, str] | None = None):
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("HASP_")
    }
    return subprocess.run(
        [str(CONSOLE_SCRIPT), "check-config", *arguments],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_prints_settings_and_routes():
    result = check_config()

    assert result.returncode == 0, result.stderr
    assert "HASP_LISTEN=127.0.0.1:9001" in result.stdout
    assert "HASP_METRICS_LISTEN=127.0.0.1:9002" in result.stdout
    assert "/v1/ai/chat" in result.stdout
    assert result.stdout.rstrip().endswith("configuration OK")


def test_check_config_redacts_password():
    result = check_config("--redis-url", "redis://:hunter2secret@127.0.0.1:6390/0")

    assert result.returncode == 0, result.stderr
    assert "hunter2secret" not in result.stdout
    assert "HASP_REDIS_URL=redis://:***@127.0.0.1:6390/0" in result.stdout


def test_check_config_reads_config_file(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text("check_budget_ms: 300\n")

    result = check_config("--config", str(config))

    assert result.returncode == 0, result.stderr
    assert "HASP_CHECK_BUDGET_MS=300" in result.stdout
    assert f"HASP_CONFIG_FILE={config}" in result.stdout


def test_check_config_rejects_bad_setting():
    result = check_config(env={"HASP_CHECK_BUDGET_MS": "fast"})

    assert result.returncode == 2
    assert "HASP_CHECK_BUDGET_MS='fast' is invalid" in result.stderr
    assert result.stdout == ""


def test_check_config_rejects_bad_route_file(tmp_path: Path):
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  - path: /v1/x\n    methods: [GET]\n    scope: ai:x\n")

    result = check_config("--routes-file", str(routes))

    assert result.returncode == 2
    assert "ai:x" in result.stderr


def test_serve_rejects_bad_config_file(tmp_path: Path):
    config = tmp_path / "hasp.yaml"
    config.write_text("cache_sise: 5\n")

    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "unknown setting 'cache_sise'" in result.stderr
