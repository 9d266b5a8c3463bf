"""Operations features of a real ``hasp-authz serve`` process, over gRPC and HTTP.

Per-route policy from context_extensions, metrics, readiness, JSON deny lines
with their rate limit, and the SIGHUP route reload. tests/test_policy_e2e.py
and tests/test_ops_e2e.py check the same features through Envoy.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hasp_authz.dev.redis_server import free_port
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.routes import DEFAULT_ROUTES_FILE
from hasp_authz.tokens import generate_token
from test_servicer import (
    AuthzServer,
    check_request,
    deny_error,
    http_status,
    mark_complete,
    seed_key,
)

WAIT_SECONDS = 10.0


def with_policy(
    request: auth_pb2.CheckRequest, **extensions: str
) -> auth_pb2.CheckRequest:
    """Add context_extensions, as Envoy does for a route's per-route config."""
    request.attributes.context_extensions.update(extensions)
    return request


def ok_headers(response: auth_pb2.CheckResponse) -> dict[str, str]:
    return {
        option.header.key: option.header.value
        for option in response.ok_response.headers
    }


def fetch(server: AuthzServer, path: str) -> tuple[int, str]:
    """GET a path of the server's operations HTTP port; return status and body."""
    url = f"http://127.0.0.1:{server.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(server: AuthzServer, name: str, **labels: str) -> float:
    """Return one sample's value from /metrics, or 0.0 when it is absent."""
    status, text = fetch(server, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and all(
                item.labels.get(label) == value for label, value in labels.items()
            ):
                return item.value
    return 0.0


def wait_for(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {description}")
        time.sleep(0.05)


def json_lines(server: AuthzServer) -> list[dict]:
    """Parse the server's log, written with --log-format json."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


@pytest.fixture
def ready_copy(redis_client, layout) -> None:
    mark_complete(redis_client, layout)


# Per-route policy.


def test_public_route_allows_without_key(start_server, ready_copy) -> None:
    server = start_server()
    request = with_policy(
        check_request(
            "GET",
            "/v1/status",
            [("authorization", "Bearer nonsense"), ("x-hasp-org-id", "org_forged")],
        ),
        hasp_public="true",
    )

    response = server.check(request)

    assert http_status(response) == 200
    assert ok_headers(response) == {}
    removed = set(response.ok_response.headers_to_remove)
    assert {"authorization", "x-hasp-org-id"} <= removed
    assert response.dynamic_metadata.fields["policy"].string_value == "public"
    assert (
        sample(server, "hasp_authz_decisions_total", code="ALLOW", route="public")
        == 1.0
    )


def test_public_route_needs_no_redis(start_server) -> None:
    server = start_server(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    request = with_policy(check_request("GET", "/v1/status"), hasp_public="true")

    assert http_status(server.check(request)) == 200
    # A keyed route on the same server fails closed.
    assert http_status(server.check(check_request())) == 401
    keyed = check_request(headers=[("authorization", f"Bearer {generate_token()}")])
    assert http_status(server.check(keyed)) == 503


def test_route_scope_replaces_table_scope(
    start_server, redis_client, layout, ready_copy
) -> None:
    server = start_server()
    documents_key = seed_key(redis_client, layout, scopes=("ai:documents",))
    chat_key = seed_key(redis_client, layout, scopes=("ai:chat",))

    allowed = server.check(
        with_policy(
            check_request(headers=[documents_key.authorization]),
            hasp_scope="ai:documents",
        )
    )
    denied = server.check(
        with_policy(
            check_request(headers=[chat_key.authorization]),
            hasp_scope="ai:documents",
        )
    )

    assert http_status(allowed) == 200
    assert http_status(denied) == 403
    assert "'ai:documents'" in deny_error(denied)["message"]


def test_route_scope_keeps_table_match(
    start_server, redis_client, layout, ready_copy
) -> None:
    server = start_server()
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    unknown_path = with_policy(
        check_request(path="/v1/nowhere", headers=[key.authorization]),
        hasp_scope="ai:chat",
    )
    wrong_method = with_policy(
        check_request("GET", headers=[key.authorization]), hasp_scope="ai:chat"
    )

    assert http_status(server.check(unknown_path)) == 404
    assert http_status(server.check(wrong_method)) == 405


def test_shadow_route_allows_and_counts_deny(start_server, ready_copy) -> None:
    server = start_server(extra_args=["--log-format", "json"])
    request = with_policy(check_request(), hasp_shadow="true")

    response = server.check(request)

    assert http_status(response) == 200
    assert ok_headers(response) == {}
    assert "authorization" in response.ok_response.headers_to_remove
    assert response.dynamic_metadata.fields["policy"].string_value == "shadow"
    # The key fails before the route is matched; the count names the route.
    shadow = sample(
        server,
        "hasp_authz_shadow_denials_total",
        code="INVALID_API_KEY",
        route="/v1/ai/chat",
    )
    assert shadow == 1.0
    lines = [line for line in json_lines(server) if line.get("event") == "would_deny"]
    assert len(lines) == 1
    assert lines[0]["code"] == "INVALID_API_KEY"
    assert lines[0]["route"] == "/v1/ai/chat"


def test_shadow_route_sends_identity_on_allow(
    start_server, redis_client, layout, ready_copy
) -> None:
    server = start_server()
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    request = with_policy(
        check_request(headers=[key.authorization]), hasp_shadow="true"
    )

    response = server.check(request)

    assert http_status(response) == 200
    assert ok_headers(response)["x-hasp-key-id"] == key.record.key_id
    assert sample(server, "hasp_authz_shadow_denials_total") == 0.0


@pytest.mark.parametrize(
    "extensions",
    [
        {"hasp_public": "yes"},
        {"hasp_scope": "ai:everything"},
        {"hasp_public": "true", "hasp_scope": "ai:chat"},
        {"hasp_sope": "ai:chat"},
    ],
)
def test_invalid_route_policy_is_503(
    start_server, ready_copy, extensions: dict[str, str]
) -> None:
    server = start_server(extra_args=["--log-format", "json"])

    response = server.check(with_policy(check_request(), **extensions))

    assert http_status(response) == 503
    assert deny_error(response)["code"] == "AUTH_UNAVAILABLE"
    denies = [line for line in json_lines(server) if line.get("event") == "deny"]
    assert len(denies) == 1
    assert denies[0]["reason"].startswith("invalid Envoy route policy")


def test_other_filters_extensions_are_ignored(start_server, ready_copy) -> None:
    server = start_server()
    request = with_policy(check_request(), team="payments", public="true")

    assert http_status(server.check(request)) == 401


# Metrics.


def test_metrics_count_decisions_and_cache(
    start_server, redis_client, layout, ready_copy
) -> None:
    server = start_server()
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    wait_for(lambda: fetch(server, "/readyz")[0] == 200, "readiness")

    for _ in range(3):
        assert http_status(server.check(check_request(headers=[key.authorization])))
    assert http_status(server.check(check_request())) == 401

    allowed = sample(
        server, "hasp_authz_decisions_total", code="ALLOW", route="/v1/ai/chat"
    )
    assert allowed == 3.0
    denied = sample(
        server, "hasp_authz_decisions_total", code="INVALID_API_KEY", route="none"
    )
    assert denied == 1.0
    assert sample(server, "hasp_authz_cache_lookups_total", result="miss") == 1.0
    assert sample(server, "hasp_authz_cache_lookups_total", result="hit") == 2.0
    assert sample(server, "hasp_authz_check_duration_seconds_count") == 4.0
    assert sample(server, "hasp_authz_build_info") == 1.0


def test_metrics_count_redis_errors(start_server, private_redis, private_client):
    server = start_server(redis_url=private_redis.url)
    request = check_request(headers=[("authorization", f"Bearer {generate_token()}")])
    private_redis.stop()

    assert http_status(server.check(request)) == 503
    assert sample(server, "hasp_authz_redis_errors_total") == 1.0


def test_healthz_and_unknown_path(start_server) -> None:
    server = start_server()

    assert fetch(server, "/healthz") == (200, "ok\n")
    assert fetch(server, "/nothing")[0] == 404


# Readiness.


def test_readiness_follows_marker(start_server, redis_client, layout) -> None:
    server = start_server()
    wait_for(lambda: fetch(server, "/readyz")[0] == 503, "not ready without marker")
    assert "completeness marker" in fetch(server, "/readyz")[1]

    mark_complete(redis_client, layout)
    wait_for(lambda: fetch(server, "/readyz")[0] == 200, "ready with the marker")


def test_readiness_drops_while_redis_stopped(
    start_server, private_redis, private_client
) -> None:
    server = start_server(redis_url=private_redis.url)
    mark_complete(private_client, server_layout(server))
    wait_for(lambda: fetch(server, "/readyz")[0] == 200, "ready")

    private_redis.stop()
    wait_for(lambda: fetch(server, "/readyz")[0] == 503, "not ready without Redis")
    assert fetch(server, "/healthz")[0] == 200

    private_redis.start()
    # The restarted Redis is empty: the marker must come back too.
    mark_complete(private_client, server_layout(server))
    wait_for(lambda: fetch(server, "/readyz")[0] == 200, "ready again")


def server_layout(server: AuthzServer):
    from hasp_authz.records import RedisLayout

    command = server.process.args
    return RedisLayout(command[command.index("--redis-prefix") + 1])


# Logs.


def test_deny_log_line_is_json(start_server, redis_client, layout, ready_copy) -> None:
    server = start_server(extra_args=["--log-format", "json"])
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    request = check_request(
        "POST", "/v1/usage", [key.authorization], request_id="abc-123"
    )

    response = server.check(request)

    assert http_status(response) == 405
    denies = [line for line in json_lines(server) if line.get("event") == "deny"]
    assert len(denies) == 1
    line = denies[0]
    assert line["level"] == "INFO"
    assert line["logger"] == "hasp_authz.decisions"
    assert line["code"] == "METHOD_NOT_ALLOWED"
    assert line["request_id"] == deny_error(response)["request_id"]
    assert line["key_id"] == key.record.key_id
    assert line["org_id"] == key.record.org_id
    assert line["route"] == "/v1/usage"
    assert key.token not in server.log()


def test_start_line_has_redacted_settings(start_server) -> None:
    server = start_server(
        redis_url=f"redis://:hunter2secret@127.0.0.1:{free_port()}/0",
        extra_args=["--log-format", "json"],
    )

    started = [line for line in json_lines(server) if line.get("event") == "started"]
    assert len(started) == 1
    assert started[0]["settings"]["log_format"] == "json"
    assert "***" in started[0]["settings"]["redis_url"]
    assert "hunter2secret" not in server.log()


def test_deny_lines_rate_limited(start_server, ready_copy) -> None:
    server = start_server(extra_args=["--log-format", "json"])
    request = check_request()

    for _ in range(60):
        assert http_status(server.check(request)) == 401
    time.sleep(1.1)
    assert http_status(server.check(request)) == 401

    lines = json_lines(server)
    denies = [line for line in lines if line.get("event") == "deny"]
    suppressed = [
        line["suppressed"]
        for line in lines
        if line.get("event") == "deny_lines_suppressed"
    ]
    # The bucket refills while the burst runs, so a slow machine may log a
    # few more lines and report the suppressed ones in more than one count.
    assert len(denies) < 60
    assert suppressed
    # Every deny is either a line or part of a suppressed count.
    assert len(denies) + sum(suppressed) == 61
    assert (
        sample(
            server, "hasp_authz_decisions_total", code="INVALID_API_KEY", route="none"
        )
        == 61.0
    )


# Route reload on SIGHUP.


def test_sighup_reloads_route_file(
    start_server, redis_client, layout, ready_copy, tmp_path
) -> None:
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(DEFAULT_ROUTES_FILE.read_text())
    server = start_server(extra_args=["--routes-file", str(routes_file)])
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    request = check_request(path="/v1/ai/chat/stream", headers=[key.authorization])
    assert http_status(server.check(request)) == 404

    routes_file.write_text(
        DEFAULT_ROUTES_FILE.read_text()
        + "  - path: /v1/ai/chat/stream\n    methods: [POST]\n    scope: ai:chat\n"
    )
    server.process.send_signal(signal.SIGHUP)

    wait_for(lambda: http_status(server.check(request)) == 200, "the new route")
    assert sample(server, "hasp_authz_route_reloads_total", result="applied") == 1.0


def test_sighup_rejects_bad_file(
    start_server, redis_client, layout, ready_copy, tmp_path
) -> None:
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(DEFAULT_ROUTES_FILE.read_text())
    server = start_server(extra_args=["--routes-file", str(routes_file)])
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    request = check_request(headers=[key.authorization])

    routes_file.write_text("routes:\n  - path: /v1/ai/chat\n    scope: ai:nothing\n")
    server.process.send_signal(signal.SIGHUP)

    wait_for(
        lambda: (
            sample(server, "hasp_authz_route_reloads_total", result="rejected") == 1.0
        ),
        "the rejected reload",
    )
    assert "route file reload rejected" in server.log()
    assert http_status(server.check(request)) == 200
    assert server.process.poll() is None


def test_metrics_listen_off(start_server) -> None:
    server = start_server(extra_args=["--metrics-listen", "off"])

    with pytest.raises(urllib.error.URLError):
        fetch(server, "/healthz")
