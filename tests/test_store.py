"""RedisKeyCopy against a real Redis, with one round trip (a script) and two.

Both read paths must give the same result for every state of the copy, so each
test runs on both.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio as aioredis

from hasp_authz.dev.redis_server import free_port
from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.store import CopyUnavailable, RedisKeyCopy, RedisUnavailable

KEY = KeyRecord("key_store1", "org_store1", ("ai:chat",))
ORG = OrgRecord("org_store1", baa_active=True)
HASH = "ab" * 32


@pytest.fixture(params=[True, False], ids=["one_round_trip", "two_round_trips"])
def single_round_trip(request: pytest.FixtureRequest) -> bool:
    return request.param


def lookup(url: str, layout: RedisLayout, single_round_trip: bool, **options):
    """Run one lookup of HASH on a new client and return its result."""

    async def main():
        client = aioredis.Redis.from_url(url)
        try:
            copy = RedisKeyCopy(
                client, layout, single_round_trip=single_round_trip, **options
            )
            return await copy.lookup(HASH)
        finally:
            await client.aclose()

    return asyncio.run(main())


def write_copy(client: redis.Redis, layout: RedisLayout, *, raw_key=None, org=True):
    client.set(layout.complete_marker, json.dumps({"synced_at": 1}))
    client.set(layout.key(HASH), raw_key if raw_key is not None else KEY.to_json())
    if org:
        client.set(layout.org(ORG.org_id), ORG.to_json())


def test_lookup_known_key(redis_url, redis_client, layout, single_round_trip):
    write_copy(redis_client, layout)

    assert lookup(redis_url, layout, single_round_trip) == (KEY, ORG)


def test_lookup_unknown_key(redis_url, redis_client, layout, single_round_trip):
    redis_client.set(layout.complete_marker, "{}")

    assert lookup(redis_url, layout, single_round_trip) is None


def test_lookup_without_marker(redis_url, redis_client, layout, single_round_trip):
    write_copy(redis_client, layout)
    redis_client.delete(layout.complete_marker)

    with pytest.raises(CopyUnavailable, match="completeness marker is missing"):
        lookup(redis_url, layout, single_round_trip)


def test_lookup_missing_org(redis_url, redis_client, layout, single_round_trip):
    write_copy(redis_client, layout, org=False)

    with pytest.raises(CopyUnavailable, match="names org org_store1, not found"):
        lookup(redis_url, layout, single_round_trip)


@pytest.mark.parametrize(
    "raw_key",
    [
        "not json",
        "",
        "[1, 2]",
        '{"key_id": "k", "org_id": 7, "scopes": []}',
        '{"key_id": "k", "scopes": []}',
    ],
)
def test_lookup_malformed_key(
    redis_url, redis_client, layout, single_round_trip, raw_key
):
    write_copy(redis_client, layout, raw_key=raw_key)

    with pytest.raises(CopyUnavailable):
        lookup(redis_url, layout, single_round_trip)


def test_lookup_after_script_flush(private_redis, private_client, layout):
    # A restarted Redis has no scripts: redis-py loads the script again.
    write_copy(private_client, layout)
    assert lookup(private_redis.url, layout, True) == (KEY, ORG)
    private_client.script_flush()

    assert lookup(private_redis.url, layout, True) == (KEY, ORG)


def test_lookup_counts_redis_error(layout, single_round_trip):
    errors: list[None] = []
    url = f"redis://127.0.0.1:{free_port()}/0"

    with pytest.raises(RedisUnavailable):
        lookup(
            url, layout, single_round_trip, on_redis_error=lambda: errors.append(None)
        )
    assert len(errors) == 1
