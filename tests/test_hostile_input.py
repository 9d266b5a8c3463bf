"""Hostile input on the Check path: generated requests and a spoofing table.

Property tests: hypothesis builds arbitrary CheckRequests. They carry odd
methods, and paths with control, non-ASCII and percent-encoded characters up to
64 KiB. Header names come in any case, duplicated, hundreds at a time, with
raw_value bytes that are not UTF-8, and parts of the message are left out. Each
request goes over a real gRPC channel to AuthorizationServicer on an in-process
grpc.aio server, whose Authorizer reads a real Redis copy seeded with one key.
The response must be well formed, no exception may reach the log, and its HTTP
status must equal the one that ``expected_status`` derives from the decision
table. That oracle allows only exactly one ``Bearer <token>`` of the seeded key,
on a route that the key's scopes cover, with a method that the route allows.

Spoofing table: path-confusion and header-spoofing requests, each sent as raw
HTTP/1.1 through the real Envoy stack and as a CheckRequest straight to that
stack's hasp-authz. Each row states both expected statuses and, where they
differ, why.

Set HYPOTHESIS_PROFILE=thorough for a longer search than the default "ci".
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import socket
import string
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hasp_authz.authorizer import Authorizer
from hasp_authz.dev.stack import LocalStack, StackPorts
from hasp_authz.proto import envoy_config_core_v3_pb2 as core_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.routes import RouteTable, load_route_table, parse_route_table
from hasp_authz.servicer import AuthorizationServicer
from hasp_authz.store import RedisKeyCopy
from hasp_authz.tokens import generate_token, hash_token

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
settings.register_profile(
    "thorough", parent=settings.get_profile("ci"), max_examples=5000
)
# Decorate property tests with this, so the profile applies to this file and
# test_fuzz_check.py without changing hypothesis' defaults for other tests.
HYPOTHESIS_SETTINGS = settings(
    settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
)

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
RPC_TIMEOUT_SECONDS = 10.0
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14
OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# The one key in the in-process server's Redis copy. The token is random per run.
TOKEN = generate_token()
KEY = KeyRecord("key_hostile", "org_hostile", ("ai:chat", "ai:documents"))
# Well formed, but never written to Redis.
UNKNOWN_TOKEN = generate_token()

# The in-process server's route table, equal to the packaged routes.yaml, as
# (template, methods, scope). The oracle reads it from here, not through the
# code it checks.
DEFAULT_ROUTES = [
    ("/v1/ai/chat", {"POST"}, "ai:chat"),
    ("/v1/messages", {"POST"}, "ai:chat"),
    ("/v1/ai/documents", {"GET", "POST"}, "ai:documents"),
    ("/v1/ai/documents/{id}", {"GET"}, "ai:documents"),
    ("/v1/ai/embeddings", {"POST"}, "ai:embeddings"),
    ("/v1/ai/summarize", {"POST"}, "ai:summarize"),
    ("/v1/api_keys", {"GET", "POST"}, "control:read"),
    ("/v1/usage", {"GET"}, "control:read"),
    ("/v1/usage/budget", {"GET", "PUT"}, "control:read"),
    ("/v1/audit", {"GET"}, "control:read"),
    ("/v1/webhooks", {"GET", "POST"}, "control:webhooks"),
    ("/v1/webhooks/{id}", {"DELETE"}, "control:webhooks"),
]
# HTTP status -> (code, type, retryable), the documented decision table.
DENY_TABLE = {
    401: ("INVALID_API_KEY", "unauthorized", False),
    402: ("BAA_REQUIRED", "payment_required", False),
    403: ("MISSING_SCOPE", "forbidden", False),
    404: ("NOT_FOUND", "not_found", False),
    405: ("METHOD_NOT_ALLOWED", "method_not_allowed", False),
    503: ("AUTH_UNAVAILABLE", "service_unavailable", True),
}
IDENTITY_HEADERS = ("x-hasp-org-id", "x-hasp-key-id", "x-hasp-scopes")
REQUEST_ID_RE = re.compile(r"req_[A-Za-z0-9._-]{1,128}", re.ASCII)
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


# --- the oracle ---


def sent_headers(
    http: auth_pb2.AttributeContext.HttpRequest,
) -> list[tuple[str, bytes]]:
    """Return the request's header lines as (lower-case name, value bytes).

    This is the reading that the servicer documents: ``header_map`` when it has
    entries, else the legacy ``headers`` map. An entry's bytes are its
    raw_value, or its value when raw_value is empty.
    """
    if http.header_map.headers:
        return [
            (header.key.lower(), header.raw_value or header.value.encode("utf-8"))
            for header in http.header_map.headers
        ]
    return [
        (name.lower(), value.encode("utf-8")) for name, value in http.headers.items()
    ]


def is_bearer_of(value: bytes, token: str) -> bool:
    """Tell whether an Authorization value is ``Bearer <token>``.

    The scheme is case-insensitive (RFC 7235), and exactly one space follows it.
    """
    scheme, separator, credential = value.partition(b" ")
    return (
        scheme.lower() == b"bearer"
        and separator == b" "
        and credential == token.encode()
    )


def canonical_segments(path: str) -> list[str] | None:
    """Split a path without its query into segments, or None if not canonical."""
    path = path.split("?", 1)[0]
    if not path.startswith("/"):
        return None
    segments = path[1:].split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not set(segment) <= UNRESERVED:
            return None
    return segments


def matching_route(path: str) -> tuple[str, set[str], str] | None:
    segments = canonical_segments(path)
    if segments is None:
        return None
    for route in DEFAULT_ROUTES:
        template = route[0][1:].split("/")
        if len(template) == len(segments) and all(
            expected.startswith("{") or expected == actual
            for expected, actual in zip(template, segments, strict=True)
        ):
            return route
    return None


def expected_status(
    request: auth_pb2.CheckRequest,
    token: str = TOKEN,
    scopes: tuple[str, ...] = KEY.scopes,
) -> int:
    """Return the HTTP status the decision table gives for ``request``.

    ``token`` is the only key that the copy holds, with ``scopes``, and its org
    has a BAA, so the outcome is 200, 401, 403, 404 or 405.
    """
    http = request.attributes.request.http
    credentials = [
        value for name, value in sent_headers(http) if name == "authorization"
    ]
    if len(credentials) != 1 or not is_bearer_of(credentials[0], token):
        return 401
    route = matching_route(http.path)
    if route is None:
        return 404
    _, methods, scope = route
    if ("GET" if http.method == "HEAD" else http.method) not in methods:
        return 405
    if scope not in scopes:
        return 403
    return 200


# --- checks on the response ---


def assert_well_formed(response: auth_pb2.CheckResponse) -> int:
    """Check the response against the documented contract and return its status."""
    kind = response.WhichOneof("http_response")
    assert kind in ("ok_response", "denied_response"), f"http_response is {kind}"
    if kind == "ok_response":
        assert response.status.code == GRPC_OK
        return 200

    denied = response.denied_response
    status = denied.status.code
    assert status in DENY_TABLE, f"undocumented deny status {status}"
    code, error_type, retryable = DENY_TABLE[status]
    grpc_code = GRPC_UNAVAILABLE if status == 503 else GRPC_PERMISSION_DENIED
    assert response.status.code == grpc_code

    body = json.loads(denied.body)
    assert set(body) == {"success", "error"}
    assert body["success"] is False
    error = body["error"]
    assert set(error) == {"code", "type", "message", "retryable", "request_id"}
    assert error["code"] == code
    assert error["type"] == error_type
    assert error["retryable"] is retryable
    assert isinstance(error["message"], str)
    assert error["message"]
    assert REQUEST_ID_RE.fullmatch(error["request_id"]), error["request_id"]

    names = [option.header.key for option in denied.headers]
    assert len(names) == len(set(names)), f"repeated deny headers {names}"
    headers = {option.header.key: option.header.value for option in denied.headers}
    assert headers["content-type"] == "application/json"
    if status == 401:
        assert headers["www-authenticate"].startswith('Bearer realm="hasp"')
    if status == 405:
        assert headers["allow"]
    if status == 503:
        assert headers["retry-after"] == "1"
    return status


def assert_allow_replaces_identity(
    response: auth_pb2.CheckResponse, request: auth_pb2.CheckRequest
) -> None:
    """Check that an allow sets the identity and removes the client's headers."""
    ok = response.ok_response
    identity = {option.header.key: option.header.value for option in ok.headers}
    assert identity == {
        "x-hasp-org-id": KEY.org_id,
        "x-hasp-key-id": KEY.key_id,
        "x-hasp-scopes": " ".join(KEY.scopes),
    }
    for option in ok.headers:
        assert option.append_action == OVERWRITE
    client_hasp = {
        name
        for name, _ in sent_headers(request.attributes.request.http)
        if name.startswith("x-hasp-") and name not in IDENTITY_HEADERS
    }
    assert set(ok.headers_to_remove) == {"authorization", *client_hasp}


