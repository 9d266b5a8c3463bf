"""End to end: what an operator sees of a running hasp-authz.

The stack (hasp_authz.dev.stack) runs the real Envoy, hasp-authz, a
redis-server of this module's own and the demo upstream. The tests read
hasp-authz's ops server (/metrics, /healthz, /readyz), its JSON log lines on
stderr, and its handling of SIGHUP, which reloads the route file. The route
file is a copy in the module's temporary folder, so the tests can rewrite it.

Everything that changes in the background (a metric, a log line, readiness,
which the server probes once a second) is polled up to DEADLINE_SECONDS.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from hasp_authz.records import RedisLayout
from hasp_authz.routes import DEFAULT_ROUTES_FILE
from hasp_authz.tokens import generate_token
from test_e2e import Stack, assert_deny
from test_policy_e2e import (
    log_entries,
    ops_get,
    sample,
    sample_sum,
    scrape,
    start_stack,
    stop_stack,
    wait_until,
)

pytestmark = pytest.mark.e2e

DECISIONS = "hasp_authz_decisions_total"
RELOADS = "hasp_authz_route_reloads_total"
# A route that the default table lacks, added by the reload tests.
NEW_ROUTE = """
  - path: /v1/reports
    methods: [GET]
    scope: control:read
"""


@pytest.fixture(scope="module")
def routes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routes") / "routes.yaml"
    path.write_text(DEFAULT_ROUTES_FILE.read_text())
    return path


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, routes_file: Path
) -> Iterator[Stack]:
    started = start_stack(
        tmp_path_factory.mktemp("ops-stack"),
        authz_env={"HASP_ROUTES_FILE": str(routes_file), "HASP_LOG_FORMAT": "json"},
    )
    try:
        yield started
    finally:
        stop_stack(started)


def ops_status(stack: Stack, path: str) -> int | None:
    result = ops_get(stack.local, path)
    return None if result is None else result[0]


def wait_for_ready(stack: Stack, expected: int) -> str:
    """Poll /readyz until its status is ``expected``, and return the body."""

    def body_if_expected() -> str | None:
        result = ops_get(stack.local, "/readyz")
        if result is None or result[0] != expected:
            return None
        return result[1]

    return wait_until(body_if_expected, f"/readyz returns {expected}")


def chat_allowed(stack: Stack) -> bool:
    response = stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"])
    return response.status == 200


# --- /healthz and /readyz ---


def test_healthz_returns_200(stack: Stack) -> None:
    status, body = wait_until(
        lambda: ops_get(stack.local, "/healthz"), "/healthz answers"
    )
    assert status == 200
    assert body.strip() == "ok"


def test_readyz_returns_200_when_ready(stack: Stack) -> None:
    body = wait_for_ready(stack, 200)
    assert body.strip() == "ready"


def test_readyz_503_without_marker_until_sync(stack: Stack) -> None:
    local = stack.local
    wait_for_ready(stack, 200)
    client = redis.Redis.from_url(local.redis_url)
    try:
        client.delete(RedisLayout(local.redis_prefix).complete_marker)
        body = wait_for_ready(stack, 503)
        assert "marker" in body
        # The Check path agrees: a keyed request gets 503, not 401.
        response = stack.request("POST", "/v1/ai/chat", token=generate_token())
        assert_deny(response, 503, "AUTH_UNAVAILABLE", "service_unavailable")
    finally:
        local.hasp_keys("sync")
        client.close()
    wait_for_ready(stack, 200)


def test_readyz_503_while_redis_stopped(stack: Stack) -> None:
    local = stack.local
    wait_for_ready(stack, 200)
    local.stop_redis()
    try:
        body = wait_for_ready(stack, 503)
        assert "Redis" in body
        # /healthz reports the process, not its dependencies.
        assert ops_status(stack, "/healthz") == 200
    finally:
        local.start_redis()
    # The restarted Redis is empty, so readiness waits for a full sync.
    local.hasp_keys("sync")
    wait_for_ready(stack, 200)
    wait_until(lambda: chat_allowed(stack), "keyed requests allowed again")


# --- /metrics ---


def test_metrics_count_decisions_by_code_and_route(stack: Stack) -> None:
    before = scrape(stack.local)
    requests = [
        ("POST", "/v1/ai/chat", "chat", 200),
        ("POST", "/v1/ai/chat", "chat", 200),
        ("GET", "/v1/usage", "read", 200),
        ("GET", "/v1/usage", "chat", 403),
        ("GET", "/v1/ai/chat", "chat", 405),
        ("GET", "/v1/nowhere", "chat", 404),
        ("POST", "/v1/ai/chat", "nobaa", 402),
        ("POST", "/v1/ai/chat", None, 401),
    ]
    for method, path, key, status in requests:
        token = stack.keys[key] if key else None
        assert stack.request(method, path, token=token).status == status

    expected = [
        ({"code": "ALLOW", "route": "/v1/ai/chat"}, 2),
        ({"code": "ALLOW", "route": "/v1/usage"}, 1),
        ({"code": "MISSING_SCOPE", "route": "/v1/usage"}, 1),
        ({"code": "METHOD_NOT_ALLOWED", "route": "/v1/ai/chat"}, 1),
        ({"code": "NOT_FOUND", "route": "none"}, 1),
        ({"code": "BAA_REQUIRED", "route": "none"}, 1),
        ({"code": "INVALID_API_KEY", "route": "none"}, 1),
    ]

    def delta(samples, name: str, **labels: str) -> float:
        return sample(samples, name, **labels) - sample(before, name, **labels)

    def total_delta() -> float:
        after = scrape(stack.local)
        return sample_sum(after, DECISIONS) - sample_sum(before, DECISIONS)

    wait_until(lambda: total_delta() >= len(requests), "every decision counted")
    after = scrape(stack.local)
    for labels, count in expected:
        assert delta(after, DECISIONS, **labels) == count, labels
    assert total_delta() == len(requests)
    checks = delta(after, "hasp_authz_check_duration_seconds_count")
    assert checks == len(requests)


def test_metrics_expose_every_family(stack: Stack) -> None:
    samples = scrape(stack.local)
    names = {name for name, _ in samples}
    for name in [
        "hasp_authz_check_duration_seconds_bucket",
        "hasp_authz_check_duration_seconds_sum",
        "hasp_authz_redis_errors_total",
        "hasp_authz_change_lag_seconds_count",
        "hasp_authz_newest_change_age_seconds",
        "hasp_authz_build_info",
    ]:
        assert name in names, name
    for result in ("hit", "miss", "negative_hit", "bypass"):
        assert ("hasp_authz_cache_lookups_total", frozenset({("result", result)})) in (
            samples
        ), result
    [build] = [labels for name, labels in samples if name == "hasp_authz_build_info"]
    assert dict(build)["version"]


def test_metrics_count_redis_errors(stack: Stack) -> None:
    local = stack.local
    before = scrape(local)
    local.stop_redis()
    try:
        response = stack.request("POST", "/v1/ai/chat", token=generate_token())
        assert_deny(response, 503, "AUTH_UNAVAILABLE", "service_unavailable")
    finally:
        local.start_redis()
        local.hasp_keys("sync")
    errors = "hasp_authz_redis_errors_total"
    wait_until(
        lambda: sample(scrape(local), errors) > sample(before, errors),
        "the Redis error is counted",
    )
    wait_until(lambda: chat_allowed(stack), "keyed requests allowed again")


def test_metrics_count_cache_hits(stack: Stack) -> None:
    # The first Check of a key may read Redis. Later Checks of it are served
    # from the cache once the change subscription is up.
    wait_until(lambda: chat_allowed(stack), "keyed requests allowed")
    before = scrape(stack.local)
    hits = "hasp_authz_cache_lookups_total"

    def hit_counted() -> bool:
        assert chat_allowed(stack)
        return sample(scrape(stack.local), hits, result="hit") > sample(
            before, hits, result="hit"
        )

    wait_until(hit_counted, "a cache hit is counted")


# --- deny log lines ---


DENY_CASES = {
    # name: (method, path, key, status, code, route)
    "no-key": ("POST", "/v1/ai/chat", None, 401, "INVALID_API_KEY", "-"),
    "unknown-key": ("POST", "/v1/ai/chat", "unknown", 401, "INVALID_API_KEY", "-"),
    "no-baa": ("POST", "/v1/ai/chat", "nobaa", 402, "BAA_REQUIRED", "-"),
    "no-route": ("GET", "/v1/nowhere", "chat", 404, "NOT_FOUND", "-"),
    "wrong-method": (
        "GET", "/v1/ai/chat", "chat", 405, "METHOD_NOT_ALLOWED", "/v1/ai/chat",
    ),
    "missing-scope": ("GET", "/v1/usage", "chat", 403, "MISSING_SCOPE", "/v1/usage"),
}  # fmt: skip
# Keys of the module's stack that the deny cases use, and their orgs.
KEYED = {"chat": "acme", "nobaa": "nobaa"}


@pytest.mark.parametrize("case", DENY_CASES)
def test_deny_logged_as_one_json_line(stack: Stack, case: str) -> None:
    method, path, key, status, code, route = DENY_CASES[case]
    if key is None:
        token = None
    elif key == "unknown":
        token = generate_token()
    else:
        token = stack.keys[key]

    response = stack.request(method, path, token=token)

    assert response.status == status
    request_id = response.json()["error"]["request_id"]
    lines = wait_until(
        lambda: log_entries(stack.local, event="deny", request_id=request_id),
        "a deny log line with the error body's request_id",
    )
    assert len(lines) == 1, lines
    [line] = lines
    assert line["code"] == code
    assert line["route"] == route
    assert line["level"] == "INFO"
    assert line["logger"]
    assert line["time"]
    assert request_id in line["message"]
    if key in KEYED:
        assert line["key_id"] == stack.key_ids[key]
        assert line["org_id"] == KEYED[key]
    else:
        assert line["key_id"] == "-"
        assert line["org_id"] == "-"


def test_log_never_contains_tokens(stack: Stack) -> None:
    unknown = generate_token()
    sent = [*stack.keys.values(), unknown]
    for token in sent:
        stack.request("POST", "/v1/ai/chat", token=token)
        stack.request("GET", "/v1/usage", token=token)
    stack.request("POST", "/v1/ai/chat", [("Authorization", f"Basic {unknown}")])
    last = stack.request("POST", "/v1/ai/chat", [("Authorization", unknown)])
    request_id = last.json()["error"]["request_id"]
    wait_until(
        lambda: log_entries(stack.local, request_id=request_id),
        "the last request's deny line",
    )

    text = "\n".join(stack.local.authz_log_lines())
    for token in sent:
        assert token not in text
        # The random part alone, in case a prefix was cut off.
        assert token.removeprefix("hasp_key_live_") not in text
        assert hashlib.sha256(token.encode()).hexdigest() not in text


def test_every_log_line_is_json(stack: Stack) -> None:
    lines = [line for line in stack.local.authz_log_lines() if line.strip()]
    assert lines
    entries = stack.local.authz_log_entries()
    assert len(entries) == len(lines), [
        line for line in lines if not line.startswith("{")
    ][:5]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry


# --- SIGHUP reloads the route file ---


def reload_routes(stack: Stack, routes_file: Path, text: str, event: str) -> dict:
    """Write ``text`` to the route file, send SIGHUP and wait for ``event``."""
    seen = len(log_entries(stack.local, event=event))
    routes_file.write_text(text)
    stack.local.signal_authz(signal.SIGHUP)
    entries = wait_until(
        lambda: log_entries(stack.local, event=event)[seen:],
        f"a {event} log line",
    )
    assert stack.local.exited_process() is None
    return entries[-1]


def reports_status(stack: Stack) -> int:
    response = stack.request("GET", "/v1/reports", token=stack.keys["read"])
    return response.status


def test_sighup_applies_new_route_table(stack: Stack, routes_file: Path) -> None:
    original = DEFAULT_ROUTES_FILE.read_text()
    routes_file.write_text(original)
    assert reports_status(stack) == 404
    before = scrape(stack.local)
    try:
        line = reload_routes(
            stack, routes_file, original + NEW_ROUTE, "routes_reloaded"
        )
        assert line["level"] == "INFO"
        wait_until(lambda: reports_status(stack) == 200, "the new route is served")
        after = scrape(stack.local)
        assert sample(after, RELOADS, result="applied") == (
            sample(before, RELOADS, result="applied") + 1
        )
        assert sample(after, RELOADS, result="rejected") == sample(
            before, RELOADS, result="rejected"
        )
    finally:
        reload_routes(stack, routes_file, original, "routes_reloaded")
    assert reports_status(stack) == 404


@pytest.mark.parametrize(
    "broken",
    [
        "routes: [",
        "routes:\n  - path: /v1/x\n    methods: [GET]\n    scope: no:such\n",
        "routes:\n  - path: /v1/ai/chat\n    methods: [POST]\n    scope: ai:chat\n"
        "  - path: /v1/ai/chat\n    methods: [POST]\n    scope: ai:chat\n",
        "",
    ],
    ids=["invalid-yaml", "unknown-scope", "duplicate-route", "empty-file"],
)
def test_sighup_rejects_broken_route_file(
    stack: Stack, routes_file: Path, broken: str
) -> None:
    original = DEFAULT_ROUTES_FILE.read_text()
    reload_routes(stack, routes_file, original + NEW_ROUTE, "routes_reloaded")
    wait_until(lambda: reports_status(stack) == 200, "the new route is served")
    before = scrape(stack.local)
    try:
        line = reload_routes(stack, routes_file, broken, "routes_reload_rejected")
        assert line["level"] == "ERROR"
        # The table in use before the broken file stays in use.
        assert reports_status(stack) == 200
        assert chat_allowed(stack)
        response = stack.request("GET", "/v1/usage", token=stack.keys["chat"])
        assert_deny(response, 403, "MISSING_SCOPE", "forbidden")
        after = scrape(stack.local)
        assert sample(after, RELOADS, result="rejected") == (
            sample(before, RELOADS, result="rejected") + 1
        )
        assert sample(after, RELOADS, result="applied") == sample(
            before, RELOADS, result="applied"
        )
    finally:
        reload_routes(stack, routes_file, original, "routes_reloaded")
