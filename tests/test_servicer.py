"""Integration tests for the Check RPC against a real ``hasp-authz serve`` process.

Each test starts the console script on a free port, pointed at the test Redis
under the test's own key prefix, seeds records there and calls Check over a real
gRPC channel. Requests carry headers either as ``header_map`` raw values (what
Envoy sends with ``encode_raw_headers``) or in the legacy ``headers`` map, where
Envoy joins repeated headers with commas.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hasp_authz.dev.redis_server import RedisServer, free_port
from hasp_authz.proto import envoy_config_core_v3_pb2 as core_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout, key_changed_message
from hasp_authz.tokens import generate_token, hash_token

CONSOLE_SCRIPT = Path(sys.executable).with_name("hasp-authz")
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0
RPC_TIMEOUT_SECONDS = 5.0
GENERATED_ID_RE = re.compile(r"req_[0-9a-f]{32}")
OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14


class AuthzServer:
    """One ``hasp-authz serve`` subprocess and a gRPC channel to it."""

    def __init__(
        self,
        command: list[str],
        port: int,
        log_path: Path,
        metrics_port: int | None = None,
    ):
        self.address = f"127.0.0.1:{port}"
        # Port of /metrics, /healthz and /readyz, when the command set one.
        self.metrics_port = metrics_port
        self.log_path = log_path
        self._log_file = log_path.open("wb")
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("HASP_")
        }
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        # Short reconnect backoff: the first health probes are refused while the
        # process starts, and gRPC's default 1 s backoff would add to every test.
        self.channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 50),
                ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 200),
            ],
        )
        self.authorization = auth_grpc.AuthorizationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"hasp-authz exited with code {self.process.returncode} at "
                    f"start-up; log:\n{self.log()}"
                )
            if self.health_status("") == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"hasp-authz on {self.address} was not SERVING within "
            f"{START_TIMEOUT_SECONDS} s; log:\n{self.log()}"
        )

    def health_status(self, service: str) -> int | None:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            return self.health.Check(request, timeout=1.0).status
        except grpc.RpcError:
            return None

    def check(self, request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
        return self.authorization.Check(request, timeout=RPC_TIMEOUT_SECONDS)

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._log_file.close()


def launch_server(
    log_dir: Path, redis_url: str, prefix: str, extra_args: Sequence[str] = ()
) -> AuthzServer:
    """Start ``hasp-authz serve`` on free ports. The caller must close it.

    The log is in text format unless ``extra_args`` sets another.
    """
    port = free_port()
    metrics_port = free_port()
    command = [
        str(CONSOLE_SCRIPT), "serve",
        "--listen", f"127.0.0.1:{port}",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--redis-url", redis_url,
        "--redis-prefix", prefix,
        "--log-level", "DEBUG",
        "--log-format", "text",
        *extra_args,
    ]  # fmt: skip
    return AuthzServer(command, port, log_dir / f"hasp-authz-{port}.log", metrics_port)


def wait_for_log(server: AuthzServer, text: str, within: float = 10.0) -> None:
    """Wait until the server's log contains ``text``; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while text not in server.log():
        if time.monotonic() > deadline:
            pytest.fail(f"{server.address} never logged {text!r}:\n{server.log()}")
        time.sleep(0.02)


@pytest.fixture
def server(start_server: Callable[..., AuthzServer]) -> AuthzServer:
    return start_server()


@pytest.fixture(params=["header_map", "headers"])
def encoding(request: pytest.FixtureRequest) -> str:
    """How the CheckRequest carries headers: raw header_map or the headers map."""
    return request.param


@dataclass(frozen=True)
class SeededKey:
    token: str
    record: KeyRecord

    @property
    def authorization(self) -> tuple[str, str]:
        return ("authorization", f"Bearer {self.token}")


def seed_key(
    client: redis.Redis,
    layout: RedisLayout,
    *,
    scopes: Sequence[str] = ("ai:chat",),
    baa_active: bool = True,
    expires_at: float | None = None,
) -> SeededKey:
    """Write a new key and its org to the copy and return the key's token."""
    token = generate_token()
    suffix = uuid.uuid4().hex[:8]
    record = KeyRecord(f"key_{suffix}", f"org_{suffix}", tuple(scopes), expires_at)
    client.set(layout.key(hash_token(token)), record.to_json())
    org = OrgRecord(record.org_id, baa_active=baa_active)
    client.set(layout.org(record.org_id), org.to_json())
    return SeededKey(token, record)


