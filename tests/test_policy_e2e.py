"""End to end: per-route policy from Envoy's ext_authz context_extensions.

Real HTTP goes through the real Envoy to hasp-authz, a redis-server of this
module's own and the demo upstream (hasp_authz.dev.stack). envoy.yaml ships the
public route GET /v1/status. The other policy routes are added for these tests
with render_envoy_config's ``extra_routes``, in front of the catch-all route:

- GET /v1/usage requires ``control:webhooks`` (``hasp_scope``) in place of the
  route table's ``control:read``;
- /v1/ai/summarize is in shadow mode (``hasp_shadow``);
- /v1/audit and /v1/api_keys carry an invalid ``hasp_*`` entry.

The helpers at the top are shared with test_ops_e2e.py.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hasp_authz.dev.stack import LocalStack, StackPorts
from hasp_authz.tokens import generate_token
from test_e2e import Response, Stack, assert_deny, upstream_saw

pytestmark = pytest.mark.e2e

# Generous limit for anything that is polled: a log line, a metric, readiness.
DEADLINE_SECONDS = 10.0
IDENTITY_HEADERS = ("x-hasp-org-id", "x-hasp-key-id", "x-hasp-scopes")
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXT_AUTHZ_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
)
# Key name -> (org, scopes). Org "acme" has a BAA, org "nobaa" has none.
KEYS = {
    "chat": ("acme", ("ai:chat",)),
    "read": ("acme", ("control:read",)),
    "webhooks": ("acme", ("control:webhooks",)),
    "summarize": ("acme", ("ai:summarize",)),
    "nobaa": ("nobaa", ("ai:chat",)),
}

T = TypeVar("T")


# --- helpers shared with test_ops_e2e.py ---


def policy_route(name: str, path: str, extensions: Mapping[str, str]) -> dict:
    """Return an Envoy route for ``path`` that sends ``extensions`` to the sidecar."""
    return {
        "name": name,
        "match": {"path": path},
        "route": {"cluster": "upstream"},
        "typed_per_filter_config": {
            EXT_AUTHZ_FILTER: {
                "@type": EXT_AUTHZ_PER_ROUTE,
                "check_settings": {"context_extensions": dict(extensions)},
            }
        },
    }


def start_stack(
    workdir: Path,
    *,
    extra_routes: Sequence[dict[str, Any]] = (),
    authz_env: Mapping[str, str] | None = None,
) -> Stack:
    """Start a stack with its own redis-server, then create the orgs and KEYS.

    The sync watcher is off, so a test that deletes the completeness marker or
    restarts Redis decides when ``hasp-keys sync`` repairs it.
    """
    local = LocalStack(
        workdir=workdir,
        keystore_url=f"sqlite:///{workdir}/keystore.db",
        ports=StackPorts.free(),
        redis_prefix=f"hasp-e2e-{uuid.uuid4().hex[:12]}:",
        watch=False,
        authz_env=dict(authz_env or {}),
        envoy_extra_routes=list(extra_routes),
    )
    local.start()
    try:
        local.hasp_keys("orgs", "create", "acme", "--name", "Acme", "--baa")
        local.hasp_keys("orgs", "create", "nobaa", "--name", "No BAA yet")
        stack = Stack(local, keys={}, key_ids={})
        for name, (org, scopes) in KEYS.items():
            created = stack.create_key(org, name, *scopes)
            stack.keys[name] = created["token"]
            stack.key_ids[name] = created["key_id"]
    except BaseException:
        local.stop()
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    """Stop every process and print hasp-authz's log, which pytest shows on failure."""
    stack.local.stop()
    print("--- hasp-authz log ---")
    print("\n".join(stack.local.authz_log_lines()[-200:]))