# --- the in-process server ---


class LogRecorder(logging.Handler):
    """Keeps every log record of the process, for checks after each request."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def drain(self) -> list[logging.LogRecord]:
        """Return the records since the previous call and forget them."""
        with self.lock:
            taken, self.records = self.records, []
        return taken


class InProcessAuthz:
    """AuthorizationServicer on a grpc.aio server with its own thread and loop.

    The Authorizer reads Redis at ``redis_url`` under ``layout``, with a long
    check budget so that a slow test machine never turns a decision into 503.
    """

    def __init__(self, redis_url: str, layout: RedisLayout, routes: RouteTable):
        self.redis_url = redis_url
        self.layout = layout
        self.routes = routes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="in-process-authz", daemon=True
        )
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.client: redis.asyncio.Redis | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        self.thread.start()
        self._run(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = auth_grpc.AuthorizationStub(self.channel)
        # Sends bytes as they are, so the server parses exactly what was fuzzed.
        self.check_bytes = self.channel.unary_unary(
            CHECK_METHOD,
            request_serializer=None,
            response_deserializer=auth_pb2.CheckResponse.FromString,
        )

    def check(self, request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
        return self.stub.Check(request, timeout=RPC_TIMEOUT_SECONDS)

    def stop(self) -> None:
        """Stop whatever ``start`` got to, so a failed start still cleans up."""
        if self.channel is not None:
            self.channel.close()
        if self.thread.is_alive():
            self._run(self._stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        self.loop.close()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=20)

    async def _start(self) -> None:
        self.client = redis.asyncio.Redis.from_url(
            self.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        authorizer = Authorizer(RedisKeyCopy(self.client, self.layout), self.routes)
        servicer = AuthorizationServicer(authorizer, budget_seconds=5.0)
        self.server = grpc.aio.server()
        auth_grpc.add_AuthorizationServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
        if self.client is not None:
            await self.client.aclose()


@dataclass
class Authz:
    server: InProcessAuthz
    logs: LogRecorder

    def check(self, request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
        return self.server.check(request)

    def assert_clean_log(self) -> None:
        """Fail on any exception, error or secret logged since the previous call."""
        secrets = (TOKEN, TOKEN.removeprefix("hasp_key_live_"), hash_token(TOKEN))
        for record in self.logs.drain():
            text = record.getMessage()
            assert record.exc_info is None, f"exception logged: {text}"
            assert record.levelno < logging.ERROR, f"error logged: {text}"
            assert "Traceback" not in text
            for secret in secrets:
                assert secret not in text, f"secret logged by {record.name}"


@contextmanager
def running_authz(redis_url: str) -> Iterator[Authz]:
    """Seed a Redis copy with KEY under a fresh prefix and serve Check on it."""
    layout = RedisLayout(f"hasp-hostile-{uuid.uuid4().hex[:12]}:")
    seeder = redis.Redis.from_url(redis_url)
    seeder.set(layout.key(hash_token(TOKEN)), KEY.to_json())
    seeder.set(layout.org(KEY.org_id), OrgRecord(KEY.org_id, baa_active=True).to_json())
    seeder.set(layout.complete_marker, json.dumps({"keys": 1, "orgs": 1}))

    recorder = LogRecorder()
    root = logging.getLogger()
    package = logging.getLogger("hasp_authz")
    previous_level = package.level
    root.addHandler(recorder)
    package.setLevel(logging.DEBUG)
    routes = parse_route_table(
        {
            "routes": [
                {"path": template, "methods": sorted(methods), "scope": scope}
                for template, methods, scope in DEFAULT_ROUTES
            ]
        }
    )
    server = InProcessAuthz(redis_url, layout, routes)
    try:
        server.start()
        yield Authz(server, recorder)
    finally:
        server.stop()
        root.removeHandler(recorder)
        package.setLevel(previous_level)
        keys = list(seeder.scan_iter(match=f"{layout.prefix}*"))
        if keys:
            seeder.delete(*keys)
        seeder.close()


@pytest.fixture(scope="module")
def authz(redis_url: str) -> Iterator[Authz]:
    with running_authz(redis_url) as running:
        yield running


# --- strategies ---

ROUTE_PATHS = [template.replace("{id}", "item_1") for template, _, _ in DEFAULT_ROUTES]
# Pieces that path-confusion attacks put into a path.
PATH_PIECES = [
    "/", "//", ".", "..", "/./", "/../", "%2f", "%2F", "%5c", "%5C", "\\",
    "%2e", "%2e%2e", ";", ";a=b", "?", "?next=/v1/usage", "#", "#x", "%00",
    "\x00", "\t", " ", "\r\n", "\x7f", "\u00e9", "\u200b", "\ufeff", "\uff0f",
    "~", "%", "{id}", "*", "A",
]  # fmt: skip
METHODS = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
    "CONNECT", "get", "post", "Post", " POST", "POST ", "POST\x00", "",
    "PROPFIND",
]  # fmt: skip
AUTHORIZATION_NAMES = [
    "authorization",
    "Authorization",
    "AUTHORIZATION",
    "aUtHoRiZaTiOn",
]
OTHER_HEADER_NAMES = [
    "authorization ", " authorization", "authorization\x00", "authorisation",
    "proxy-authorization", "x-hasp-org-id", "X-Hasp-Key-Id", "x-hasp-scopes",
    "X-HASP-ADMIN", "x-hasp-", "x_hasp_org_id", "x-request-id", "X-Request-Id",
    "x-http-method-override", ":path", ":method", ":authority", "cookie",
]  # fmt: skip
AUTHORIZATION_VALUES = [
    f"Bearer {TOKEN}",
    f"bearer {TOKEN}",
    f"BEARER {TOKEN}",
    f"BeArEr {TOKEN}",
    f"Bearer  {TOKEN}",
    f" Bearer {TOKEN}",
    f"Bearer {TOKEN} ",
    f"Bearer\t{TOKEN}",
    f"Bearer\u00a0{TOKEN}",
    f"Bearer {TOKEN}\n",
    f"Bearer {TOKEN}\x00",
    f"Bearer {TOKEN.lower()}",
    f"Bearer {TOKEN[:20]}\u200b{TOKEN[20:]}",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN}0",
    f"Bearer {TOKEN},Bearer {TOKEN}",
    f"Bearer {TOKEN}, Bearer {UNKNOWN_TOKEN}",
    f"Bearer {UNKNOWN_TOKEN}",
    f"Basic {TOKEN}",
    f"Token {TOKEN}",
    TOKEN,
    "Bearer",
    "Bearer ",
    "",
]


@st.composite
def mutated_paths(draw: st.DrawFn, base: str | None = None) -> str:
    """Return a route path with confusing pieces put in and its case changed."""
    path = base if base is not None else draw(st.sampled_from(ROUTE_PATHS))
    for _ in range(draw(st.integers(0, 3))):
        piece = draw(st.sampled_from(PATH_PIECES) | st.text(max_size=4))
        # The end half the time: a suffix keeps the rest of the route intact.
        at = draw(st.just(len(path)) | st.integers(0, len(path)))
        path = path[:at] + piece + path[at:]
    change_case = draw(st.sampled_from([str, str, str.upper, str.swapcase]))
    return change_case(path)


# Up to 64 KiB of one repeated piece after a prefix. "/v1/ai/documents/" and
# "a" make a canonical path of one long segment, which the seeded key may call.
long_paths = st.builds(
    lambda prefix, piece, count: prefix + piece * count,
    st.sampled_from(["/v1/ai/documents/", "/v1/ai/chat", "/", ""]),
    st.sampled_from(["a", "/", ".", "%2f", "\u00e9", "/.."]),
    st.sampled_from([4095, 4096, 65535, 65536]) | st.integers(0, 64 * 1024),
)


def _served_calls() -> list[tuple[str, str]]:
    """Return every method and template that the route table serves, with HEAD."""
    calls = []
    for template, route_methods, _ in DEFAULT_ROUTES:
        served = set(route_methods) | ({"HEAD"} if "GET" in route_methods else set())
        calls += [(method, template) for method in sorted(served)]
    return calls


# Values for a {id} segment: unreserved text, which matches, and look-alikes.
path_ids = st.one_of(
    st.just("item_1"),
    st.text(alphabet=sorted(UNRESERVED), min_size=1, max_size=12),
    st.sampled_from([".", "..", "...", "%2e", "%2e%2e", "a;b", "a%2fb", "", "a b"]),
    st.text(max_size=6),
)


@st.composite
def route_call(draw: st.DrawFn) -> tuple[str, str]:
    """Return a served method and path, with a drawn value for any {id}."""
    method, template = draw(st.sampled_from(_served_calls()))
    return method, template.replace("{id}", draw(path_ids))


route_calls = route_call()
paths = st.one_of(
    st.sampled_from(ROUTE_PATHS), mutated_paths(), long_paths, st.text(max_size=100)
)
# The query string never takes part in the match.
query_strings = st.one_of(
    st.just(""),
    st.sampled_from(["?", "?a=1", "?next=/v1/usage", "?x=%2f..%2f", "?#"]),
    st.text(max_size=20).map(lambda query: "?" + query),
)
methods = st.one_of(
    st.sampled_from(["POST", "GET", "HEAD"]),
    st.sampled_from(METHODS),
    st.text(max_size=12),
)
# (method, path): served calls, the same with their path mutated, and arbitrary
# pairs, often with a query string.
calls = st.tuples(
    st.one_of(
        route_calls,
        route_calls.flatmap(
            lambda call: st.tuples(st.just(call[0]), mutated_paths(call[1]))
        ),
        st.tuples(methods, st.sampled_from(ROUTE_PATHS)),
        st.tuples(methods, paths),
    ),
    query_strings,
).map(lambda pair: (pair[0][0], pair[0][1] + pair[1]))
other_header_names = st.sampled_from(OTHER_HEADER_NAMES) | st.text(max_size=24)
# Values as bytes: raw_value carries bytes, and anything that is not UTF-8 is
# sent only that way.
header_values = st.one_of(
    st.sampled_from(AUTHORIZATION_VALUES).map(str.encode),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
    st.sampled_from(AUTHORIZATION_VALUES).map(lambda value: value.encode() + b"\xff"),
)


@st.composite
def header_lines(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Return Authorization lines and other drawn headers among harmless ones.

    A third of the time the only Authorization line is the valid key, so the
    later decision steps are reached, not only the 401.
    """
    filler = draw(st.integers(0, 400))
    lines = [(f"x-filler-{index}", b"1") for index in range(filler)]
    credentials = draw(
        st.sampled_from(["valid", "valid", "valid+other", "one", "several", "none"])
    )
    drawn: list[tuple[str, bytes]] = []
    if credentials.startswith("valid"):
        name = draw(st.sampled_from(AUTHORIZATION_NAMES))
        drawn.append((name, f"Bearer {TOKEN}".encode()))
    if credentials in ("valid+other", "one", "several"):
        for _ in range(draw(st.integers(2, 4)) if credentials == "several" else 1):
            name = draw(st.sampled_from(AUTHORIZATION_NAMES) | st.text(max_size=16))
            drawn.append((name, draw(header_values)))
    for _ in range(draw(st.integers(0, 8))):
        drawn.append((draw(other_header_names), draw(header_values)))
    for line in drawn:
        lines.insert(draw(st.integers(0, len(lines))), line)
    return lines


