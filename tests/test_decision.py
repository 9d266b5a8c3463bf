"""Tests for hasp_authz.decision: the outcome table, its order, and credentials."""

from __future__ import annotations

import pytest

from hasp_authz.decision import (
    Credentials,
    Decision,
    credentials_message,
    decide,
    read_credentials,
)
from hasp_authz.outcomes import Outcome
from hasp_authz.records import KeyRecord, OrgRecord
from hasp_authz.routes import RouteTable, load_route_table

NOW = 1_800_000_000.0
TOKEN = "hasp_key_live_7K3M9QXZ2R4T6V8W0Y1ABCDEFGHJNPST"
OTHER_TOKEN = "hasp_key_live_0123456789ABCDEFGHJKMNPQRSTVWXYZ"

CHAT_KEY = KeyRecord("key_chat", "org_1", ("ai:chat",))
CONTROL_KEY = KeyRecord("key_control", "org_1", ("control:read", "control:webhooks"))
ALL_SCOPES_KEY = KeyRecord(
    "key_all",
    "org_1",
    (
        "ai:chat",
        "ai:documents",
        "ai:embeddings",
        "ai:summarize",
        "control:read",
        "control:webhooks",
    ),
)
NO_SCOPES_KEY = KeyRecord("key_none", "org_1", ())
EXPIRING_KEY = KeyRecord("key_exp", "org_1", ("ai:chat",), expires_at=NOW)
BAA_ORG = OrgRecord("org_1", baa_active=True)
NO_BAA_ORG = OrgRecord("org_1", baa_active=False)


@pytest.fixture(scope="module")
def routes() -> RouteTable:
    return load_route_table()