def mark_complete(client: redis.Redis, layout: RedisLayout) -> None:
    """Write the completeness marker the way the sync does after a full load."""
    marker = {"synced_at": time.time(), "keys": 1, "orgs": 1, "removed": 0}
    client.set(layout.complete_marker, json.dumps(marker))


def check_request(
    method: str = "POST",
    path: str = "/v1/ai/chat",
    headers: Sequence[tuple[str, str | bytes]] = (),
    *,
    encoding: str = "header_map",
    request_id: str = "",
) -> auth_pb2.CheckRequest:
    """Build a CheckRequest shaped like Envoy's, with pseudo-headers first."""
    http = auth_pb2.AttributeContext.HttpRequest(
        id=request_id,
        method=method,
        path=path,
        host="api.example.test",
        scheme="https",
        protocol="HTTP/1.1",
    )
    lines: list[tuple[str, str | bytes]] = [
        (":authority", "api.example.test"),
        (":path", path),
        (":method", method),
        (":scheme", "https"),
        *headers,
    ]
    if encoding == "header_map":
        for name, value in lines:
            raw = value if isinstance(value, bytes) else value.encode("utf-8")
            http.header_map.headers.add(key=name, raw_value=raw)
    else:
        joined: dict[str, str] = {}
        for name, value in lines:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            name = name.lower()
            joined[name] = f"{joined[name]},{text}" if name in joined else text
        http.headers.update(joined)
    request = auth_pb2.AttributeContext.Request(http=http)
    return auth_pb2.CheckRequest(attributes=auth_pb2.AttributeContext(request=request))


def http_status(response: auth_pb2.CheckResponse) -> int:
    if response.WhichOneof("http_response") == "ok_response":
        return 200
    return response.denied_response.status.code


def deny_error(response: auth_pb2.CheckResponse) -> dict:
    body = json.loads(response.denied_response.body)
    assert body["success"] is False
    return body["error"]


def deny_headers(response: auth_pb2.CheckResponse) -> dict[str, str]:
    return {
        option.header.key: option.header.value
        for option in response.denied_response.headers
    }


def metadata(response: auth_pb2.CheckResponse) -> dict[str, str]:
    return {
        name: value.string_value
        for name, value in response.dynamic_metadata.fields.items()
    }


def test_health_reports_serving(server):
    serving = health_pb2.HealthCheckResponse.SERVING

    assert server.health_status("") == serving
    assert server.health_status(AUTHZ_SERVICE) == serving


def test_check_allows_key_with_scope(server, redis_client, layout, encoding):
    key = seed_key(redis_client, layout, scopes=("ai:chat", "control:read"))
    mark_complete(redis_client, layout)

    response = server.check(
        check_request("POST", "/v1/ai/chat", [key.authorization], encoding=encoding)
    )

    assert response.status.code == GRPC_OK
    assert http_status(response) == 200
    ok = response.ok_response
    identity = {option.header.key: option.header.value for option in ok.headers}
    assert identity == {
        "x-hasp-org-id": key.record.org_id,
        "x-hasp-key-id": key.record.key_id,
        "x-hasp-scopes": "ai:chat control:read",
    }
    for option in ok.headers:
        assert option.append_action == OVERWRITE
    assert list(ok.headers_to_remove) == ["authorization"]
    assert metadata(response)["key_id"] == key.record.key_id
    assert metadata(response)["org_id"] == key.record.org_id


@dataclass(frozen=True)
class OutcomeCase:
    method: str
    path: str
    scopes: tuple[str, ...] = ("ai:chat",)
    baa_active: bool = True
    # The token sent: "seeded" sends the seeded key, and "unknown" sends a
    # well-formed key that the copy does not contain.
    send: str = "seeded"
    complete: bool = True


