"""envoy.yaml against the real Envoy binary: validation, rendering and behaviour.

The end-to-end tests run Envoy on free ports in front of the demo upstream. For
the cases where Envoy must pass the sidecar's response through, a small test-only
ext_authz servicer replaces hasp-authz. These tests therefore check Envoy's side
only: the local reply mapper's scope, header handling and path handling.
"""

from __future__ import annotations

import copy
import http.client
import json
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from hasp_authz.dev.envoy_config import (
    ENVOY_CONFIG_PATH,
    EnvoyConfigError,
    EnvoyProcess,
    find_envoy,
    load_envoy_config,
    render_envoy_config,
    start_envoy,
)
from hasp_authz.dev.redis_server import free_port
from hasp_authz.dev.upstream import EchoServer, serve_in_thread
from hasp_authz.proto import envoy_config_core_v3_pb2 as core_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc

REPO_ROOT = ENVOY_CONFIG_PATH.parent
OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14


def shipped_envoy_configs() -> list[Path]:
    """Return every YAML file at the root or under deploy/ that is an Envoy config."""
    candidates = [*REPO_ROOT.glob("*.yaml"), *REPO_ROOT.glob("deploy/**/*.yaml")]
    configs = []
    for path in sorted(candidates):
        documents = list(yaml.safe_load_all(path.read_text()))
        if any(
            isinstance(document, dict) and "static_resources" in document
            for document in documents
        ):
            configs.append(path)
    return configs


def validate_with_envoy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "--config-path", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def render_on_free_ports(**overrides: Any) -> tuple[str, dict[str, int]]:
    ports = {
        "listen_port": free_port(),
        "admin_port": free_port(),
        "authz_port": free_port(),
        "upstream_port": free_port(),
    }
    ports.update(overrides)
    return render_envoy_config(**ports), ports


# --- validation and rendering -------------------------------------------------


def test_envoy_yaml_among_shipped_configs() -> None:
    assert ENVOY_CONFIG_PATH in shipped_envoy_configs()


@pytest.mark.parametrize(
    "config_path",
    shipped_envoy_configs(),
    ids=lambda path: str(path.relative_to(REPO_ROOT)),
)
def test_shipped_config_passes_envoy_validation(config_path: Path) -> None:
    result = validate_with_envoy(config_path)
    assert result.returncode == 0, result.stdout + result.stderr


# envoy.yaml marks each commented-out example with these lines. Every line
# between them is YAML with "# " added after its indentation.
EXAMPLE_START = "# --- example: {name} ---"
EXAMPLE_END = "# --- end of example ---"
COMMENTED_EXAMPLES = ("shadow_route", "ratelimit")


def with_example_enabled(text: str, name: str) -> str:
    """Return envoy.yaml's ``text`` with the blocks of example ``name`` uncommented."""
    lines = []
    inside = False
    blocks = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == EXAMPLE_START.format(name=name):
            inside = True
            blocks += 1
        elif inside and stripped == EXAMPLE_END:
            inside = False
        elif inside:
            indent = line[: len(line) - len(line.lstrip())]
            assert stripped.startswith("# "), f"example {name}: {line!r}"
            lines.append(indent + stripped.removeprefix("# "))
        else:
            lines.append(line)
    assert blocks, f"no example {name!r} in envoy.yaml"
    assert not inside, f"example {name!r} lacks its end line"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", COMMENTED_EXAMPLES)
