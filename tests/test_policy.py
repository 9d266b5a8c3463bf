"""Unit tests of the per-route policy read from Envoy's context_extensions."""

from __future__ import annotations

import pytest

from hasp_authz.policy import (
    DEFAULT_POLICY,
    PolicyError,
    RoutePolicy,
    parse_route_policy,
)


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        ({}, DEFAULT_POLICY),
        ({"virtual_host": "api"}, DEFAULT_POLICY),
        ({"hasp_scope": "ai:chat"}, RoutePolicy(required_scope="ai:chat")),
        ({"hasp_public": "true"}, RoutePolicy(public=True)),
        ({"hasp_public": "false"}, DEFAULT_POLICY),
        ({"hasp_shadow": "true"}, RoutePolicy(shadow=True)),
        (
            {"hasp_shadow": "true", "hasp_scope": "control:read"},
            RoutePolicy(required_scope="control:read", shadow=True),
        ),
    ],
)
def test_parse_valid_policy(extensions, expected):
    assert parse_route_policy(extensions) == expected


@pytest.mark.parametrize(
    ("extensions", "message"),
    [
        ({"hasp_scope": "ai:everything"}, "'ai:everything' is not a known scope"),
        ({"hasp_scope": ""}, "'' is not a known scope"),
        ({"hasp_public": "yes"}, "hasp_public='yes' is invalid"),
        ({"hasp_shadow": "True"}, "hasp_shadow='True' is invalid"),
        ({"hasp_publik": "true"}, "unknown context extension 'hasp_publik'"),
        (
            {"hasp_public": "true", "hasp_scope": "ai:chat"},
            "cannot be combined",
        ),
        (
            {"hasp_public": "true", "hasp_shadow": "true"},
            "cannot be combined",
        ),
    ],
)
def test_parse_invalid_policy_raises(extensions, message):
    with pytest.raises(PolicyError, match=message):
        parse_route_policy(extensions)


def test_invalid_policy_raises_every_time():
    for _ in range(2):
        with pytest.raises(PolicyError):
            parse_route_policy({"hasp_scope": "nope"})


def test_long_invalid_value_is_truncated_in_message():
    with pytest.raises(PolicyError) as caught:
        parse_route_policy({"hasp_scope": "x" * 500})
    assert len(str(caught.value)) < 300