def wait_until(
    condition: Callable[[], T],
    description: str,
    timeout: float = DEADLINE_SECONDS,
) -> T:
    """Call ``condition`` every 50 ms and return its first true value.

    Raises AssertionError naming ``description`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{description}: still not the case after {timeout} s "
                f"(last value {value!r})"
            )
        time.sleep(0.05)


def ops_get(local: LocalStack, path: str) -> tuple[int, str] | None:
    """GET ``path`` from hasp-authz's ops server. Returns None if nothing listens."""
    connection = http.client.HTTPConnection("127.0.0.1", local.ports.metrics, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    except OSError:
        return None
    finally:
        connection.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(local: LocalStack) -> Samples:
    """Return every sample of /metrics, keyed by sample name and label set."""
    result = wait_until(lambda: ops_get(local, "/metrics"), "/metrics answers")
    status, body = result
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """Return one sample's value, or 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def sample_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum the samples of ``name`` whose labels include ``labels``."""
    required = set(labels.items())
    return sum(
        value
        for (sample_name, label_set), value in samples.items()
        if sample_name == name and required <= label_set
    )


def log_entries(local: LocalStack, **fields: Any) -> list[dict[str, Any]]:
    """Return hasp-authz's JSON log entries that have all of ``fields``.

    NOTE: hasp-authz writes at most 20 deny and would-deny lines per second
    per code and drops the rest, so a test that waits for one such line must
    not follow a burst of more than 20 denials with that code.
    """
    return [
        entry
        for entry in local.authz_log_entries()
        if all(entry.get(name) == value for name, value in fields.items())
    ]


def request_id_of(response: Response) -> str:
    """Return the sidecar's request id for a response: ``req_`` + x-request-id."""
    return "req_" + response.headers["x-request-id"]


def assert_no_identity(echo: dict) -> None:
    """Assert that the upstream got no identity and no credentials."""
    headers = echo["headers"]
    for name in IDENTITY_HEADERS:
        assert name not in headers, headers
    assert not [name for name in headers if name.startswith("x-hasp-")], headers
    assert "authorization" not in headers, headers


# --- the module's stack ---

SCOPED_PATH = "/v1/usage"
SHADOW_PATH = "/v1/ai/summarize"
EXTRA_ROUTES = [
    policy_route("scoped_usage", SCOPED_PATH, {"hasp_scope": "control:webhooks"}),
    policy_route("shadow_summarize", SHADOW_PATH, {"hasp_shadow": "true"}),
    policy_route("invalid_value", "/v1/audit", {"hasp_shadow": "yes"}),
    policy_route("invalid_key", "/v1/api_keys", {"hasp_publik": "true"}),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(
        tmp_path_factory.mktemp("policy-stack"), extra_routes=EXTRA_ROUTES
    )
    try:
        yield started
    finally:
        stop_stack(started)


# --- public route ---


def test_public_route_allows_without_key(stack: Stack) -> None:
    echo = upstream_saw(stack.request("GET", "/v1/status"))
    assert echo["method"] == "GET"
    assert echo["path"] == "/v1/status"
    assert_no_identity(echo)


def test_public_route_allows_head(stack: Stack) -> None:
    response = stack.request("HEAD", "/v1/status")
    assert response.status == 200


def test_public_route_ignores_query_string(stack: Stack) -> None:
    echo = upstream_saw(stack.request("GET", "/v1/status?verbose=1"))
    assert echo["path"] == "/v1/status?verbose=1"


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {generate_token()}",
        "Bearer hasp_key_live_short",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
    ids=["unknown-key", "malformed-key", "basic-auth", "empty-bearer"],
)
def test_public_route_ignores_bogus_key(stack: Stack, authorization: str) -> None:
    response = stack.request("GET", "/v1/status", [("Authorization", authorization)])
    assert_no_identity(upstream_saw(response))


def test_public_route_strips_valid_key(stack: Stack) -> None:
    response = stack.request("GET", "/v1/status", token=stack.keys["chat"])
    assert_no_identity(upstream_saw(response))


def test_public_route_drops_spoofed_identity(stack: Stack) -> None:
    spoofed = [
        ("X-Hasp-Org-Id", "evil-org"),
        ("X-Hasp-Key-Id", "key_evil"),
        ("X-Hasp-Scopes", "control:read"),
        ("X-Hasp-Admin", "true"),
    ]
    echo = upstream_saw(stack.request("GET", "/v1/status", spoofed))
    assert_no_identity(echo)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_public_path_other_method_needs_key(stack: Stack, method: str) -> None:
    # Only GET and HEAD match the public route, so other methods reach the
    # catch-all route.
    response = stack.request(method, "/v1/status")
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/status/",
        "/v1/STATUS",
        "/v1/status/extra",
        "/v1/status/../usage",
        "/v1/statusx",
    ],
)
def test_lookalike_path_is_not_public(stack: Stack, path: str) -> None:
    response = stack.request("GET", path)
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


def test_public_allow_counted_as_route_public(stack: Stack) -> None:
    before = scrape(stack.local)
    for _ in range(3):
        assert stack.request("GET", "/v1/status").status == 200

    def counted() -> float:
        after = scrape(stack.local)
        name = "hasp_authz_decisions_total"
        return sample(after, name, code="ALLOW", route="public") - sample(
            before, name, code="ALLOW", route="public"
        )

    wait_until(lambda: counted() >= 3, "3 public allows counted")
    assert counted() == 3