def test_commented_example_passes_envoy_validation(tmp_path: Path, name: str) -> None:
    original = ENVOY_CONFIG_PATH.read_text()
    enabled = with_example_enabled(original, name)
    assert enabled != original
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(enabled)

    result = validate_with_envoy(config_path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_ratelimit_example_keys_descriptor_on_org() -> None:
    config = yaml.safe_load(
        with_example_enabled(ENVOY_CONFIG_PATH.read_text(), "ratelimit")
    )
    manager = _http_connection_manager(config)
    filters = [entry["name"] for entry in manager["http_filters"]]
    # The rate limit filter reads the org_id that ext_authz sets, so it runs after.
    assert filters.index("envoy.filters.http.ratelimit") > filters.index(
        "envoy.filters.http.ext_authz"
    )
    _named(config["static_resources"]["clusters"], "ratelimit")
    checked = _named(_routes(config), "checked")
    [rate_limit] = checked["route"]["rate_limits"]
    assert rate_limit["actions"] == [
        {
            "metadata": {
                "descriptor_key": "org_id",
                "metadata_key": {
                    "key": "envoy.filters.http.ext_authz",
                    "path": [{"key": "org_id"}],
                },
                "source": "DYNAMIC",
            }
        }
    ]


def test_rendered_config_passes_envoy_validation(tmp_path: Path) -> None:
    text, _ = render_on_free_ports()
    rendered_path = tmp_path / "envoy.yaml"
    rendered_path.write_text(text)

    result = validate_with_envoy(rendered_path)

    assert result.returncode == 0, result.stdout + result.stderr


def _named(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(entry for entry in entries if entry["name"] == name)


def _http_connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = _named(config["static_resources"]["listeners"], "ingress")
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    [virtual_host] = _http_connection_manager(config)["route_config"]["virtual_hosts"]
    return virtual_host["routes"]


def _endpoint_address(cluster: dict[str, Any]) -> dict[str, Any]:
    lb_endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    return lb_endpoint["endpoint"]["address"]["socket_address"]


def test_render_rewrites_only_addresses_and_ports() -> None:
    original = load_envoy_config()

    rendered = yaml.safe_load(
        render_envoy_config(
            listen_port=18080,
            admin_port=19901,
            authz_port=19001,
            upstream_port=18000,
            authz_host="127.0.0.2",
            upstream_host="127.0.0.3",
        )
    )

    expected = copy.deepcopy(original)
    expected["admin"]["address"]["socket_address"].update(
        address="127.0.0.1", port_value=19901
    )
    resources = expected["static_resources"]
    _named(resources["listeners"], "ingress")["address"]["socket_address"].update(
        address="127.0.0.1", port_value=18080
    )
    _endpoint_address(_named(resources["clusters"], "upstream")).update(
        address="127.0.0.3", port_value=18000
    )
    _endpoint_address(_named(resources["clusters"], "hasp_authz")).update(
        address="127.0.0.2", port_value=19001
    )
    assert rendered == expected


def test_render_listen_host_is_configurable() -> None:
    text = render_envoy_config(
        listen_port=8080,
        admin_port=9901,
        authz_port=9001,
        upstream_port=8000,
        listen_host="0.0.0.0",
    )

    listener = _named(yaml.safe_load(text)["static_resources"]["listeners"], "ingress")
    assert listener["address"]["socket_address"]["address"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("section", "old_name"),
    [
        ("listeners", "ingress"),
        ("clusters", "upstream"),
        ("clusters", "hasp_authz"),
    ],
)
def test_render_raises_when_named_entry_missing(
    tmp_path: Path, section: str, old_name: str
) -> None:
    config = load_envoy_config()
    _named(config["static_resources"][section], old_name)["name"] = "renamed"
    source = tmp_path / "envoy.yaml"
    source.write_text(yaml.safe_dump(config))

    with pytest.raises(EnvoyConfigError, match=repr(old_name)):
        render_envoy_config(
            listen_port=8080,
            admin_port=9901,
            authz_port=9001,
            upstream_port=8000,
            source=source,
        )


EXTRA_ROUTE = {
    "name": "extra",
    "match": {"path": "/v1/extra"},
    "route": {"cluster": "upstream"},
    "typed_per_filter_config": {
        "envoy.filters.http.ext_authz": {
            "@type": (
                "type.googleapis.com/"
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
            ),
            "check_settings": {"context_extensions": {"hasp_shadow": "true"}},
        }
    },
}


def test_render_inserts_extra_routes_before_catch_all(tmp_path: Path) -> None:
    second = {**EXTRA_ROUTE, "name": "extra_2", "match": {"path": "/v1/extra2"}}
    original_names = [route["name"] for route in _routes(load_envoy_config())]

    text, _ = render_on_free_ports(extra_routes=[EXTRA_ROUTE, second])

    names = [route["name"] for route in _routes(yaml.safe_load(text))]
    assert names == [*original_names[:-1], "extra", "extra_2", "checked"]
    assert original_names[-1] == "checked"
    rendered_path = tmp_path / "envoy.yaml"
    rendered_path.write_text(text)
    result = validate_with_envoy(rendered_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_raises_without_catch_all_route(tmp_path: Path) -> None:
    config = load_envoy_config()
    _routes(config)[-1]["name"] = "renamed"
    source = tmp_path / "envoy.yaml"
    source.write_text(yaml.safe_dump(config))

    with pytest.raises(EnvoyConfigError, match="'checked'"):
        render_envoy_config(
            listen_port=8080,
            admin_port=9901,
            authz_port=9001,
            upstream_port=8000,
            extra_routes=[EXTRA_ROUTE],
            source=source,
        )


def test_render_raises_on_missing_source(tmp_path: Path) -> None:
    with pytest.raises(EnvoyConfigError, match="not found"):
        render_envoy_config(
            listen_port=8080,
            admin_port=9901,
            authz_port=9001,
            upstream_port=8000,
            source=tmp_path / "absent.yaml",
        )


# --- end to end against the real Envoy ----------------------------------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
) -> Reply:
    """Send one request to Envoy on 127.0.0.1, keeping repeated headers in order."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    try:
        connection.putrequest(method, path)
        for name, value in headers or []:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        return Reply(
            response.status, response.headers, body, time.monotonic() - started
        )
    finally:
        connection.close()


def wait_for_access_log(envoy: EnvoyProcess, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        for entry in envoy.access_log_entries():
            if entry.get("request_id") == request_id:
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for request id {request_id}")
        time.sleep(0.05)


CheckHandler = Callable[[auth_pb2.CheckRequest], auth_pb2.CheckResponse]


class StandInAuthz(auth_grpc.AuthorizationServicer):
    """Test-only ext_authz servicer: records requests, returns what a test sets."""

    def __init__(self) -> None:
        self.handler: CheckHandler = allow_with_identity
        self.requests: list[auth_pb2.CheckRequest] = []

    def Check(
        self, request: auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> auth_pb2.CheckResponse:
        self.requests.append(request)
        return self.handler(request)


def allow_with_identity(request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
    response = auth_pb2.CheckResponse()
    response.status.code = GRPC_OK
    for name, value in [
        ("x-hasp-org-id", "org_test"),
        ("x-hasp-key-id", "key_test"),
        ("x-hasp-scopes", "ai:chat"),
    ]:
        option = response.ok_response.headers.add()
        option.header.key = name
        option.header.value = value
        option.append_action = OVERWRITE
    response.ok_response.headers_to_remove.append("authorization")
    response.dynamic_metadata.update(
        {"org_id": "org_test", "key_id": "key_test", "scopes": "ai:chat"}
    )
    return response


def deny(
    status: int, grpc_code: int, body: dict[str, Any], headers: dict[str, str]
) -> CheckHandler:
    def handler(request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
        response = auth_pb2.CheckResponse()
        response.status.code = grpc_code
        response.denied_response.status.code = status
        response.denied_response.body = json.dumps(body)
        for name, value in headers.items():
            option = response.denied_response.headers.add()
            option.header.key = name
            option.header.value = value
            option.append_action = OVERWRITE
        return response

    return handler


def sleep_then_allow(request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
    time.sleep(2)
    return allow_with_identity(request)


@dataclass
class Stack:
    envoy: EnvoyProcess
    upstream: EchoServer
    authz: StandInAuthz
    port: int


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoServer]:
    server = serve_in_thread("127.0.0.1", 0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_stack(
    tmp_path_factory: pytest.TempPathFactory, upstream: EchoServer
) -> Iterator[Stack]:
    authz = StandInAuthz()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    auth_grpc.add_AuthorizationServicer_to_server(authz, server)
    authz_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    text, ports = render_on_free_ports(
        authz_port=authz_port, upstream_port=upstream.port
    )
    try:
        with start_envoy(text, tmp_path_factory.mktemp("envoy")) as envoy:
            yield Stack(envoy, upstream, authz, ports["listen_port"])
    finally:
        server.stop(grace=None)


@pytest.fixture
def stack(module_stack: Stack) -> Stack:
    module_stack.authz.handler = allow_with_identity
    module_stack.authz.requests.clear()
    return module_stack


@pytest.fixture(scope="module")
def envoy_without_sidecar(
    tmp_path_factory: pytest.TempPathFactory, upstream: EchoServer
) -> Iterator[Stack]:
    """Envoy whose authz cluster points at a free port where nothing listens."""
    text, ports = render_on_free_ports(upstream_port=upstream.port)
    with start_envoy(text, tmp_path_factory.mktemp("envoy-no-sidecar")) as envoy:
        yield Stack(envoy, upstream, StandInAuthz(), ports["listen_port"])


def assert_auth_unavailable_reply(reply: Reply) -> None:
    """Check Envoy's own 503 against the JSON error contract, field by field."""
    assert reply.status == 503
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["retry-after"] == "1"
    request_id = reply.headers["x-request-id"]
    assert request_id
    assert reply.json() == {
        "success": False,
        "error": {
            "code": "AUTH_UNAVAILABLE",
            "type": "service_unavailable",
            "message": (
                "The authorization service is unavailable. "
                "Retry the request in a moment."
            ),
            "retryable": True,
            "request_id": f"req_{request_id}",
        },
    }


@pytest.mark.e2e
def test_unreachable_sidecar_gives_json_503(envoy_without_sidecar: Stack) -> None:
    requests_before = envoy_without_sidecar.upstream.request_count

    reply = send(
        envoy_without_sidecar.port,
        "POST",
        "/v1/ai/chat",
        [("authorization", "Bearer hasp_key_live_" + "A" * 32)],
    )

    assert_auth_unavailable_reply(reply)
    assert envoy_without_sidecar.upstream.request_count == requests_before
    entry = wait_for_access_log(
        envoy_without_sidecar.envoy, reply.headers["x-request-id"]
    )
    assert entry["response_code_details"] == "ext_authz_error"
    assert entry["status"] == 503


@pytest.mark.e2e
def test_envoy_replaces_client_request_id(
    envoy_without_sidecar: Stack,
) -> None:
    reply = send(
        envoy_without_sidecar.port,
        "GET",
        "/v1/usage",
        [("x-request-id", 'client"id')],
    )

    assert_auth_unavailable_reply(reply)
    assert reply.headers["x-request-id"] != 'client"id'


@pytest.mark.e2e
def test_slow_sidecar_gives_json_503(stack: Stack) -> None:
    stack.authz.handler = sleep_then_allow
    requests_before = stack.upstream.request_count

    reply = send(stack.port, "POST", "/v1/ai/chat")

    assert_auth_unavailable_reply(reply)
    # envoy.yaml sets a 0.5 s timeout on the Check call.
    assert 0.4 < reply.elapsed < 1.5
    assert stack.upstream.request_count == requests_before


SIDECAR_DENIALS = {
    "baa-402": (
        402,
        GRPC_PERMISSION_DENIED,
        {"success": False, "error": {"code": "BAA_REQUIRED", "request_id": "req_a"}},
        {"content-type": "application/json", "x-test-marker": "from-sidecar"},
    ),
    "sidecar-503": (
        503,
        GRPC_UNAVAILABLE,
        {
            "success": False,
            "error": {"code": "AUTH_UNAVAILABLE", "request_id": "req_b"},
        },
        {"content-type": "application/json", "retry-after": "7"},
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", SIDECAR_DENIALS.keys())
def test_sidecar_denial_passes_through_unchanged(stack: Stack, case: str) -> None:
    status, grpc_code, body, headers = SIDECAR_DENIALS[case]
    stack.authz.handler = deny(status, grpc_code, body, headers)
    requests_before = stack.upstream.request_count

    reply = send(stack.port, "GET", "/v1/usage")

    assert reply.status == status
    assert reply.body == json.dumps(body).encode()
    for name, value in headers.items():
        assert reply.headers[name] == value
    assert stack.upstream.request_count == requests_before
    entry = wait_for_access_log(stack.envoy, reply.headers["x-request-id"])
    assert entry["response_code_details"] == "ext_authz_denied"


@pytest.mark.e2e
def test_allow_forwards_sidecar_identity_only(stack: Stack) -> None:
    reply = send(
        stack.port,
        "POST",
        "/v1/ai/chat?stream=true",
        [
            ("authorization", "Bearer hasp_key_live_" + "A" * 32),
            ("x-hasp-org-id", "org_spoofed"),
            ("x-hasp-extra", "spoofed"),
            ("x_hasp_key_id", "key_spoofed"),
            ("accept", "application/json"),
        ],
    )

    assert reply.status == 200
    echoed = reply.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/ai/chat?stream=true"
    upstream_headers = echoed["headers"]
    assert upstream_headers["x-hasp-org-id"] == ["org_test"]
    assert upstream_headers["x-hasp-key-id"] == ["key_test"]
    assert upstream_headers["x-hasp-scopes"] == ["ai:chat"]
    assert "x-hasp-extra" not in upstream_headers
    assert "x_hasp_key_id" not in upstream_headers
    assert "authorization" not in upstream_headers
    assert upstream_headers["accept"] == ["application/json"]

    entry = wait_for_access_log(stack.envoy, reply.headers["x-request-id"])
    assert entry["org_id"] == "org_test"
    assert entry["key_id"] == "key_test"
    assert entry["scopes"] == "ai:chat"
    assert entry["path"] == "/v1/ai/chat"


@pytest.mark.e2e
def test_check_request_has_allowed_headers_only(stack: Stack) -> None:
    reply = send(
        stack.port,
        "GET",
        "/v1/usage?month=1",
        [
            ("authorization", "Bearer k"),
            ("x-hasp-org-id", "org_spoofed"),
            ("cookie", "session=1"),
            ("user-agent", "test"),
        ],
    )

    assert reply.status == 200
    [check] = stack.authz.requests
    http_request = check.attributes.request.http
    header_map = [
        (header.key, header.raw_value) for header in http_request.header_map.headers
    ]
    assert sorted(header_map) == [
        ("authorization", b"Bearer k"),
        ("x-request-id", reply.headers["x-request-id"].encode()),
    ]
    # encode_raw_headers fills header_map and leaves the string map empty.
    assert dict(http_request.headers) == {}
    assert http_request.method == "GET"
    assert http_request.path == "/v1/usage?month=1"


@pytest.mark.e2e
def test_repeated_authorization_arrives_joined(stack: Stack) -> None:
    send(
        stack.port,
        "GET",
        "/v1/usage",
        [("authorization", "Bearer one"), ("authorization", "Bearer two")],
    )

    [check] = stack.authz.requests
    values = [
        header.raw_value
        for header in check.attributes.request.http.header_map.headers
        if header.key == "authorization"
    ]
    assert values == [b"Bearer one,Bearer two"]


@pytest.mark.e2e
def test_path_is_normalized_before_check(stack: Stack) -> None:
    reply = send(stack.port, "GET", "/v1/x/..//usage/./")

    assert reply.status == 200
    [check] = stack.authz.requests
    assert check.attributes.request.http.path == "/v1/usage/"
    assert reply.json()["path"] == "/v1/usage/"


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/v1/api_keys%2Fx", "/v1/api_keys%5cx"])
def test_escaped_slash_rejected_before_check(stack: Stack, path: str) -> None:
    requests_before = stack.upstream.request_count

    reply = send(stack.port, "GET", path)

    assert reply.status == 400
    assert stack.authz.requests == []
    assert stack.upstream.request_count == requests_before


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_public_route_sends_public_policy(stack: Stack, method: str) -> None:
    reply = send(stack.port, method, "/v1/status")

    assert reply.status == 200
    [check] = stack.authz.requests
    assert dict(check.attributes.context_extensions) == {"hasp_public": "true"}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/status"),
        ("GET", "/v1/status/"),
        ("GET", "/v1/ai/chat"),
    ],
)
def test_other_routes_send_no_policy(stack: Stack, method: str, path: str) -> None:
    send(stack.port, method, path, [("hasp-public", "true")])

    [check] = stack.authz.requests
    assert dict(check.attributes.context_extensions) == {}


def _admin_stats(envoy: EnvoyProcess, name_regex: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", envoy.admin_port, timeout=5)
    try:
        connection.request("GET", f"/stats?filter={urllib.parse.quote(name_regex)}")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


@pytest.mark.e2e
def test_route_rate_limits_inert_without_filter(stack: Stack) -> None:
    # allow_with_identity sets org_id, so the `checked` route's rate_limits
    # action has its input. Without the rate limit filter nothing uses it.
    reply = send(stack.port, "POST", "/v1/ai/chat")

    assert reply.status == 200
    assert "x-envoy-ratelimited" not in reply.headers
    # The rate limit filter counts its calls in cluster.<name>.ratelimit.*.
    assert _admin_stats(stack.envoy, r"\.ratelimit\.") == ""
