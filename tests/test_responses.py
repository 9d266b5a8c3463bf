"""Tests for hasp_authz.responses: the allow response, deny bodies and headers."""

from __future__ import annotations

import json
import re

import pytest
from google.protobuf import json_format

from hasp_authz.decision import Decision
from hasp_authz.outcomes import RETRY_AFTER_SECONDS, Outcome
from hasp_authz.proto import envoy_config_core_v3_pb2 as core_pb2
from hasp_authz.records import KeyRecord
from hasp_authz.responses import (
    IDENTITY_HEADERS,
    allow_response,
    deny_response,
    request_id_for,
)
from hasp_authz.routes import Route, load_route_table

OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
KEY = KeyRecord("key_01J9", "org_acme", ("ai:chat", "control:read"))
REQUEST_ID = "req_0f0e-request"
GENERATED_ID_RE = re.compile(r"req_[0-9a-f]{32}")

# The documented decision table: outcome -> (HTTP status, type, retryable).
DOCUMENTED_DENIES = {
    Outcome.INVALID_API_KEY: (401, "unauthorized", False),
    Outcome.BAA_REQUIRED: (402, "payment_required", False),
    Outcome.NOT_FOUND: (404, "not_found", False),
    Outcome.METHOD_NOT_ALLOWED: (405, "method_not_allowed", False),
    Outcome.MISSING_SCOPE: (403, "forbidden", False),
    Outcome.AUTH_UNAVAILABLE: (503, "service_unavailable", True),
}


def route_for(method: str, path: str) -> Route:
    match = load_route_table().match(method, path)
    assert match is not None
    return match.route


def header_items(options) -> list[tuple[str, str]]:
    return [(option.header.key, option.header.value) for option in options]


def deny_headers(response) -> dict[str, str]:
    return dict(header_items(response.denied_response.headers))


def deny_body(response) -> dict:
    return json.loads(response.denied_response.body)


def deny_decision(outcome: Outcome) -> Decision:
    """Build the decision a Check would produce for ``outcome``."""
    if outcome is Outcome.INVALID_API_KEY:
        return Decision(outcome, credentials_sent=True)
    if outcome is Outcome.METHOD_NOT_ALLOWED:
        route = route_for("GET", "/v1/ai/chat")
        return Decision(outcome, key=KEY, route=route, credentials_sent=True)
    if outcome is Outcome.MISSING_SCOPE:
        route = route_for("POST", "/v1/webhooks")
        return Decision(outcome, key=KEY, route=route, credentials_sent=True)
    if outcome is Outcome.AUTH_UNAVAILABLE:
        return Decision(outcome)
    return Decision(outcome, key=KEY, credentials_sent=True)


@pytest.fixture
def allowed():
    decision = Decision(
        Outcome.ALLOW,
        key=KEY,
        route=route_for("POST", "/v1/ai/chat"),
        credentials_sent=True,
    )
    return allow_response(
        decision,
        request_id=REQUEST_ID,
        strip_headers=["x-hasp-admin", "x-hasp-debug"],
    )


def test_allow_response_status_ok(allowed):
    assert allowed.status.code == 0
    assert allowed.WhichOneof("http_response") == "ok_response"


def test_allow_response_sets_identity_headers(allowed):
    headers = header_items(allowed.ok_response.headers)

    assert headers == [
        ("x-hasp-org-id", "org_acme"),
        ("x-hasp-key-id", "key_01J9"),
        ("x-hasp-scopes", "ai:chat control:read"),
    ]


def test_allow_response_overwrites_identity_headers(allowed):
    for option in allowed.ok_response.headers:
        assert option.append_action == OVERWRITE, option.header.key


def test_allow_response_removes_client_headers(allowed):
    removed = list(allowed.ok_response.headers_to_remove)

    assert removed[0] == "authorization"
    assert set(removed) == {"authorization", "x-hasp-admin", "x-hasp-debug"}


def test_allow_response_never_removes_identity_headers(allowed):
    removed = set(allowed.ok_response.headers_to_remove)

    for name in IDENTITY_HEADERS:
        assert name not in removed


