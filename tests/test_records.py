"""Parsing of the records that the sync writes and the Check path reads, and the
change messages that announce them."""

from __future__ import annotations

import json
import math

import pytest

from hasp_authz.records import (
    KeyRecord,
    OrgRecord,
    flush_message,
    key_changed_message,
    org_changed_message,
)


def test_key_record_round_trips() -> None:
    record = KeyRecord("key_1", "acme", ("ai:chat", "control:read"), 1700000000.5)
    assert KeyRecord.from_json(record.to_json()) == record


def test_org_record_round_trips() -> None:
    record = OrgRecord("acme", True)
    assert OrgRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "data",
    [
        {"key_id": "k", "org_id": "o", "scopes": "ai:chat"},
        {"key_id": "k", "org_id": "o", "scopes": [1]},
        {"key_id": "k", "org_id": "o", "scopes": ["ai:chat"], "expires_at": "NaN"},
        {"key_id": "k", "org_id": "o", "scopes": ["ai:chat"], "expires_at": "inf"},
        {"key_id": "k", "org_id": "o", "scopes": ["ai:chat"], "expires_at": "soon"},
        {"key_id": "k", "scopes": ["ai:chat"]},
    ],
)
def test_key_record_rejects_malformed(data: dict) -> None:
    with pytest.raises((ValueError, TypeError, KeyError)):
        KeyRecord.from_json(json.dumps(data))


@pytest.mark.parametrize("baa_active", ["true", 1, None])
def test_org_record_rejects_non_boolean_baa(baa_active: object) -> None:
    with pytest.raises(TypeError):
        OrgRecord.from_json(json.dumps({"org_id": "acme", "baa_active": baa_active}))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (key_changed_message("h1"), {"kind": "key", "hash": "h1"}),
        (org_changed_message("acme"), {"kind": "org", "org_id": "acme"}),
        (flush_message(), {"kind": "all"}),
    ],
    ids=["key", "org", "all"],
)
def test_change_message_without_publish_time(message: str, expected: dict) -> None:
    assert json.loads(message) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            key_changed_message("h1", at=1718000000.1234567),
            {"kind": "key", "hash": "h1", "at": 1718000000.123457},
        ),
        (
            org_changed_message("acme", at=1718000000.5),
            {"kind": "org", "org_id": "acme", "at": 1718000000.5},
        ),
        (flush_message(at=1718000000), {"kind": "all", "at": 1718000000}),
    ],
    ids=["key", "org", "all"],
)
def test_change_message_with_publish_time(message: str, expected: dict) -> None:
    assert json.loads(message) == expected


@pytest.mark.parametrize("at", [math.nan, math.inf, -math.inf])
def test_change_message_rejects_non_finite_time(at: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        key_changed_message("h1", at=at)
