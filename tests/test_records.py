"""Parsing of the records that the sync writes and the Check path reads."""

from __future__ import annotations

import json

import pytest

from hasp_authz.records import KeyRecord, OrgRecord


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