def _add_header_map_entry(
    http: auth_pb2.AttributeContext.HttpRequest, name: str, value: bytes, form: str
) -> None:
    entry = http.header_map.headers.add(key=name)
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        form = "raw_value"
    if form == "raw_value":
        entry.raw_value = value
    elif form == "value":
        entry.value = text
    else:
        entry.raw_value = value
        entry.value = f"decoy {text}"


def _fill_headers_map(
    http: auth_pb2.AttributeContext.HttpRequest, lines: list[tuple[str, bytes]]
) -> None:
    # Envoy joins repeated headers with commas in this map. Names keep their case
    # here, so "Authorization" and "authorization" stay two entries.
    for name, value in lines:
        text = value.decode("utf-8", errors="replace")
        previous = http.headers.get(name)
        http.headers[name] = text if previous is None else f"{previous},{text}"


@st.composite
def check_requests(draw: st.DrawFn) -> auth_pb2.CheckRequest:
    """Return a CheckRequest with drawn fields, headers and missing parts."""
    left_out = draw(
        st.sampled_from([None, None, None, "attributes", "request", "http"])
    )
    if left_out == "attributes":
        return auth_pb2.CheckRequest()
    attributes = auth_pb2.AttributeContext()
    attributes.source.address.socket_address.address = "127.0.0.1"
    if left_out == "request":
        return auth_pb2.CheckRequest(attributes=attributes)
    attributes.request.time.GetCurrentTime()
    if left_out == "http":
        return auth_pb2.CheckRequest(attributes=attributes)

    http = attributes.request.http
    http.id = draw(st.sampled_from(["", "12345"]) | st.text(max_size=20))
    http.method, http.path = draw(calls)
    http.host = draw(st.sampled_from(["api.example.test", ""]) | st.text(max_size=20))
    encoding = draw(st.sampled_from(["header_map", "headers", "both", "none"]))
    lines = draw(header_lines())
    if encoding in ("header_map", "both"):
        for name, value in lines:
            form = draw(st.sampled_from(["raw_value", "value", "both"]))
            _add_header_map_entry(http, name, value, form)
    if encoding == "headers":
        _fill_headers_map(http, lines)
    if encoding == "both":
        _fill_headers_map(http, draw(header_lines()))
    return auth_pb2.CheckRequest(attributes=attributes)