# (case, HTTP status, code, type, retryable) for each of the six deny outcomes
# and the allow.
OUTCOME_CASES = [
    pytest.param(OutcomeCase("POST", "/v1/ai/chat"), 200, None, None, None,
                 id="allow"),
    pytest.param(OutcomeCase("POST", "/v1/ai/chat", send="unknown"),
                 401, "INVALID_API_KEY", "unauthorized", False, id="unknown-key"),
    pytest.param(OutcomeCase("POST", "/v1/ai/chat", baa_active=False),
                 402, "BAA_REQUIRED", "payment_required", False, id="no-baa"),
    pytest.param(OutcomeCase("POST", "/v1/nowhere"),
                 404, "NOT_FOUND", "not_found", False, id="unknown-path"),
    pytest.param(OutcomeCase("GET", "/v1/ai/chat"),
                 405, "METHOD_NOT_ALLOWED", "method_not_allowed", False,
                 id="wrong-method"),
    pytest.param(OutcomeCase("GET", "/v1/usage"),
                 403, "MISSING_SCOPE", "forbidden", False, id="missing-scope"),
    pytest.param(OutcomeCase("POST", "/v1/ai/chat", complete=False),
                 503, "AUTH_UNAVAILABLE", "service_unavailable", True,
                 id="copy-incomplete"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "status", "code", "error_type", "retryable"), OUTCOME_CASES
)
def test_check_outcome(
    server, redis_client, layout, encoding, case, status, code, error_type, retryable
):
    key = seed_key(redis_client, layout, scopes=case.scopes, baa_active=case.baa_active)
    if case.complete:
        mark_complete(redis_client, layout)
    token = key.token if case.send == "seeded" else generate_token()
    headers = [("authorization", f"Bearer {token}")]

    response = server.check(
        check_request(case.method, case.path, headers, encoding=encoding)
    )

    assert http_status(response) == status
    if code is None:
        assert response.status.code == GRPC_OK
        return
    expected_grpc = GRPC_UNAVAILABLE if status == 503 else GRPC_PERMISSION_DENIED
    assert response.status.code == expected_grpc
    assert deny_headers(response)["content-type"] == "application/json"
    error = deny_error(response)
    assert error["code"] == code
    assert error["type"] == error_type
    assert error["retryable"] is retryable
    assert token not in response.denied_response.body
    assert metadata(response)["code"] == code


def test_check_method_not_allowed_sends_allow(server, redis_client, layout):
    key = seed_key(redis_client, layout, scopes=("control:read",))
    mark_complete(redis_client, layout)

    response = server.check(
        check_request("DELETE", "/v1/usage/budget", [key.authorization])
    )

    assert http_status(response) == 405
    assert deny_headers(response)["allow"] == "GET, HEAD, PUT"


def test_check_missing_scope_names_key_and_scope(server, redis_client, layout):
    key = seed_key(redis_client, layout, scopes=("ai:chat",))
    mark_complete(redis_client, layout)

    response = server.check(check_request("POST", "/v1/webhooks", [key.authorization]))

    message = deny_error(response)["message"]
    assert key.record.key_id in message
    assert "control:webhooks" in message


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("HEAD", "/v1/ai/documents"),
        ("GET", "/v1/ai/documents/doc_1?version=2"),
        ("POST", "/v1/ai/documents?purpose=upload"),
    ],
)
def test_check_allows_head_and_query_string(server, redis_client, layout, method, path):
    key = seed_key(redis_client, layout, scopes=("ai:documents",))
    mark_complete(redis_client, layout)

    response = server.check(check_request(method, path, [key.authorization]))

    assert http_status(response) == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ai/documents/..",
        "/v1/ai/./documents",
        "/v1//ai/documents",
        "/v1/ai/documents/",
    ],
)
def test_check_non_canonical_path_is_404(server, redis_client, layout, path):
    key = seed_key(redis_client, layout, scopes=("ai:documents",))
    mark_complete(redis_client, layout)

    response = server.check(check_request("GET", path, [key.authorization]))

    assert http_status(response) == 404