def test_allow_response_dynamic_metadata(allowed):
    metadata = json_format.MessageToDict(allowed.dynamic_metadata)

    assert metadata == {
        "org_id": "org_acme",
        "key_id": "key_01J9",
        "scopes": "ai:chat control:read",
        "request_id": REQUEST_ID,
    }


def test_allow_response_without_extra_headers():
    decision = Decision(Outcome.ALLOW, key=KEY, credentials_sent=True)

    response = allow_response(decision, request_id=REQUEST_ID, strip_headers=[])

    assert list(response.ok_response.headers_to_remove) == ["authorization"]


def test_identity_header_names():
    assert IDENTITY_HEADERS == ("x-hasp-org-id", "x-hasp-key-id", "x-hasp-scopes")


@pytest.mark.parametrize("outcome", list(DOCUMENTED_DENIES), ids=lambda o: o.value)
def test_deny_response_status_and_body(outcome):
    status, error_type, retryable = DOCUMENTED_DENIES[outcome]

    response = deny_response(deny_decision(outcome), request_id=REQUEST_ID)

    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code == status
    body = deny_body(response)
    assert set(body) == {"success", "error"}
    assert body["success"] is False
    error = body["error"]
    assert set(error) == {"code", "type", "message", "retryable", "request_id"}
    assert error["code"] == outcome.value
    assert error["type"] == error_type
    assert error["retryable"] is retryable
    assert error["request_id"] == REQUEST_ID
    assert isinstance(error["message"], str)
    assert error["message"].endswith(".")


@pytest.mark.parametrize("outcome", list(DOCUMENTED_DENIES), ids=lambda o: o.value)
def test_deny_response_content_type_json(outcome):
    response = deny_response(deny_decision(outcome), request_id=REQUEST_ID)

    assert deny_headers(response)["content-type"] == "application/json"


@pytest.mark.parametrize("outcome", list(DOCUMENTED_DENIES), ids=lambda o: o.value)
def test_deny_response_headers_overwrite(outcome):
    response = deny_response(deny_decision(outcome), request_id=REQUEST_ID)

    for option in response.denied_response.headers:
        assert option.append_action == OVERWRITE, option.header.key


@pytest.mark.parametrize(
    ("outcome", "grpc_code"),
    [
        (Outcome.INVALID_API_KEY, 7),
        (Outcome.BAA_REQUIRED, 7),
        (Outcome.NOT_FOUND, 7),
        (Outcome.METHOD_NOT_ALLOWED, 7),
        (Outcome.MISSING_SCOPE, 7),
        (Outcome.AUTH_UNAVAILABLE, 14),
    ],
    ids=lambda value: getattr(value, "value", str(value)),
)
def test_deny_response_grpc_status(outcome, grpc_code):
    response = deny_response(deny_decision(outcome), request_id=REQUEST_ID)

    assert response.status.code == grpc_code


def test_deny_response_baa_message_is_documented():
    response = deny_response(deny_decision(Outcome.BAA_REQUIRED), request_id="req_1")

    assert deny_body(response)["error"]["message"] == (
        "An active Business Associate Agreement is required to use the AI API."
    )


def test_deny_response_uses_decision_message():
    decision = Decision(
        Outcome.MISSING_SCOPE,
        message="The API key key_01J9 does not have the scope 'control:webhooks'.",
        key=KEY,
    )

    response = deny_response(decision, request_id=REQUEST_ID)

    assert deny_body(response)["error"]["message"] == decision.message