# --- property tests, in process ---


def check_and_verify(authz: Authz, request: auth_pb2.CheckRequest) -> int:
    """Send ``request`` and verify the response, the oracle and the log."""
    response = authz.check(request)
    status = assert_well_formed(response)
    assert status == expected_status(request)
    if status == 200:
        assert_allow_replaces_identity(response, request)
    serialized = response.SerializeToString()
    assert TOKEN.encode() not in serialized
    assert hash_token(TOKEN).encode() not in serialized
    authz.assert_clean_log()
    return status


@HYPOTHESIS_SETTINGS
@given(request=check_requests())
def test_check_arbitrary_request_follows_oracle(authz: Authz, request) -> None:
    check_and_verify(authz, request)


@HYPOTHESIS_SETTINGS
@given(
    call=calls,
    name=st.sampled_from(AUTHORIZATION_NAMES),
    value=st.just(f"Bearer {TOKEN}") | st.sampled_from(AUTHORIZATION_VALUES),
    others=st.lists(st.tuples(other_header_names, header_values), max_size=6),
    filler=st.integers(0, 300),
)
def test_check_near_valid_request_follows_oracle(
    authz: Authz,
    call: tuple[str, str],
    name: str,
    value: str,
    others: list[tuple[str, bytes]],
    filler: int,
) -> None:
    # One Authorization line, valid half the time, so that most requests reach
    # the route, method and scope steps.
    http = auth_pb2.AttributeContext.HttpRequest(method=call[0], path=call[1])
    for index in range(filler):
        http.header_map.headers.add(key=f"x-filler-{index}", raw_value=b"1")
    http.header_map.headers.add(key=name, raw_value=value.encode())
    for other_name, other_value in others:
        http.header_map.headers.add(key=other_name, raw_value=other_value)
    request = auth_pb2.CheckRequest(
        attributes=auth_pb2.AttributeContext(
            request=auth_pb2.AttributeContext.Request(http=http)
        )
    )
    check_and_verify(authz, request)