# (key, org, method, path, now, expected outcome). A None key is one the copy
# does not know. Rows are grouped by the step that decides them.
DECIDE_CASES = [
    # Step 1: the key, which comes before the org, the path and the method.
    pytest.param(None, None, "POST", "/v1/ai/chat", NOW, Outcome.INVALID_API_KEY,
                 id="unknown-key"),
    pytest.param(None, None, "GET", "/v1/nowhere", NOW, Outcome.INVALID_API_KEY,
                 id="unknown-key-on-unknown-path-is-401-not-404"),
    pytest.param(None, None, "GET", "/v1/ai/chat", NOW, Outcome.INVALID_API_KEY,
                 id="unknown-key-with-wrong-method-is-401-not-405"),
    pytest.param(None, BAA_ORG, "POST", "/v1/ai/chat", NOW, Outcome.INVALID_API_KEY,
                 id="unknown-key-with-org"),
    pytest.param(None, NO_BAA_ORG, "POST", "/v1/ai/chat", NOW,
                 Outcome.INVALID_API_KEY, id="unknown-key-no-baa-is-401-not-402"),
    pytest.param(EXPIRING_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW,
                 Outcome.INVALID_API_KEY, id="expired-at-expires-at"),
    pytest.param(EXPIRING_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW + 0.001,
                 Outcome.INVALID_API_KEY, id="expired-just-after"),
    pytest.param(EXPIRING_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW + 86_400,
                 Outcome.INVALID_API_KEY, id="expired-a-day-after"),
    pytest.param(EXPIRING_KEY, NO_BAA_ORG, "GET", "/v1/nowhere", NOW,
                 Outcome.INVALID_API_KEY, id="expired-no-baa-unknown-path-is-401"),
    pytest.param(EXPIRING_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW - 0.001,
                 Outcome.ALLOW, id="allowed-just-before-expiry"),
    # Step 2: the org's BAA, which comes before the path and the method.
    pytest.param(CHAT_KEY, NO_BAA_ORG, "POST", "/v1/ai/chat", NOW,
                 Outcome.BAA_REQUIRED, id="no-baa"),
    pytest.param(CHAT_KEY, NO_BAA_ORG, "GET", "/v1/nowhere", NOW,
                 Outcome.BAA_REQUIRED, id="no-baa-on-unknown-path-is-402-not-404"),
    pytest.param(CHAT_KEY, NO_BAA_ORG, "GET", "/v1/ai/chat", NOW,
                 Outcome.BAA_REQUIRED, id="no-baa-wrong-method-is-402-not-405"),
    pytest.param(CHAT_KEY, NO_BAA_ORG, "GET", "/v1/usage", NOW,
                 Outcome.BAA_REQUIRED, id="no-baa-missing-scope-is-402-not-403"),
    pytest.param(CONTROL_KEY, NO_BAA_ORG, "GET", "/v1/usage", NOW,
                 Outcome.BAA_REQUIRED, id="no-baa-control-route"),
    pytest.param(CHAT_KEY, None, "POST", "/v1/ai/chat", NOW,
                 Outcome.BAA_REQUIRED, id="no-org-record"),
    # Step 3: the path, which comes before the method and the scope.
    pytest.param(CHAT_KEY, BAA_ORG, "GET", "/v1/nowhere", NOW,
                 Outcome.NOT_FOUND, id="unknown-path"),
    pytest.param(NO_SCOPES_KEY, BAA_ORG, "GET", "/v1/nowhere", NOW,
                 Outcome.NOT_FOUND, id="unknown-path-no-scopes-is-404-not-403"),
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "/v1/ai/./chat", NOW,
                 Outcome.NOT_FOUND, id="dot-segment"),
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "/v1/ai/chat/", NOW,
                 Outcome.NOT_FOUND, id="trailing-slash"),
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "/v1/ai%2Fchat", NOW,
                 Outcome.NOT_FOUND, id="encoded-slash"),
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "", NOW,
                 Outcome.NOT_FOUND, id="empty-path"),
    # Step 4: the method, which comes before the scope.
    pytest.param(CHAT_KEY, BAA_ORG, "GET", "/v1/ai/chat", NOW,
                 Outcome.METHOD_NOT_ALLOWED, id="wrong-method"),
    pytest.param(CHAT_KEY, BAA_ORG, "HEAD", "/v1/ai/chat", NOW,
                 Outcome.METHOD_NOT_ALLOWED, id="head-on-post-route"),
    pytest.param(CHAT_KEY, BAA_ORG, "DELETE", "/v1/usage", NOW,
                 Outcome.METHOD_NOT_ALLOWED, id="wrong-method-missing-scope-is-405"),
    pytest.param(CHAT_KEY, BAA_ORG, "", "/v1/ai/chat", NOW,
                 Outcome.METHOD_NOT_ALLOWED, id="empty-method"),
    # Step 5: the scope.
    pytest.param(CHAT_KEY, BAA_ORG, "GET", "/v1/usage", NOW,
                 Outcome.MISSING_SCOPE, id="missing-scope"),
    pytest.param(CONTROL_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW,
                 Outcome.MISSING_SCOPE, id="control-key-on-ai-route"),
    pytest.param(NO_SCOPES_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW,
                 Outcome.MISSING_SCOPE, id="key-without-scopes"),
    pytest.param(CHAT_KEY, BAA_ORG, "GET", "/v1/ai/documents/doc_1", NOW,
                 Outcome.MISSING_SCOPE, id="templated-route-missing-scope"),
    # Every step passes.
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "/v1/ai/chat", NOW,
                 Outcome.ALLOW, id="allow"),
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "/v1/messages?beta=true", NOW,
                 Outcome.ALLOW, id="allow-with-query-string"),
    pytest.param(CONTROL_KEY, BAA_ORG, "HEAD", "/v1/usage/budget", NOW,
                 Outcome.ALLOW, id="allow-head-as-get"),
    pytest.param(CONTROL_KEY, BAA_ORG, "DELETE", "/v1/webhooks/wh_1", NOW,
                 Outcome.ALLOW, id="allow-templated-route"),
    pytest.param(ALL_SCOPES_KEY, BAA_ORG, "PUT", "/v1/usage/budget", NOW,
                 Outcome.ALLOW, id="allow-key-with-every-scope"),
    pytest.param(CHAT_KEY, BAA_ORG, "POST", "/v1/ai/chat", 4_000_000_000.0,
                 Outcome.ALLOW, id="allow-key-without-expiry-far-future"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "org", "method", "path", "now", "expected"),
                         DECIDE_CASES)  # fmt: skip
def test_decide_outcome(routes, key, org, method, path, now, expected):
    decision = decide(
        credentials_sent=True,
        key=key,
        org=org,
        method=method,
        path=path,
        routes=routes,
        now=now,
    )

    assert decision.outcome is expected
    assert decision.allowed == (expected is Outcome.ALLOW)


def _decide(routes, key, org, method, path, *, credentials_sent=True):
    return decide(
        credentials_sent=credentials_sent,
        key=key,
        org=org,
        method=method,
        path=path,
        routes=routes,
        now=NOW,
    )


def test_decide_allow_carries_key_and_route(routes):
    decision = _decide(routes, CHAT_KEY, BAA_ORG, "POST", "/v1/messages")

    assert decision.outcome is Outcome.ALLOW
    assert decision.key == CHAT_KEY
    assert decision.route is not None
    assert decision.route.template == "/v1/messages"
    assert decision.route.scope == "ai:chat"
    assert decision.credentials_sent
    assert decision.message is None


@pytest.mark.parametrize("credentials_sent", [True, False])
def test_decide_unknown_key_keeps_credentials_sent(routes, credentials_sent):
    decision = _decide(
        routes, None, None, "POST", "/v1/ai/chat", credentials_sent=credentials_sent
    )

    assert decision.outcome is Outcome.INVALID_API_KEY
    assert decision.credentials_sent is credentials_sent
    assert decision.key is None
    assert decision.route is None


