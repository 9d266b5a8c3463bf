"""End to end: real HTTP through the real Envoy to hasp-authz, Redis and the upstream.

The stack is the one ``make run`` starts (hasp_authz.dev.stack), on free ports,
with its own SQLite key store and Redis prefix. Keys and orgs are written with
the real ``hasp-keys`` command.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from hasp_authz.dev.stack import LocalStack, StackPorts, print_banner, seed_demo_data
from hasp_authz.records import RedisLayout
from hasp_authz.routes import DEFAULT_ROUTES_FILE

pytestmark = pytest.mark.e2e

ALL_SCOPES = (
    "ai:chat",
    "ai:documents",
    "ai:embeddings",
    "ai:summarize",
    "control:read",
    "control:webhooks",
)
# Every route of the default table: method, a concrete path, required scope.
DEFAULT_ROUTES = [
    ("POST", "/v1/ai/chat", "ai:chat"),
    ("POST", "/v1/messages", "ai:chat"),
    ("POST", "/v1/ai/documents", "ai:documents"),
    ("GET", "/v1/ai/documents", "ai:documents"),
    ("GET", "/v1/ai/documents/doc_123", "ai:documents"),
    ("POST", "/v1/ai/embeddings", "ai:embeddings"),
    ("POST", "/v1/ai/summarize", "ai:summarize"),
    ("GET", "/v1/api_keys", "control:read"),
    ("POST", "/v1/api_keys", "control:read"),
    ("GET", "/v1/usage", "control:read"),
    ("GET", "/v1/usage/budget", "control:read"),
    ("PUT", "/v1/usage/budget", "control:read"),
    ("GET", "/v1/audit", "control:read"),
    ("GET", "/v1/webhooks", "control:webhooks"),
    ("POST", "/v1/webhooks", "control:webhooks"),
    ("DELETE", "/v1/webhooks/wh_123", "control:webhooks"),
]


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        return self.json()["error"]


@dataclass
class Stack:
    local: LocalStack
    keys: dict[str, str]
    key_ids: dict[str, str]

    def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] = (),
        token: str | None = None,
    ) -> Response:
        """Send one request to Envoy; repeated header names are sent repeatedly."""
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.local.ports.envoy, timeout=10
        )
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            if token is not None:
                connection.putheader("Authorization", f"Bearer {token}")
            for name, value in headers:
                connection.putheader(name, value)
            body = b"{}" if method in ("POST", "PUT") else b""
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            connection.close()

    def create_key(self, org: str, name: str, *scopes: str) -> dict:
        arguments = ["create", "--org", org, "--name", name, "--json"]
        for scope in scopes:
            arguments += ["--scope", scope]
        return json.loads(self.local.hasp_keys(*arguments))


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir: Path = tmp_path_factory.mktemp("stack")
    local = LocalStack(
        workdir=workdir,
        keystore_url=f"sqlite:///{workdir}/keystore.db",
        ports=StackPorts.free(),
        redis_url=redis_url,
        redis_prefix=f"hasp-e2e-{uuid.uuid4().hex[:12]}:",
    )
    local.start()
    try:
        local.hasp_keys("orgs", "create", "acme", "--name", "Acme", "--baa")
        local.hasp_keys("orgs", "create", "nobaa", "--name", "No BAA yet")
        stack = Stack(local, keys={}, key_ids={})
        for name, org, scopes in [
            ("all", "acme", ALL_SCOPES),
            ("chat", "acme", ("ai:chat",)),
            ("webhooks", "acme", ("control:webhooks",)),
            ("nobaa", "nobaa", ALL_SCOPES),
        ]:
            created = stack.create_key(org, name, *scopes)
            stack.keys[name] = created["token"]
            stack.key_ids[name] = created["key_id"]
        yield stack
    finally:
        local.stop()


def assert_deny(response: Response, status: int, code: str, type_: str) -> dict:
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["type"] == type_
    assert body["error"]["retryable"] is (status == 503)
    assert body["error"]["message"]
    assert body["error"]["request_id"] == "req_" + response.headers["x-request-id"]
    return body["error"]


def upstream_saw(response: Response) -> dict:
    assert response.status == 200, response.body
    return response.json()


# --- the decision table, one row at a time ---


def test_allow_forwards_identity_to_upstream(stack: Stack) -> None:
    response = stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"])
    echo = upstream_saw(response)
    assert echo["method"] == "POST"
    assert echo["path"] == "/v1/ai/chat"
    assert echo["headers"]["x-hasp-org-id"] == ["acme"]
    assert echo["headers"]["x-hasp-key-id"] == [stack.key_ids["chat"]]
    assert echo["headers"]["x-hasp-scopes"] == ["ai:chat"]
    assert "authorization" not in echo["headers"]


def test_missing_key_is_401_without_error(stack: Stack) -> None:
    response = stack.request("POST", "/v1/ai/chat")
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="hasp"'


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer hasp_key_live_short",
        "Bearer hasp_key_live_" + "a" * 32,
        "Bearer hasp_key_test_" + "A" * 32,
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
)
def test_malformed_key_is_401_invalid_token(stack: Stack, authorization: str) -> None:
    response = stack.request("POST", "/v1/ai/chat", [("Authorization", authorization)])
    error = assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")
    assert error["message"].startswith("The API key is malformed")
    assert response.headers["www-authenticate"] == (
        'Bearer realm="hasp", error="invalid_token"'
    )
    credential = authorization.partition(" ")[2]
    if credential:
        assert credential not in response.body.decode()


def test_unknown_key_is_401(stack: Stack) -> None:
    token = "hasp_key_live_" + "Z" * 32
    response = stack.request("POST", "/v1/ai/chat", token=token)
    error = assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")
    assert token not in response.body.decode()
    assert error["message"] == "The API key is invalid, revoked or expired."


def test_org_without_baa_is_402(stack: Stack) -> None:
    response = stack.request("POST", "/v1/ai/chat", token=stack.keys["nobaa"])
    error = assert_deny(response, 402, "BAA_REQUIRED", "payment_required")
    assert "Business Associate Agreement" in error["message"]


def test_unknown_path_is_404(stack: Stack) -> None:
    response = stack.request("GET", "/v1/not-a-route", token=stack.keys["all"])
    assert_deny(response, 404, "NOT_FOUND", "not_found")


def test_wrong_method_is_405_with_allow(stack: Stack) -> None:
    response = stack.request("DELETE", "/v1/usage/budget", token=stack.keys["all"])
    assert_deny(response, 405, "METHOD_NOT_ALLOWED", "method_not_allowed")
    assert response.headers["allow"] == "GET, HEAD, PUT"


def test_missing_scope_is_403(stack: Stack) -> None:
    response = stack.request("GET", "/v1/usage", token=stack.keys["chat"])
    error = assert_deny(response, 403, "MISSING_SCOPE", "forbidden")
    assert "control:read" in error["message"]
    assert stack.key_ids["chat"] in error["message"]


def test_missing_marker_is_503_not_401(stack: Stack) -> None:
    layout = RedisLayout(stack.local.redis_prefix)
    client = redis.Redis.from_url(stack.local.redis_url)
    try:
        client.delete(layout.complete_marker)
        response = stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"])
        assert_deny(response, 503, "AUTH_UNAVAILABLE", "service_unavailable")
        assert response.headers["retry-after"] == "1"
    finally:
        stack.local.hasp_keys("sync")
        client.close()
    again = stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"])
    assert again.status == 200


# --- the order of the checks ---


@pytest.mark.parametrize(
    ("key", "method", "path", "status"),
    [
        (None, "GET", "/nowhere", 401),
        ("nobaa", "GET", "/nowhere", 402),
        ("chat", "GET", "/nowhere", 404),
        ("chat", "GET", "/v1/ai/chat", 405),
        ("chat", "GET", "/v1/usage", 403),
    ],
)
def test_first_failing_check_decides(
    stack: Stack, key: str | None, method: str, path: str, status: int
) -> None:
    token = stack.keys[key] if key else None
    assert stack.request(method, path, token=token).status == status


# --- every default route ---


@pytest.mark.parametrize(("method", "path", "scope"), DEFAULT_ROUTES)
def test_default_route_allows_its_scope(
    stack: Stack, method: str, path: str, scope: str
) -> None:
    echo = upstream_saw(stack.request(method, path, token=stack.keys["all"]))
    assert echo["method"] == method
    assert echo["path"] == path


@pytest.mark.parametrize(("method", "path", "scope"), DEFAULT_ROUTES)
def test_default_route_rejects_other_scope(
    stack: Stack, method: str, path: str, scope: str
) -> None:
    # The "webhooks" key holds only control:webhooks, the "chat" key only ai:chat.
    other = "chat" if scope == "control:webhooks" else "webhooks"
    response = stack.request(method, path, token=stack.keys[other])
    error = assert_deny(response, 403, "MISSING_SCOPE", "forbidden")
    assert scope in error["message"]


def test_head_is_checked_as_get(stack: Stack) -> None:
    response = stack.request("HEAD", "/v1/usage", token=stack.keys["all"])
    assert response.status == 200


# --- spoofing and hostile requests ---


def test_spoofed_identity_headers_replaced(stack: Stack) -> None:
    spoofed = [
        ("X-Hasp-Org-Id", "evil-org"),
        ("x-hasp-org-id", "evil-org-2"),
        ("X-Hasp-Key-Id", "key_evil"),
        ("X-Hasp-Scopes", "control:read control:webhooks"),
        ("X-Hasp-Admin", "true"),
    ]
    response = stack.request("POST", "/v1/ai/chat", spoofed, token=stack.keys["chat"])
    headers = upstream_saw(response)["headers"]
    assert headers["x-hasp-org-id"] == ["acme"]
    assert headers["x-hasp-key-id"] == [stack.key_ids["chat"]]
    assert headers["x-hasp-scopes"] == ["ai:chat"]
    assert "x-hasp-admin" not in headers


def test_spoofed_underscore_header_dropped(stack: Stack) -> None:
    spoofed = [("x_hasp_org_id", "evil-org")]
    response = stack.request("POST", "/v1/ai/chat", spoofed, token=stack.keys["chat"])
    headers = upstream_saw(response)["headers"]
    assert "x_hasp_org_id" not in headers
    assert headers["x-hasp-org-id"] == ["acme"]


def test_spoofed_headers_cannot_grant_scope(stack: Stack) -> None:
    spoofed = [("X-Hasp-Scopes", "control:read")]
    response = stack.request("GET", "/v1/usage", spoofed, token=stack.keys["chat"])
    assert_deny(response, 403, "MISSING_SCOPE", "forbidden")


def test_duplicate_authorization_is_401(stack: Stack) -> None:
    both = [
        ("Authorization", f"Bearer {stack.keys['chat']}"),
        ("Authorization", f"Bearer {stack.keys['all']}"),
    ]
    response = stack.request("POST", "/v1/ai/chat", both)
    error = assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")
    assert stack.keys["chat"] not in response.body.decode()
    assert error["request_id"].startswith("req_")


def test_same_key_twice_is_401(stack: Stack) -> None:
    twice = [("Authorization", f"Bearer {stack.keys['chat']}")] * 2
    response = stack.request("POST", "/v1/ai/chat", twice)
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [
        ("/v1/ai/documents/../chat", "/v1/ai/chat"),
        ("/v1/./ai/chat", "/v1/ai/chat"),
        ("/v1//ai///chat", "/v1/ai/chat"),
        ("/v1/ai/%63hat", "/v1/ai/chat"),
        ("/v1/ai/chat?model=x&next=/v1/usage", "/v1/ai/chat?model=x&next=/v1/usage"),
    ],
)
def test_normalized_path_is_what_upstream_gets(
    stack: Stack, path: str, upstream_path: str
) -> None:
    # Envoy normalizes before the check, so the sidecar decides on the very path
    # the upstream receives.
    echo = upstream_saw(stack.request("POST", path, token=stack.keys["chat"]))
    assert echo["path"] == upstream_path


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ai/chat/../../usage",
        "/v1/ai/chat/%2e%2e/%2e%2e/usage",
        "/v1/ai/../usage/./",
    ],
)
def test_dot_segments_cannot_escape_scope(stack: Stack, path: str) -> None:
    response = stack.request("GET", path, token=stack.keys["chat"])
    assert response.status in (403, 404), response.body


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ai%2Fchat",
        "/v1/ai%2fchat",
        "/v1/ai%5Cchat",
        "/v1%2F..%2Fusage",
    ],
)
def test_encoded_slashes_never_reach_upstream(stack: Stack, path: str) -> None:
    response = stack.request("POST", path, token=stack.keys["all"])
    assert response.status in (400, 404), response.body


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ai/chat;jsessionid=1",
        "/v1/ai/documents/a;b",
        "/v1/ai/documents/a%20b",
    ],
)
def test_non_canonical_path_is_404(stack: Stack, path: str) -> None:
    method = "POST" if path.startswith("/v1/ai/chat") else "GET"
    response = stack.request(method, path, token=stack.keys["all"])
    assert_deny(response, 404, "NOT_FOUND", "not_found")


# --- freshness ---


def poll_status(stack: Stack, token: str, expected: int, limit: float) -> float:
    """Send requests until one returns ``expected``; return the seconds it took."""
    started = time.monotonic()
    while True:
        status = stack.request("POST", "/v1/ai/chat", token=token).status
        elapsed = time.monotonic() - started
        if status == expected or elapsed > limit:
            assert status == expected, f"still {status} after {elapsed:.2f} s"
            return elapsed
        time.sleep(0.02)


def test_new_key_usable_within_1s(stack: Stack) -> None:
    created = stack.create_key("acme", "fresh", "ai:chat")
    assert poll_status(stack, created["token"], 200, limit=1.0) <= 1.0


def test_revoked_key_refused_within_1s(stack: Stack) -> None:
    created = stack.create_key("acme", "soon-revoked", "ai:chat")
    assert poll_status(stack, created["token"], 200, limit=1.0) <= 1.0
    stack.local.hasp_keys("revoke", created["key_id"])
    assert poll_status(stack, created["token"], 401, limit=1.0) <= 1.0


def test_baa_off_refused_within_1s(stack: Stack) -> None:
    stack.local.hasp_keys("orgs", "create", "flaky", "--baa")
    created = stack.create_key("flaky", "flaky-key", "ai:chat")
    assert poll_status(stack, created["token"], 200, limit=1.0) <= 1.0
    stack.local.hasp_keys("orgs", "baa", "flaky", "off")
    assert poll_status(stack, created["token"], 402, limit=1.0) <= 1.0


# --- the sidecar itself failing ---


def test_sidecar_down_is_json_503(stack: Stack) -> None:
    assert stack.local.stop_authz() == 0
    try:
        response = stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"])
        error = assert_deny(response, 503, "AUTH_UNAVAILABLE", "service_unavailable")
        assert error["retryable"] is True
        assert response.headers["retry-after"] == "1"
    finally:
        stack.local.start_authz()
    assert stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"]).status == 200


# --- the demo data that `make run` prints ---


def test_demo_keys_work_as_printed(stack: Stack) -> None:
    rows = seed_demo_data(stack.local)
    tokens = {name: token for name, _, token in rows}
    chat = stack.request("POST", "/v1/ai/chat", token=tokens["demo-chat"])
    assert chat.status == 200
    usage = stack.request("GET", "/v1/usage", token=tokens["demo-chat"])
    assert usage.status == 403
    everything = stack.request("GET", "/v1/usage", token=tokens["demo-all-scopes"])
    assert everything.status == 200
    no_baa = stack.request("POST", "/v1/ai/chat", token=tokens["demo-no-baa"])
    assert no_baa.status == 402


def test_demo_keys_replaced_on_restart(stack: Stack) -> None:
    first = {name: token for name, _, token in seed_demo_data(stack.local)}
    second = {name: token for name, _, token in seed_demo_data(stack.local)}
    old = stack.request("POST", "/v1/ai/chat", token=first["demo-chat"])
    assert old.status == 401
    new = stack.request("POST", "/v1/ai/chat", token=second["demo-chat"])
    assert new.status == 200


def test_banner_names_endpoints_and_reload(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [("demo-chat", "acme", stack.keys["chat"])] * 3
    print_banner(stack.local, keys)
    banner = capsys.readouterr().out
    authz = stack.local.processes["hasp-authz"].process

    assert f"{stack.local.metrics_url}/metrics" in banner
    assert f"kill -HUP {authz.pid}" in banner
    assert str(DEFAULT_ROUTES_FILE) in banner
    assert stack.request("GET", "/v1/status").status == 200