# Calls at the edge of canonical, each sent with the valid key. The expected
# status comes from the oracle, so this table also checks the oracle's reading.
EDGE_CALLS = [
    ("GET", "/v1/ai/documents/", 404),
    ("GET", "/v1/ai/documents/.", 404),
    ("GET", "/v1/ai/documents/..", 404),
    ("GET", "/v1/ai/documents/...", 200),
    ("GET", "/v1/ai/documents/%2e%2e", 404),
    ("GET", "/v1/ai/documents/a;b", 404),
    ("GET", "/v1/ai/documents/a%2fb", 404),
    ("GET", "/v1/ai/documents/a~b-c_d.e", 200),
    ("GET", "/v1/ai/documents/a b", 404),
    ("GET", "/v1/ai/documents/\u00e9", 404),
    ("GET", "/v1/ai/documents/a?b=/..", 200),
    ("GET", "/v1/ai/documents/a#b", 404),
    ("GET", "/v1/ai/documents//a", 404),
    ("GET", "v1/ai/documents", 404),
    ("GET", "", 404),
    ("HEAD", "/v1/ai/documents", 200),
    ("HEAD", "/v1/ai/chat", 405),
    ("head", "/v1/ai/documents", 405),
    ("POST", "/v1/ai/chat?", 200),
    ("POST", "/v1/ai/chat/?", 404),
    ("POST", "/v1/ai/Chat", 404),
    ("POST", "/v1/ai/chat\x00", 404),
    ("DELETE", "/v1/webhooks/.", 404),
    ("DELETE", "/v1/webhooks/wh_1", 403),
    ("GET", "/v1/ai/documents/" + "a" * 65536, 200),
]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    EDGE_CALLS,
    ids=[f"{method} {path[:40]}" for method, path, _ in EDGE_CALLS],
)
def test_check_edge_call_with_valid_key(
    authz: Authz, method: str, path: str, status: int
) -> None:
    http = auth_pb2.AttributeContext.HttpRequest(method=method, path=path)
    http.header_map.headers.add(
        key="authorization", raw_value=f"Bearer {TOKEN}".encode()
    )
    request = auth_pb2.CheckRequest(
        attributes=auth_pb2.AttributeContext(
            request=auth_pb2.AttributeContext.Request(http=http)
        )
    )

    assert expected_status(request) == status
    assert check_and_verify(authz, request) == status


