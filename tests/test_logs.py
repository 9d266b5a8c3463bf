"""Unit tests of the log formats and the rate-limited deny lines."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from hasp_authz.config import Settings
from hasp_authz.logs import (
    DenyLog,
    build_formatter,
    configuration_fields,
    configure_logging,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter("json"))
    logger = logging.getLogger(f"hasp_authz.test.{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_standard_and_extra_fields(captured):
    logger, stream = captured
    logger.warning("stopping in %d s", 5, extra={"request_id": "req_1"})
    [line] = lines(stream)
    assert line["message"] == "stopping in 5 s"
    assert line["level"] == "WARNING"
    assert line["logger"] == logger.name
    assert line["request_id"] == "req_1"
    assert "time" in line


def test_json_line_carries_exception(captured):
    logger, stream = captured
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("check failed")
    [line] = lines(stream)
    assert "RuntimeError: boom" in line["exc_info"]


def test_configure_logging_text_format():
    stream = io.StringIO()
    configure_logging("INFO", "text", stream)
    try:
        logging.getLogger("hasp_authz.test").info("hello %s", "there")
    finally:
        configure_logging("WARNING", "text")
    assert stream.getvalue().rstrip().endswith("INFO hasp_authz.test hello there")


def test_configure_logging_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("INFO", "xml")


def test_configuration_fields_redact_password():
    settings = Settings(redis_url="redis://user:s3cret@127.0.0.1:6379/0")
    fields = configuration_fields(settings)
    assert fields["redis_url"] == "redis://user:***@127.0.0.1:6379/0"
    assert "s3cret" not in json.dumps(fields)
    assert isinstance(fields["routes_file"], str)


def test_configuration_fields_of_any_dataclass():
    @dataclass
    class Example:
        keystore_url: str
        path: Path

    fields = configuration_fields(Example("postgresql://u:pw@127.0.0.1/db", Path("/x")))
    assert fields == {"keystore_url": "postgresql://u:***@127.0.0.1/db", "path": "/x"}


def test_deny_line_names_ids_and_code(captured):
    logger, stream = captured
    deny_log = DenyLog(logger, clock=FakeClock())
    deny_log.deny(
        "MISSING_SCOPE",
        request_id="req_1",
        key_id="key_a",
        org_id="org_b",
        route="/v1/ai/chat",
    )
    [line] = lines(stream)
    assert line["event"] == "deny"
    assert line["code"] == "MISSING_SCOPE"
    assert line["request_id"] == "req_1"
    assert line["key_id"] == "key_a"
    assert line["org_id"] == "org_b"
    assert line["route"] == "/v1/ai/chat"
    assert line["message"].startswith("deny code=MISSING_SCOPE request_id=req_1")


def test_deny_line_without_key_uses_dash(captured):
    logger, stream = captured
    DenyLog(logger, clock=FakeClock()).deny(
        "INVALID_API_KEY", request_id="req_2", key_id=None, org_id=None, route=None
    )
    [line] = lines(stream)
    assert line["key_id"] == "-"
    assert line["route"] == "-"


def test_deny_flood_is_limited_then_summarized(captured):
    logger, stream = captured
    clock = FakeClock()
    deny_log = DenyLog(logger, rate=5, clock=clock)
    logged = [
        deny_log.deny("INVALID_API_KEY", request_id=f"req_{n}", key_id=None,
                      org_id=None, route=None)
        for n in range(100)
    ]  # fmt: skip
    assert sum(logged) == 5
    assert deny_log.suppressed == {"INVALID_API_KEY": 95}

    clock.now += 1.0
    assert deny_log.deny(
        "INVALID_API_KEY", request_id="req_x", key_id=None, org_id=None, route=None
    )
    summary = lines(stream)[-2]
    assert summary["event"] == "deny_lines_suppressed"
    assert summary["suppressed"] == 95
    assert summary["message"].startswith(
        "suppressed 95 deny lines code=INVALID_API_KEY"
    )
    assert deny_log.suppressed == {}


def test_deny_flood_of_one_code_leaves_others_logged(captured):
    logger, _ = captured
    deny_log = DenyLog(logger, rate=2, clock=FakeClock())
    for n in range(10):
        deny_log.deny("INVALID_API_KEY", request_id=f"req_{n}", key_id=None,
                      org_id=None, route=None)  # fmt: skip
    assert deny_log.deny(
        "BAA_REQUIRED", request_id="req_b", key_id="key_a", org_id="org_b", route=None
    )


def test_shadow_line_says_would_deny(captured):
    logger, stream = captured
    DenyLog(logger, clock=FakeClock()).deny(
        "MISSING_SCOPE", request_id="req_3", key_id="key_a", org_id="org_b",
        route="/v1/ai/chat", verb="would deny",
    )  # fmt: skip
    [line] = lines(stream)
    assert line["event"] == "would_deny"
    assert line["message"].startswith("would deny code=MISSING_SCOPE")