def test_check_expired_key_is_401(server, redis_client, layout):
    key = seed_key(redis_client, layout, expires_at=time.time() - 1)
    mark_complete(redis_client, layout)

    response = server.check(check_request(headers=[key.authorization]))

    assert http_status(response) == 401
    challenge = 'Bearer realm="hasp", error="invalid_token"'
    assert deny_headers(response)["www-authenticate"] == challenge


def test_check_allows_key_before_expiry(server, redis_client, layout):
    key = seed_key(redis_client, layout, expires_at=time.time() + 3600)
    mark_complete(redis_client, layout)

    response = server.check(check_request(headers=[key.authorization]))

    assert http_status(response) == 200


@pytest.mark.parametrize("send", ["seeded", "unknown"])
def test_check_without_marker_is_503_not_401(server, redis_client, layout, send):
    key = seed_key(redis_client, layout)
    token = key.token if send == "seeded" else generate_token()

    response = server.check(
        check_request(headers=[("authorization", f"Bearer {token}")])
    )

    assert http_status(response) == 503
    assert response.status.code == GRPC_UNAVAILABLE
    assert deny_error(response)["code"] == "AUTH_UNAVAILABLE"
    assert deny_error(response)["retryable"] is True
    assert deny_headers(response)["retry-after"] == "1"
    assert "www-authenticate" not in deny_headers(response)


def test_check_missing_org_record_is_503(server, redis_client, layout):
    key = seed_key(redis_client, layout)
    redis_client.delete(layout.org(key.record.org_id))
    mark_complete(redis_client, layout)

    response = server.check(check_request(headers=[key.authorization]))

    assert http_status(response) == 503
    assert deny_error(response)["code"] == "AUTH_UNAVAILABLE"
    assert key.record.org_id not in response.denied_response.body


@pytest.mark.parametrize(
    ("record", "raw"),
    [
        pytest.param("key", "{not json", id="key-not-json"),
        pytest.param("key", "[]", id="key-not-object"),
        pytest.param("key", '{"key_id": "key_1"}', id="key-missing-fields"),
        pytest.param("key", "", id="key-empty"),
        pytest.param("org", "{not json", id="org-not-json"),
        pytest.param("org", '{"org_id": "org_1", "baa_active": "yes"}',
                     id="org-baa-not-boolean"),
        pytest.param("org", '{"baa_active": true}', id="org-missing-id"),
    ],
)  # fmt: skip
def test_check_corrupt_record_is_503(server, redis_client, layout, record, raw):
    key = seed_key(redis_client, layout)
    if record == "key":
        redis_client.set(layout.key(hash_token(key.token)), raw)
    else:
        redis_client.set(layout.org(key.record.org_id), raw)
    mark_complete(redis_client, layout)

    response = server.check(check_request(headers=[key.authorization]))

    assert http_status(response) == 503
    assert deny_error(response)["code"] == "AUTH_UNAVAILABLE"
    assert deny_error(response)["message"].startswith("The authorization service")
    assert "json" not in deny_error(response)["message"].lower()


def test_check_duplicate_authorization_is_401(server, redis_client, layout):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)

    response = server.check(
        check_request(headers=[key.authorization, key.authorization])
    )

    assert http_status(response) == 401
    assert "exactly one Authorization header" in deny_error(response)["message"]
    challenge = 'Bearer realm="hasp", error="invalid_token"'
    assert deny_headers(response)["www-authenticate"] == challenge
    assert key.token not in response.denied_response.body


def test_check_comma_joined_authorization_is_401(server, redis_client, layout):
    key = seed_key(redis_client, layout)
    other = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)

    response = server.check(
        check_request(
            headers=[key.authorization, other.authorization], encoding="headers"
        )
    )

    assert http_status(response) == 401
    assert deny_error(response)["message"].startswith("The API key is malformed")
    assert key.token not in response.denied_response.body
    assert other.token not in response.denied_response.body