def test_oracle_routes_match_packaged_table() -> None:
    packaged = {
        (route.template, frozenset(route.methods), route.scope)
        for route in load_route_table().routes
    }

    assert packaged == {
        (template, frozenset(methods), scope)
        for template, methods, scope in DEFAULT_ROUTES
    }


def test_check_valid_request_is_allowed(authz: Authz) -> None:
    # Without this, a broken seed would make every generated request a 401 that
    # the oracle might also predict.
    http = auth_pb2.AttributeContext.HttpRequest(method="POST", path="/v1/ai/chat")
    http.header_map.headers.add(
        key="authorization", raw_value=f"Bearer {TOKEN}".encode()
    )
    request = auth_pb2.CheckRequest(
        attributes=auth_pb2.AttributeContext(
            request=auth_pb2.AttributeContext.Request(http=http)
        )
    )
    assert check_and_verify(authz, request) == 200


def test_check_prefers_header_map_to_headers(authz: Authz) -> None:
    # Envoy fills one of the two. When both are present the servicer reads
    # header_map only, so a key in the legacy map alone authorizes nothing.
    http = auth_pb2.AttributeContext.HttpRequest(method="POST", path="/v1/ai/chat")
    http.header_map.headers.add(key="x-request-id", raw_value=b"both-maps")
    http.headers["authorization"] = f"Bearer {TOKEN}"
    request = auth_pb2.CheckRequest(
        attributes=auth_pb2.AttributeContext(
            request=auth_pb2.AttributeContext.Request(http=http)
        )
    )
    assert check_and_verify(authz, request) == 401


def test_request_id_never_echoes_token(authz: Authz) -> None:
    http = auth_pb2.AttributeContext.HttpRequest(method="POST", path="/v1/ai/chat")
    http.header_map.headers.add(key="x-request-id", raw_value=TOKEN.encode())
    request = auth_pb2.CheckRequest(
        attributes=auth_pb2.AttributeContext(
            request=auth_pb2.AttributeContext.Request(http=http)
        )
    )

    response = authz.check(request)
    logged = [record.getMessage() for record in authz.logs.drain()]

    assert assert_well_formed(response) == 401
    assert TOKEN not in response.denied_response.body
    assert not [line for line in logged if TOKEN in line]


# --- the spoofing table, direct and through Envoy ---


@dataclass(frozen=True)
class SpoofCase:
    """One raw HTTP/1.1 request and the status expected on each path.

    ``headers`` are sent as ``Name: value`` lines. ``{token}`` and the other
    placeholders in ``fill_token`` become the "chat" key (scope ai:chat).
    ``direct`` is the status for a CheckRequest with the request exactly as
    written, and ``envoy`` the status that the client gets through Envoy.
    ``upstream_path`` is the path the upstream must receive when Envoy allows.
    """

    method: str
    target: str
    direct: int
    envoy: int
    upstream_path: str | None = None
    headers: tuple[tuple[str, str], ...] = (("Authorization", "Bearer {token}"),)
    trailers: tuple[tuple[str, str], ...] = ()


def fill_token(text: str, token: str) -> str:
    return (
        text.replace("{token}", token)
        .replace("{token_lower}", token.lower())
        .replace("{token_zero_width}", f"{token[:20]}\u200b{token[20:]}")
        .replace("{token_head}", token[:24])
        .replace("{token_tail}", token[24:])
    )