def test_public_allow_in_access_log(stack: Stack) -> None:
    response = stack.request("GET", "/v1/status")
    request_id = response.headers["x-request-id"]

    def logged() -> list[dict]:
        return [
            entry
            for entry in stack.local.envoy_access_log()
            if entry.get("request_id") == request_id
        ]

    [entry] = wait_until(logged, "access log line of the public request")
    assert entry["status"] == 200
    assert entry["policy"] == "public"
    assert entry["org_id"] is None
    assert entry["key_id"] is None


def test_public_route_works_while_redis_stopped(stack: Stack) -> None:
    local = stack.local

    def unavailable() -> Response | None:
        # A key never seen before has to be read from Redis.
        response = stack.request("POST", "/v1/ai/chat", token=generate_token())
        return response if response.status == 503 else None

    local.stop_redis()
    try:
        keyed = wait_until(unavailable, "a keyed request gets 503 without Redis")
        assert_deny(keyed, 503, "AUTH_UNAVAILABLE", "service_unavailable")

        echo = upstream_saw(stack.request("GET", "/v1/status"))
        assert_no_identity(echo)
        with_key = stack.request("GET", "/v1/status", token=stack.keys["chat"])
        assert_no_identity(upstream_saw(with_key))
    finally:
        local.start_redis()
        local.hasp_keys("sync")
    wait_until(
        lambda: (
            stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"]).status == 200
        ),
        "keyed requests allowed again after Redis restarts",
    )


# --- hasp_scope replaces the route table's scope ---


def test_scope_override_allows_its_scope(stack: Stack) -> None:
    response = stack.request("GET", SCOPED_PATH, token=stack.keys["webhooks"])
    headers = upstream_saw(response)["headers"]
    assert headers["x-hasp-org-id"] == ["acme"]
    assert headers["x-hasp-key-id"] == [stack.key_ids["webhooks"]]
    assert headers["x-hasp-scopes"] == ["control:webhooks"]
    assert "authorization" not in headers


def test_scope_override_rejects_table_scope(stack: Stack) -> None:
    response = stack.request("GET", SCOPED_PATH, token=stack.keys["read"])
    error = assert_deny(response, 403, "MISSING_SCOPE", "forbidden")
    assert "control:webhooks" in error["message"]


def test_scope_override_keeps_table_methods(stack: Stack) -> None:
    response = stack.request("DELETE", SCOPED_PATH, token=stack.keys["webhooks"])
    assert_deny(response, 405, "METHOD_NOT_ALLOWED", "method_not_allowed")
    assert response.headers["allow"] == "GET, HEAD"


def test_scope_override_keeps_key_checks(stack: Stack) -> None:
    response = stack.request("GET", SCOPED_PATH)
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


def test_table_scope_unchanged_elsewhere(stack: Stack) -> None:
    # /v1/usage/budget has no Envoy policy, so control:read still opens it.
    response = stack.request("GET", "/v1/usage/budget", token=stack.keys["read"])
    assert upstream_saw(response)["headers"]["x-hasp-scopes"] == ["control:read"]


# --- shadow mode ---


def test_shadow_route_allows_missing_key(stack: Stack) -> None:
    before = scrape(stack.local)

    response = stack.request("POST", SHADOW_PATH)

    assert_no_identity(upstream_saw(response))
    request_id = request_id_of(response)
    [line] = wait_until(
        lambda: log_entries(stack.local, event="would_deny", request_id=request_id),
        "a would_deny log line for the request",
    )
    assert line["code"] == "INVALID_API_KEY"
    assert line["key_id"] == "-"

    name = "hasp_authz_shadow_denials_total"

    def counted() -> float:
        after = scrape(stack.local)
        return sample_sum(after, name, code="INVALID_API_KEY") - sample_sum(
            before, name, code="INVALID_API_KEY"
        )

    wait_until(lambda: counted() >= 1, "the shadow denial is counted")
    assert counted() == 1


def test_shadow_route_hides_identity_on_missing_scope(stack: Stack) -> None:
    before = scrape(stack.local)

    response = stack.request("POST", SHADOW_PATH, token=stack.keys["chat"])

    assert_no_identity(upstream_saw(response))
    request_id = request_id_of(response)
    [line] = wait_until(
        lambda: log_entries(stack.local, event="would_deny", request_id=request_id),
        "a would_deny log line for the request",
    )
    assert line["code"] == "MISSING_SCOPE"
    assert line["key_id"] == stack.key_ids["chat"]
    assert line["org_id"] == "acme"
    assert line["route"] == SHADOW_PATH

    name = "hasp_authz_shadow_denials_total"
    labels = {"code": "MISSING_SCOPE", "route": SHADOW_PATH}
    wait_until(
        lambda: (
            sample(scrape(stack.local), name, **labels)
            >= sample(before, name, **labels) + 1
        ),
        "the shadow denial is counted with its route",
    )