def test_check_mixed_case_header_name(server, redis_client, layout, encoding):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    headers = [("Authorization", f"bearer {key.token}")]

    response = server.check(check_request(headers=headers, encoding=encoding))

    assert http_status(response) == 200


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"Bearer \xff\xfe", id="invalid-utf8"),
        pytest.param("Bearer hasp_key_live_\u00c9" + "A" * 31, id="non-ascii"),
        pytest.param(b"Bearer  hasp_key_live_" + b"A" * 32, id="two-spaces"),
    ],
)
def test_check_malformed_authorization_is_401(server, redis_client, layout, value):
    mark_complete(redis_client, layout)

    response = server.check(check_request(headers=[("authorization", value)]))

    assert http_status(response) == 401
    assert deny_error(response)["message"].startswith("The API key is malformed")


def test_check_empty_request_is_401(server):
    response = server.check(auth_pb2.CheckRequest())

    assert http_status(response) == 401
    assert response.status.code == GRPC_PERMISSION_DENIED
    assert deny_headers(response)["content-type"] == "application/json"
    assert deny_headers(response)["www-authenticate"] == 'Bearer realm="hasp"'
    error = deny_error(response)
    assert error["code"] == "INVALID_API_KEY"
    assert error["message"].startswith("No API key was sent")
    assert GENERATED_ID_RE.fullmatch(error["request_id"])
    assert "Traceback" not in server.log()


def test_check_removes_client_hasp_headers(server, redis_client, layout, encoding):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    headers = [
        key.authorization,
        ("x-hasp-org-id", "org_spoofed"),
        ("X-Hasp-Key-Id", "key_spoofed"),
        ("x-hasp-debug", "1"),
        ("X-Hasp-Admin", "true"),
        ("x-hasp-admin", "again"),
        ("x-haspy", "not ours"),
        ("x-request-hasp", "not ours"),
    ]

    response = server.check(check_request(headers=headers, encoding=encoding))

    ok = response.ok_response
    assert list(ok.headers_to_remove) == [
        "authorization",
        "x-hasp-admin",
        "x-hasp-debug",
    ]
    identity = {option.header.key: option.header.value for option in ok.headers}
    assert identity["x-hasp-org-id"] == key.record.org_id
    assert identity["x-hasp-key-id"] == key.record.key_id


@pytest.mark.parametrize(
    ("request_id", "headers", "expected"),
    [
        pytest.param("3f1c-envoy", [], "req_3f1c-envoy", id="http-id"),
        pytest.param("", [("x-request-id", "abc.123")], "req_abc.123",
                     id="x-request-id"),
        pytest.param("from-id", [("x-request-id", "from-header")],
                     "req_from-header", id="x-request-id-wins"),
        pytest.param("bad id\n", [], None, id="unsafe-http-id"),
        pytest.param("", [("x-request-id", 'a"b')], None, id="unsafe-header"),
        pytest.param("", [], None, id="none"),
    ],
)  # fmt: skip
def test_check_request_id(server, encoding, request_id, headers, expected):
    request = check_request(headers=headers, encoding=encoding, request_id=request_id)

    response = server.check(request)

    sent = deny_error(response)["request_id"]
    if expected is None:
        assert GENERATED_ID_RE.fullmatch(sent)
    else:
        assert sent == expected
    assert metadata(response)["request_id"] == sent
    assert f"request_id={sent}" in server.log()


def test_check_allow_metadata_has_request_id(server, redis_client, layout):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)

    response = server.check(
        check_request(headers=[key.authorization], request_id="allow-1")
    )

    assert metadata(response) == {
        "org_id": key.record.org_id,
        "key_id": key.record.key_id,
        "scopes": "ai:chat",
        "request_id": "req_allow-1",
    }


def test_check_fails_closed_when_redis_unreachable(start_server):
    # Nothing listens on this port, so every Redis connection is refused.
    server = start_server(redis_url=f"redis://127.0.0.1:{free_port()}/0")

    response = server.check(
        check_request(headers=[("authorization", f"Bearer {generate_token()}")])
    )

    assert http_status(response) == 503
    assert response.status.code == GRPC_UNAVAILABLE
    assert deny_error(response)["code"] == "AUTH_UNAVAILABLE"
    assert deny_headers(response)["retry-after"] == "1"
    assert "127.0.0.1" not in response.denied_response.body