AUTH = "Bearer {token}"
# Each row: the request, the direct status, the status through Envoy, and the
# path the upstream gets when Envoy allows. A comment explains why the two
# statuses differ where they do.
SPOOF_CASES = [
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 200, 200, "/v1/ai/chat"),
                 id="baseline"),
    # --- path confusion ---
    pytest.param(SpoofCase("POST", "/v1/ai/chat/", 404, 404), id="trailing-slash"),
    # Envoy resolves "/." to "/v1/ai/chat/", which still has the empty segment.
    pytest.param(SpoofCase("POST", "/v1/ai/chat/.", 404, 404), id="trailing-dot"),
    # Envoy merges "//" before the check and forwards the merged path.
    pytest.param(SpoofCase("POST", "/v1/ai//chat", 404, 200, "/v1/ai/chat"),
                 id="double-slash"),
    pytest.param(SpoofCase("POST", "/V1/AI/CHAT", 404, 404), id="upper-case"),
    # Envoy rejects an encoded NUL with its own 400.
    pytest.param(SpoofCase("POST", "/v1/ai/chat%00", 404, 400), id="encoded-nul"),
    # path_with_escaped_slashes_action: REJECT_REQUEST.
    pytest.param(SpoofCase("POST", "/v1/ai/chat%2f..", 404, 400),
                 id="encoded-slash-dotdot"),
    pytest.param(SpoofCase("POST", "/v1/ai%5Cchat", 404, 400),
                 id="encoded-backslash"),
    # Envoy reads "\" as "/" and resolves the dot segments: /v1/ai/usage.
    pytest.param(SpoofCase("POST", "/v1/ai/chat\\..\\usage", 404, 404),
                 id="backslash-dotdot"),
    # The same rewrite lands on a real route, which the upstream then receives.
    pytest.param(SpoofCase("POST", "/v1/ai/documents\\..\\chat", 404, 200,
                           "/v1/ai/chat"), id="backslash-to-route"),
    pytest.param(SpoofCase("POST", "/v1/ai/documents/%2e%2e/chat", 404, 200,
                           "/v1/ai/chat"), id="encoded-dotdot-to-route"),
    # Envoy resolves to /v1/usage, which needs control:read.
    pytest.param(SpoofCase("GET", "/v1/ai/chat/../../usage", 404, 403),
                 id="dotdot-escapes-to-other-scope"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat?", 200, 200, "/v1/ai/chat?"),
                 id="empty-query"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat?next=/v1/usage", 200, 200,
                           "/v1/ai/chat?next=/v1/usage"), id="query-with-path"),
    # Envoy rejects a fragment in the request target with its own 400.
    pytest.param(SpoofCase("POST", "/v1/ai/chat#x", 404, 400), id="fragment"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat;a=b", 404, 404), id="path-params"),
    # Envoy splits the absolute form into :authority and :path before the check,
    # so the sidecar and the upstream both read /v1/ai/chat.
    pytest.param(SpoofCase("POST", "http://evil.test/v1/ai/chat", 404, 200,
                           "/v1/ai/chat"), id="absolute-form"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat\x01", 404, 400), id="control-char"),
    pytest.param(SpoofCase("POST", "/v1/ai/ch\u00e4t", 404, 400), id="non-ascii"),
    # A canonical path of one 70,000-character segment: the sidecar decides it
    # (the key lacks ai:documents), while Envoy rejects it with 431 because of
    # its 60 KiB header limit.
    pytest.param(SpoofCase("GET", "/v1/ai/documents/" + "a" * 70_000, 403, 431),
                 id="overlong-path"),
    # --- header spoofing ---
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 200, 200, "/v1/ai/chat",
                           (("Authorization", "bearer {token}"),)),
                 id="scheme-lower-case"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 200, 200, "/v1/ai/chat",
                           (("AUTHORIZATION", AUTH),)), id="name-upper-case"),
    # The raw value starts with a space. Envoy strips that optional whitespace
    # (RFC 9110 section 5.5) before the check.
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 200, "/v1/ai/chat",
                           (("Authorization", " Bearer {token}"),)),
                 id="two-spaces-after-colon"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Authorization", "Bearer  {token}"),)),
                 id="two-spaces-after-scheme"),
    # Trailing whitespace is optional whitespace too, and Envoy strips it.
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 200, "/v1/ai/chat",
                           (("Authorization", "Bearer {token} "),)),
                 id="trailing-space"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Authorization", "Bearer\t{token}"),)),
                 id="tab-after-scheme"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Authorization", "Bearer {token_lower}"),)),
                 id="token-lower-case"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Authorization", "Bearer {token_zero_width}"),)),
                 id="token-zero-width-space"),
    # Envoy joins the two lines into one value with a comma: malformed.
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Authorization", "Bearer {token_head}"),
                                    ("Authorization", "{token_tail}"))),
                 id="token-split-over-two-headers"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Authorization", AUTH), ("authorization", AUTH))),
                 id="same-token-twice"),
    # An obs-fold line continuation. Envoy replaces it with a space (RFC 9112
    # section 5.2 allows that), which leaves "Bearer <token>".
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 200, "/v1/ai/chat",
                           (("Authorization", "Bearer\r\n {token}"),)),
                 id="obs-fold"),
    # Whitespace before the colon: Envoy rejects the request with 400.
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 400,
                           headers=(("Authorization ", AUTH),)),
                 id="space-before-colon"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401,
                           headers=(("Proxy-Authorization", AUTH),)),
                 id="proxy-authorization-only"),
    # ext_authz runs on the request headers, so a trailer never reaches the check.
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 401, 401, headers=(),
                           trailers=(("Authorization", AUTH),)),
                 id="authorization-in-trailer"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 200, 200, "/v1/ai/chat",
                           (("Authorization", AUTH), ("X-Hasp-Org-Id", "evil-org"),
                            ("X-Hasp-Key-Id", "key_evil"))),
                 id="identity-headers-spoofed"),
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 200, 200, "/v1/ai/chat",
                           (("Authorization", AUTH), ("x_hasp_org_id", "evil-org"))),
                 id="identity-header-with-underscores"),
    pytest.param(SpoofCase("GET", "/v1/usage", 403, 403,
                           headers=(("Authorization", AUTH),
                                    ("X-Hasp-Scopes", "control:read"))),
                 id="scopes-header-spoofed"),
    # The decision uses the request method, so override headers change nothing.
    pytest.param(SpoofCase("POST", "/v1/ai/chat", 200, 200, "/v1/ai/chat",
                           (("Authorization", AUTH),
                            ("X-HTTP-Method-Override", "GET"))),
                 id="method-override-get"),
    pytest.param(SpoofCase("GET", "/v1/ai/chat", 405, 405,
                           headers=(("Authorization", AUTH),
                                    ("X-HTTP-Method-Override", "POST"),
                                    ("X-Method-Override", "POST"))),
                 id="method-override-post"),
]  # fmt: skip