def test_shadow_route_with_scope_sends_identity(stack: Stack) -> None:
    response = stack.request("POST", SHADOW_PATH, token=stack.keys["summarize"])

    headers = upstream_saw(response)["headers"]
    assert headers["x-hasp-org-id"] == ["acme"]
    assert headers["x-hasp-key-id"] == [stack.key_ids["summarize"]]
    assert headers["x-hasp-scopes"] == ["ai:summarize"]
    assert "authorization" not in headers
    request_id = request_id_of(response)
    # A later deny line of any kind shows that the log has caught up.
    marker = stack.request("POST", "/v1/ai/chat")
    wait_until(
        lambda: log_entries(stack.local, request_id=request_id_of(marker)),
        "the log line of a later deny",
    )
    assert log_entries(stack.local, event="would_deny", request_id=request_id) == []


def test_shadow_policy_covers_only_its_route(stack: Stack) -> None:
    # The shadow route covers one path, so other paths still require a key.
    response = stack.request("POST", "/v1/ai/embeddings")
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


# --- invalid policy ---


@pytest.mark.parametrize("path", ["/v1/audit", "/v1/api_keys"])
@pytest.mark.parametrize("key", [None, "read"])
def test_invalid_policy_fails_closed(stack: Stack, path: str, key: str | None) -> None:
    token = stack.keys[key] if key else None
    response = stack.request("GET", path, token=token)
    error = assert_deny(response, 503, "AUTH_UNAVAILABLE", "service_unavailable")
    assert error["retryable"] is True
    assert response.headers["retry-after"] == "1"
    assert "hasp_" not in error["message"]


# --- clients cannot set policy ---


@pytest.mark.parametrize(
    "header",
    [
        ("hasp_public", "true"),
        ("hasp-public", "true"),
        ("x-hasp-public", "true"),
        ("hasp_shadow", "true"),
        ("hasp-shadow", "true"),
        ("x-hasp-shadow", "true"),
        ("hasp-scope", "ai:chat"),
        ("context-extensions", "hasp_public=true"),
        ("x-envoy-original-path", "/v1/status"),
    ],
)
def test_client_headers_cannot_make_route_public(
    stack: Stack, header: tuple[str, str]
) -> None:
    response = stack.request("POST", "/v1/ai/chat", [header])
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


def test_client_query_cannot_make_route_public(stack: Stack) -> None:
    response = stack.request("POST", "/v1/ai/chat?hasp_public=true&hasp_shadow=true")
    assert_deny(response, 401, "INVALID_API_KEY", "unauthorized")


def test_client_header_cannot_change_scope(stack: Stack) -> None:
    response = stack.request(
        "GET", "/v1/usage/budget", [("hasp-scope", "ai:chat")], token=stack.keys["chat"]
    )
    assert_deny(response, 403, "MISSING_SCOPE", "forbidden")


def test_client_header_cannot_shadow_route(stack: Stack) -> None:
    response = stack.request(
        "GET",
        "/v1/usage/budget",
        [("x-hasp-shadow", "true"), ("hasp-shadow", "true")],
        token=stack.keys["chat"],
    )
    assert_deny(response, 403, "MISSING_SCOPE", "forbidden")


def test_keyed_route_records_org_in_access_log(stack: Stack) -> None:
    response = stack.request("POST", "/v1/ai/chat", token=stack.keys["chat"])
    assert response.status == 200
    request_id = response.headers["x-request-id"]

    def logged() -> list[dict]:
        return [
            entry
            for entry in stack.local.envoy_access_log()
            if entry.get("request_id") == request_id
        ]

    [entry] = wait_until(logged, "access log line of the keyed request")
    assert entry["org_id"] == "acme"
    assert entry["key_id"] == stack.key_ids["chat"]
    assert entry["scopes"] == "ai:chat"
    assert entry["policy"] is None


def test_demo_upstream_echoes_status_page(stack: Stack) -> None:
    # The demo upstream returns its JSON echo for /v1/status, as for every
    # other path, so a client sees what the upstream received.
    response = stack.request("GET", "/v1/status")
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body)["path"] == "/v1/status"