@pytest.mark.parametrize(
    ("credentials_sent", "challenge"),
    [
        (False, 'Bearer realm="hasp"'),
        (True, 'Bearer realm="hasp", error="invalid_token"'),
    ],
)
def test_deny_response_www_authenticate(credentials_sent, challenge):
    decision = Decision(Outcome.INVALID_API_KEY, credentials_sent=credentials_sent)

    response = deny_response(decision, request_id=REQUEST_ID)

    assert deny_headers(response)["www-authenticate"] == challenge


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/ai/chat", "POST"),
        ("DELETE", "/v1/usage/budget", "GET, HEAD, PUT"),
        ("POST", "/v1/ai/documents/doc_1", "GET, HEAD"),
        ("GET", "/v1/webhooks/wh_1", "DELETE"),
    ],
)
def test_deny_response_allow_header_on_405(method, path, allow):
    decision = Decision(
        Outcome.METHOD_NOT_ALLOWED, key=KEY, route=route_for(method, path)
    )

    response = deny_response(decision, request_id=REQUEST_ID)

    assert deny_headers(response)["allow"] == allow


def test_deny_response_retry_after_on_503():
    response = deny_response(Decision(Outcome.AUTH_UNAVAILABLE), request_id="req_1")

    retry_after = deny_headers(response)["retry-after"]
    assert retry_after == str(RETRY_AFTER_SECONDS)
    assert int(retry_after) >= 1


@pytest.mark.parametrize("outcome", list(DOCUMENTED_DENIES), ids=lambda o: o.value)
def test_deny_response_extra_headers_per_outcome(outcome):
    headers = deny_headers(deny_response(deny_decision(outcome), request_id="req_1"))

    assert ("www-authenticate" in headers) == (outcome is Outcome.INVALID_API_KEY)
    assert ("allow" in headers) == (outcome is Outcome.METHOD_NOT_ALLOWED)
    assert ("retry-after" in headers) == (outcome is Outcome.AUTH_UNAVAILABLE)


@pytest.mark.parametrize("outcome", list(DOCUMENTED_DENIES), ids=lambda o: o.value)
def test_deny_response_dynamic_metadata(outcome):
    decision = deny_decision(outcome)

    response = deny_response(decision, request_id=REQUEST_ID)

    metadata = json_format.MessageToDict(response.dynamic_metadata)
    expected = {"code": outcome.value, "request_id": REQUEST_ID}
    if decision.key is not None:
        expected.update(org_id="org_acme", key_id="key_01J9")
    assert metadata == expected


@pytest.mark.parametrize(
    "envoy_id",
    [
        "f47ac10b-58cc-4372-a567-0e02b2c3d479",
        "abc",
        "A.b_c-1",
        "0",
        "x-" * 64,
        "x" * 31,
    ],
)
def test_request_id_for_keeps_safe_id(envoy_id):
    assert request_id_for(envoy_id) == "req_" + envoy_id


@pytest.mark.parametrize(
    "envoy_id",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 129, id="129-characters"),
        pytest.param("x" * 10_000, id="very-long"),
        pytest.param("a b", id="space"),
        pytest.param(" abc", id="leading-space"),
        pytest.param('a"b', id="double-quote"),
        pytest.param("a'b", id="single-quote"),
        pytest.param("a\nb", id="newline"),
        pytest.param("abc\n", id="trailing-newline"),
        pytest.param("a\r\nSet-Cookie: x=1", id="header-injection"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("caf\u00e9", id="latin-1-letter"),
        pytest.param("\u0438\u0434", id="cyrillic"),
        pytest.param("\u0661\u0662\u0663", id="arabic-digits"),
        pytest.param("\U0001f600", id="emoji"),
        pytest.param("a/b", id="slash"),
        pytest.param("a;b", id="semicolon"),
        pytest.param("<script>", id="angle-brackets"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("a%20b", id="percent"),
        pytest.param("x" * 32, id="secret-length-run"),
        pytest.param("hasp_key_live_" + "A" * 32, id="token"),
        pytest.param("A" * 32, id="token-body"),
        pytest.param("ab" * 32, id="key-hash"),
    ],
)
def test_request_id_for_replaces_unsafe_id(envoy_id):
    request_id = request_id_for(envoy_id)

    assert GENERATED_ID_RE.fullmatch(request_id)


def test_request_id_for_generates_fresh_ids():
    generated = {request_id_for("") for _ in range(100)}

    assert len(generated) == 100