def test_check_fails_closed_when_redis_stops(start_server, tmp_path, layout):
    redis_server = RedisServer(workdir=tmp_path).start()
    try:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        key = seed_key(client, layout)
        mark_complete(client, layout)
        client.close()
        server = start_server(redis_url=redis_server.url)
        request = check_request(headers=[key.authorization])
        assert http_status(server.check(request)) == 200

        redis_server.stop()
        response = server.check(request)
    finally:
        redis_server.stop()

    assert http_status(response) == 503
    assert deny_headers(response)["retry-after"] == "1"
    assert server.process.poll() is None


def test_check_fails_closed_when_redis_hangs(start_server):
    # The kernel completes connections to a listening socket that is never
    # accepted, so Redis calls connect and then wait for a reply that never comes.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        port = silent.getsockname()[1]
        server = start_server(redis_url=f"redis://127.0.0.1:{port}/0")
        request = check_request(
            headers=[("authorization", f"Bearer {generate_token()}")]
        )

        started = time.monotonic()
        response = server.check(request)
        elapsed = time.monotonic() - started

    assert http_status(response) == 503
    assert deny_error(response)["code"] == "AUTH_UNAVAILABLE"
    # The default check budget is 200 ms, and the limit leaves room for a slow
    # test machine.
    assert elapsed < 2.0


def test_sigterm_exits_zero(server):
    server.process.send_signal(signal.SIGTERM)

    returncode = server.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    assert returncode == 0
    assert "hasp-authz stopped" in server.log()


# --- the in-process cache, seen from outside the process ---

SUBSCRIBED_LOG = "in-process cache in use"


def test_check_cache_hit_skips_redis(start_server, tmp_path, layout):
    redis_server = RedisServer(workdir=tmp_path).start()
    try:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        key = seed_key(client, layout)
        mark_complete(client, layout)
        server = start_server(redis_url=redis_server.url)
        wait_for_log(server, SUBSCRIBED_LOG)
        assert (
            http_status(server.check(check_request(headers=[key.authorization]))) == 200
        )

        # A paused Redis accepts commands but answers none until the pause ends,
        # so only a cache hit can answer within the Check budget.
        client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        cached = server.check(check_request(headers=[key.authorization]))
        unknown = server.check(
            check_request(headers=[("authorization", f"Bearer {generate_token()}")])
        )
        client.close()
    finally:
        redis_server.stop()

    assert http_status(cached) == 200
    assert http_status(unknown) == 503


def test_check_cache_off_reads_redis(start_server, redis_client, layout):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    server = start_server(extra_args=["--cache-size", "0"])
    request = check_request(headers=[key.authorization])
    assert http_status(server.check(request)) == 200

    # Deleted without a change message: only a server without a cache sees it.
    redis_client.delete(layout.key(hash_token(key.token)))
    response = server.check(request)

    assert http_status(response) == 401
    assert SUBSCRIBED_LOG not in server.log()


def test_check_marker_deleted_is_503_despite_cache(start_server, redis_client, layout):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    server = start_server()
    wait_for_log(server, SUBSCRIBED_LOG)
    request = check_request(headers=[key.authorization])
    assert http_status(server.check(request)) == 200

    # As after FLUSHDB: the marker goes without a change message.
    redis_client.delete(layout.complete_marker)
    deadline = time.monotonic() + 1.0
    while (status := http_status(server.check(request))) != 503:
        assert time.monotonic() < deadline, f"still {status} after 1 s"
        time.sleep(0.01)

    assert deny_error(server.check(request))["code"] == "AUTH_UNAVAILABLE"


def test_check_revoked_key_is_401_after_change_message(
    start_server, redis_client, layout
):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    server = start_server()
    wait_for_log(server, SUBSCRIBED_LOG)
    request = check_request(headers=[key.authorization])
    assert http_status(server.check(request)) == 200

    key_hash = hash_token(key.token)
    redis_client.delete(layout.key(key_hash))
    message = key_changed_message(key_hash, at=time.time())
    redis_client.publish(layout.changes_channel, message)
    deadline = time.monotonic() + 1.0
    while (status := http_status(server.check(request))) != 401:
        assert time.monotonic() < deadline, f"still {status} after 1 s"
        time.sleep(0.01)