@dataclass
class SpoofStack:
    local: LocalStack
    token: str
    key_id: str
    channel: grpc.Channel

    def check(self, request: auth_pb2.CheckRequest) -> auth_pb2.CheckResponse:
        stub = auth_grpc.AuthorizationStub(self.channel)
        return stub.Check(request, timeout=RPC_TIMEOUT_SECONDS)


@pytest.fixture(scope="module")
def spoof_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SpoofStack]:
    """The local stack on free ports with one org, acme, and one ai:chat key."""
    workdir: Path = tmp_path_factory.mktemp("hostile-stack")
    local = LocalStack(
        workdir=workdir,
        keystore_url=f"sqlite:///{workdir}/keystore.db",
        ports=StackPorts.free(),
        redis_url=redis_url,
        redis_prefix=f"hasp-hostile-{uuid.uuid4().hex[:12]}:",
    )
    local.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{local.ports.authz}")
    try:
        local.hasp_keys("orgs", "create", "acme", "--baa")
        arguments = ["create", "--org", "acme", "--name", "chat", "--scope", "ai:chat"]
        created = json.loads(local.hasp_keys(*arguments, "--json"))
        yield SpoofStack(local, created["token"], created["key_id"], channel)
    finally:
        channel.close()
        local.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{local.redis_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def direct_request(
    method: str, target: str, headers: list[tuple[str, str]]
) -> auth_pb2.CheckRequest:
    """Build the CheckRequest for a request exactly as written, unnormalized."""
    http = auth_pb2.AttributeContext.HttpRequest(
        method=method, path=target, host="api.example.test", protocol="HTTP/1.1"
    )
    for name, value in headers:
        http.header_map.headers.add(key=name, raw_value=value.encode("utf-8"))
    return auth_pb2.CheckRequest(
        attributes=auth_pb2.AttributeContext(
            request=auth_pb2.AttributeContext.Request(http=http)
        )
    )


def raw_http_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    trailers: list[tuple[str, str]],
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: api.example.test"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: close")
    if trailers:
        lines += ["Transfer-Encoding: chunked", "Trailer: Authorization"]
        body = "2\r\n{}\r\n0\r\n"
        body += "".join(f"{name}: {value}\r\n" for name, value in trailers) + "\r\n"
    else:
        lines.append("Content-Length: 0")
        body = ""
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def send_raw(port: int, method: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP/1.1 request to 127.0.0.1:``port`` and return the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, body


@pytest.mark.e2e
@pytest.mark.parametrize("case", SPOOF_CASES)
def test_spoofing_case_direct(spoof_stack: SpoofStack, case: SpoofCase) -> None:
    headers = [(n, fill_token(v, spoof_stack.token)) for n, v in case.headers]

    response = spoof_stack.check(direct_request(case.method, case.target, headers))

    assert assert_well_formed(response) == case.direct
    assert spoof_stack.token.encode() not in response.SerializeToString()


@pytest.mark.e2e
@pytest.mark.parametrize("case", SPOOF_CASES)
def test_spoofing_case_through_envoy(spoof_stack: SpoofStack, case: SpoofCase) -> None:
    token = spoof_stack.token
    headers = [(n, fill_token(v, token)) for n, v in case.headers]
    trailers = [(n, fill_token(v, token)) for n, v in case.trailers]
    data = raw_http_request(case.method, case.target, headers, trailers)

    status, response_headers, body = send_raw(
        spoof_stack.local.ports.envoy, case.method, data
    )

    assert status == case.envoy, body[:300]
    assert token.encode() not in body
    if status in DENY_TABLE:
        assert response_headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == DENY_TABLE[status][0]
    if status != 200:
        return
    echo = json.loads(body)
    assert echo["path"] == case.upstream_path
    assert "authorization" not in echo["headers"]
    # "hasp" in any form, so x_hasp_org_id counts too.
    hasp_headers = {n: v for n, v in echo["headers"].items() if "hasp" in n}
    assert hasp_headers == {
        "x-hasp-org-id": ["acme"],
        "x-hasp-key-id": [spoof_stack.key_id],
        "x-hasp-scopes": ["ai:chat"],
    }
    # The path that the upstream received is one that the sidecar itself allows.
    recheck = direct_request(
        echo["method"], echo["path"], [("authorization", f"Bearer {token}")]
    )
    assert assert_well_formed(spoof_stack.check(recheck)) == 200