def test_decide_expired_key_carries_no_key(routes):
    decision = _decide(routes, EXPIRING_KEY, BAA_ORG, "POST", "/v1/ai/chat")

    assert decision.outcome is Outcome.INVALID_API_KEY
    assert decision.key is None
    assert decision.credentials_sent


def test_decide_baa_required_carries_key(routes):
    decision = _decide(routes, CHAT_KEY, NO_BAA_ORG, "POST", "/v1/ai/chat")

    assert decision.key == CHAT_KEY
    assert decision.route is None
    assert decision.message is None


def test_decide_not_found_carries_key_without_route(routes):
    decision = _decide(routes, CHAT_KEY, BAA_ORG, "POST", "/v1/nowhere")

    assert decision.outcome is Outcome.NOT_FOUND
    assert decision.key == CHAT_KEY
    assert decision.route is None


def test_decide_method_not_allowed_carries_route(routes):
    decision = _decide(routes, CONTROL_KEY, BAA_ORG, "DELETE", "/v1/usage/budget")

    assert decision.outcome is Outcome.METHOD_NOT_ALLOWED
    assert decision.route is not None
    assert decision.route.template == "/v1/usage/budget"
    assert decision.route.allow_header == "GET, HEAD, PUT"


def test_decide_missing_scope_message(routes):
    decision = _decide(routes, CHAT_KEY, BAA_ORG, "GET", "/v1/usage")

    assert decision.outcome is Outcome.MISSING_SCOPE
    assert decision.route is not None
    assert decision.route.scope == "control:read"
    assert "key_chat" in decision.message
    assert "'control:read'" in decision.message


def test_read_credentials_none_sent():
    credentials = read_credentials([])

    assert credentials.token is None
    assert not credentials.sent


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_read_credentials_single_valid_value(scheme):
    credentials = read_credentials([f"{scheme} {TOKEN}"])

    assert credentials.token == TOKEN
    assert credentials.sent


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([f"Bearer {TOKEN}", f"Bearer {TOKEN}"], id="same-key-twice"),
        pytest.param([f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"], id="two-keys"),
        pytest.param([f"Bearer {TOKEN}", ""], id="valid-and-empty"),
        pytest.param(["", f"Bearer {TOKEN}"], id="empty-and-valid"),
        pytest.param([f"Bearer {TOKEN}", "Basic dXNlcjpwYXNz"], id="bearer-and-basic"),
        pytest.param([f"Bearer {TOKEN}"] * 3, id="three-values"),
    ],
)
def test_read_credentials_rejects_several_values(values):
    credentials = read_credentials(values)

    assert credentials.token is None
    assert credentials.sent


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(TOKEN, id="no-scheme"),
        pytest.param(f"Bearer {TOKEN.lower()}", id="lower-case-token"),
        pytest.param(f"Bearer  {TOKEN}", id="two-spaces"),
        pytest.param(f"Bearer {TOKEN},Bearer {OTHER_TOKEN}", id="comma-joined"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer sk-live-1234", id="foreign-token"),
    ],
)
def test_read_credentials_rejects_malformed_value(value):
    credentials = read_credentials([value])

    assert credentials.token is None
    assert credentials.sent


def test_credentials_message_when_none_sent():
    message = credentials_message([])

    assert message.startswith("No API key was sent.")
    assert "Authorization: Bearer hasp_key_live_..." in message


def test_credentials_message_when_several_sent():
    message = credentials_message([f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"])

    assert "exactly one Authorization header" in message
    assert TOKEN not in message
    assert OTHER_TOKEN not in message


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {TOKEN.lower()}",
        f"Bearer {TOKEN}x",
        f"Token {TOKEN}",
        "Bearer sk-live-1234",
    ],
)
def test_credentials_message_when_malformed(value):
    message = credentials_message([value])

    assert message.startswith("The API key is malformed")
    assert "32 upper-case base32 characters" in message
    assert value.split()[-1] not in message
    assert TOKEN[len("hasp_key_live_") :] not in message


@pytest.mark.parametrize(
    "credentials",
    [
        read_credentials([f"Bearer {TOKEN}"]),
        Credentials(token=TOKEN, sent=True),
    ],
)
def test_credentials_repr_hides_token(credentials):
    body = TOKEN[len("hasp_key_live_") :]

    for text in (repr(credentials), str(credentials), f"{[credentials]}"):
        assert TOKEN not in text
        assert body not in text
        assert "<redacted>" in text


def test_credentials_repr_without_token():
    assert repr(read_credentials([])) == "Credentials(token=None, sent=False)"
    assert repr(read_credentials(["Bearer x"])) == "Credentials(token=None, sent=True)"


def test_decision_allowed_only_for_allow():
    for outcome in Outcome:
        assert Decision(outcome).allowed == (outcome is Outcome.ALLOW)
