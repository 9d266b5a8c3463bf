"""Tests for hasp_authz.cache: the in-process cache in front of the Redis copy.

Every test reads a real Redis (the shared test server, under the test's own
prefix) through RedisKeyCopy. A counting wrapper shows when a lookup reached
Redis, and records changed in Redis without a change message show when a
result came from the cache. TTLs run on a fake timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis
import redis.asyncio as aioredis

from hasp_authz.authorizer import Authorizer, HttpAttributes
from hasp_authz.cache import CachedKeyCopy, CacheHit, RecordCache
from hasp_authz.dev.redis_server import free_port
from hasp_authz.invalidation import apply_change_message
from hasp_authz.outcomes import Outcome
from hasp_authz.records import (
    KeyRecord,
    OrgRecord,
    RedisLayout,
    flush_message,
    key_changed_message,
    org_changed_message,
)
from hasp_authz.routes import load_route_table
from hasp_authz.store import (
    CopyUnavailable,
    LookupResult,
    RedisKeyCopy,
    RedisUnavailable,
)
from hasp_authz.tokens import generate_token, hash_token

TTL = 30.0
NEGATIVE_TTL = 1.0


class FakeTimer:
    """A monotonic clock for cachetools that advances only when a test sets it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingCopy:
    """A RedisKeyCopy that counts the lookups that reached Redis."""

    def __init__(self, copy: RedisKeyCopy):
        self.copy = copy
        self.calls = 0

    async def lookup(
        self, key_hash: str, deadline: float | None = None
    ) -> LookupResult:
        self.calls += 1
        return await self.copy.lookup(key_hash, deadline)


class Seeder:
    """Writes records into the copy with the synchronous client, as the sync does."""

    def __init__(self, client: redis.Redis, layout: RedisLayout):
        self.client = client
        self.layout = layout

    def key(
        self, org_id: str | None = None, expires_at: float | None = None
    ) -> tuple[str, KeyRecord]:
        """Write a new active key (and its org, with a BAA); return its hash."""
        key_hash, record, _ = self.key_with_token(org_id, expires_at)
        return key_hash, record

    def key_with_token(
        self, org_id: str | None = None, expires_at: float | None = None
    ) -> tuple[str, KeyRecord, str]:
        suffix = uuid.uuid4().hex[:8]
        record = KeyRecord(
            f"key_{suffix}", org_id or f"org_{suffix}", ("ai:chat",), expires_at
        )
        token = generate_token()
        key_hash = hash_token(token)
        self.client.set(self.layout.key(key_hash), record.to_json())
        self.org(record.org_id, baa_active=True)
        return key_hash, record, token

    def org(self, org_id: str, *, baa_active: bool) -> None:
        self.client.set(
            self.layout.org(org_id), OrgRecord(org_id, baa_active).to_json()
        )

    def complete(self) -> None:
        self.client.set(self.layout.complete_marker, '{"keys": 1}')


@pytest.fixture
def seeder(redis_client: redis.Redis, layout: RedisLayout) -> Seeder:
    seeder = Seeder(redis_client, layout)
    seeder.complete()
    return seeder


@pytest.fixture
def timer() -> FakeTimer:
    return FakeTimer()


def make_cache(
    timer: FakeTimer,
    *,
    max_entries: int = 100,
    negative_ttl: float = NEGATIVE_TTL,
    active: bool = True,
) -> RecordCache:
    cache = RecordCache(max_entries, TTL, negative_ttl, timer=timer)
    if active:
        cache.resume()
    return cache


def run_with_copy(
    redis_url: str,
    layout: RedisLayout,
    cache: RecordCache,
    scenario: Callable[[CachedKeyCopy, CountingCopy], Awaitable[None]],
) -> None:
    """Run ``scenario`` on an event loop with a cached copy over a new client."""

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            counting = CountingCopy(RedisKeyCopy(client, layout))
            await scenario(CachedKeyCopy(counting, cache), counting)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_record_cache_requires_positive_size():
    with pytest.raises(ValueError, match="max_entries"):
        RecordCache(0, TTL, NEGATIVE_TTL)


def test_record_cache_starts_bypassed(timer):
    cache = make_cache(timer, active=False)
    key = KeyRecord("key_1", "org_1", ("ai:chat",))

    stored = cache.put("h1", (key, OrgRecord("org_1", True)), cache.generation)

    assert stored is False
    assert cache.get("h1") is None
    assert len(cache.keys) == 0


def test_record_cache_bypassed_ignores_entries(timer):
    cache = make_cache(timer)
    key = KeyRecord("key_1", "org_1", ("ai:chat",))
    cache.put("h1", (key, OrgRecord("org_1", True)), cache.generation)
    cache.put("h2", None, cache.generation)
    cache.active = False

    assert cache.get("h1") is None
    assert cache.get("h2") is None


def test_lookup_hit_skips_redis(redis_url, layout, seeder, redis_client, timer):
    key_hash, record = seeder.key()
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        first = await cached.lookup(key_hash)
        # Gone from Redis without a change message: only the cache has it now.
        redis_client.delete(layout.key(key_hash), layout.org(record.org_id))
        second = await cached.lookup(key_hash)

        assert first is not None
        assert first[0] == record
        assert first[1] == OrgRecord(record.org_id, True)
        assert second == first
        assert counting.calls == 1

    run_with_copy(redis_url, layout, cache, scenario)


def test_lookup_miss_stores_key_and_org(redis_url, layout, seeder, timer):
    key_hash, record = seeder.key()
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        await cached.lookup(key_hash)

    run_with_copy(redis_url, layout, cache, scenario)

    assert cache.keys[key_hash] == record
    assert cache.orgs[record.org_id] == OrgRecord(record.org_id, True)
    assert cache.unknown is not None
    assert len(cache.unknown) == 0


def test_lookup_negative_hit(redis_url, layout, seeder, redis_client, timer):
    key_hash = hash_token(generate_token())
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        assert await cached.lookup(key_hash) is None
        # Created without a change message: the negative entry is still returned.
        record = KeyRecord("key_late", "org_late", ("ai:chat",))
        redis_client.set(layout.key(key_hash), record.to_json())
        seeder.org("org_late", baa_active=True)
        assert await cached.lookup(key_hash) is None
        assert counting.calls == 1

        timer.now += NEGATIVE_TTL + 0.01
        found = await cached.lookup(key_hash)
        assert found is not None
        assert found[0] == record
        assert counting.calls == 2

    run_with_copy(redis_url, layout, cache, scenario)


def test_lookup_negative_caching_off(redis_url, layout, seeder, timer):
    key_hash = hash_token(generate_token())
    cache = make_cache(timer, negative_ttl=0)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        assert await cached.lookup(key_hash) is None
        assert await cached.lookup(key_hash) is None
        assert counting.calls == 2

    run_with_copy(redis_url, layout, cache, scenario)

    assert cache.unknown is None


def test_lookup_ttl_expiry(redis_url, layout, seeder, redis_client, timer):
    key_hash, record = seeder.key()
    cache = make_cache(timer)
    changed = KeyRecord(record.key_id, record.org_id, ("ai:chat", "control:read"))

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        await cached.lookup(key_hash)
        redis_client.set(layout.key(key_hash), changed.to_json())

        timer.now += TTL - 0.01
        before_expiry = await cached.lookup(key_hash)
        timer.now += 0.02
        after_expiry = await cached.lookup(key_hash)

        assert before_expiry is not None
        assert before_expiry[0] == record
        assert after_expiry is not None
        assert after_expiry[0] == changed
        assert counting.calls == 2

    run_with_copy(redis_url, layout, cache, scenario)


def test_lookup_size_bound(redis_url, layout, seeder, timer):
    hashes = [seeder.key()[0] for _ in range(3)]
    cache = make_cache(timer, max_entries=2)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        for key_hash in hashes:
            await cached.lookup(key_hash)
        assert len(cache.keys) == 2
        assert len(cache.orgs) == 2
        assert hashes[0] not in cache.keys

        await cached.lookup(hashes[0])
        assert counting.calls == 4

    run_with_copy(redis_url, layout, cache, scenario)


def test_lookup_size_bound_negative(redis_url, layout, seeder, timer):
    cache = make_cache(timer, max_entries=2)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        for _ in range(5):
            await cached.lookup(hash_token(generate_token()))

    run_with_copy(redis_url, layout, cache, scenario)

    assert cache.unknown is not None
    assert len(cache.unknown) == 2


def test_lookup_missing_marker_not_cached(
    redis_url, layout, seeder, redis_client, timer
):
    key_hash, record = seeder.key()
    unknown_hash = hash_token(generate_token())
    redis_client.delete(layout.complete_marker)
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        for lookup_hash in (key_hash, unknown_hash):
            with pytest.raises(CopyUnavailable, match="marker"):
                await cached.lookup(lookup_hash)
        assert cache.get(key_hash) is None
        assert cache.get(unknown_hash) is None

        seeder.complete()
        found = await cached.lookup(key_hash)
        assert found is not None
        assert found[0] == record
        assert await cached.lookup(unknown_hash) is None

    run_with_copy(redis_url, layout, cache, scenario)


@pytest.mark.parametrize("broken", ["key", "org", "org-missing"])
def test_lookup_bad_record_not_cached(
    redis_url, layout, seeder, redis_client, timer, broken
):
    key_hash, record = seeder.key()
    if broken == "key":
        redis_client.set(layout.key(key_hash), "{not json")
    elif broken == "org":
        redis_client.set(layout.org(record.org_id), '{"baa_active": "yes"}')
    else:
        redis_client.delete(layout.org(record.org_id))
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        with pytest.raises(CopyUnavailable):
            await cached.lookup(key_hash)
        assert len(cache.keys) == 0
        assert len(cache.orgs) == 0
        assert cache.get(key_hash) is None

        redis_client.set(layout.key(key_hash), record.to_json())
        seeder.org(record.org_id, baa_active=True)
        assert await cached.lookup(key_hash) is not None

    run_with_copy(redis_url, layout, cache, scenario)


def test_lookup_redis_failure_not_cached(layout, timer):
    cache = make_cache(timer)
    key_hash = hash_token(generate_token())

    async def main() -> None:
        # Nothing listens on this port, so every connection is refused.
        client = aioredis.Redis.from_url(
            f"redis://127.0.0.1:{free_port()}/0", retry=None
        )
        cached = CachedKeyCopy(RedisKeyCopy(client, layout), cache)
        try:
            with pytest.raises(CopyUnavailable, match="Redis failed"):
                await cached.lookup(key_hash)
        finally:
            await client.aclose()

    asyncio.run(main())

    assert cache.get(key_hash) is None
    assert cache.unknown is not None
    assert len(cache.unknown) == 0


def test_key_message_drops_key_and_negative(redis_url, layout, seeder, timer):
    known_hash, record = seeder.key()
    unknown_hash = hash_token(generate_token())
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        await cached.lookup(known_hash)
        await cached.lookup(unknown_hash)

        apply_change_message(cache, key_changed_message(known_hash))
        apply_change_message(cache, key_changed_message(unknown_hash).encode())

        assert cache.get(known_hash) is None
        assert cache.get(unknown_hash) is None
        assert cache.orgs[record.org_id] == OrgRecord(record.org_id, True)

    run_with_copy(redis_url, layout, cache, scenario)


def test_org_message_drops_org(redis_url, layout, seeder, redis_client, timer):
    key_hash, record = seeder.key()
    other_hash, _ = seeder.key(org_id=record.org_id)
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        await cached.lookup(key_hash)
        await cached.lookup(other_hash)
        seeder.org(record.org_id, baa_active=False)

        apply_change_message(cache, org_changed_message(record.org_id))

        for lookup_hash in (key_hash, other_hash):
            found = await cached.lookup(lookup_hash)
            assert found is not None
            assert found[1].baa_active is False
        assert counting.calls == 3

    run_with_copy(redis_url, layout, cache, scenario)


def test_all_message_clears_everything(redis_url, layout, seeder, timer):
    key_hash, _ = seeder.key()
    unknown_hash = hash_token(generate_token())
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        await cached.lookup(key_hash)
        await cached.lookup(unknown_hash)

        apply_change_message(cache, flush_message())

    run_with_copy(redis_url, layout, cache, scenario)

    assert len(cache.keys) == 0
    assert len(cache.orgs) == 0
    assert cache.unknown is not None
    assert len(cache.unknown) == 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="not-object"),
        pytest.param(b'{"kind": "key"}', id="key-without-hash"),
        pytest.param(b'{"kind": "org", "org_id": 7}', id="org-id-not-string"),
        pytest.param(b'{"kind": "rename"}', id="unknown-kind"),
        pytest.param(b'{"kind": ["key"]}', id="kind-not-string"),
    ],
)
def test_invalid_message_clears_and_warns(timer, caplog, raw):
    cache = make_cache(timer)
    cache.put("h1", (KeyRecord("key_1", "org_1", ()), OrgRecord("org_1", True)), 0)
    generation = cache.generation

    with caplog.at_level(logging.WARNING, logger="hasp_authz.invalidation"):
        apply_change_message(cache, raw)

    assert len(cache.keys) == 0
    assert len(cache.orgs) == 0
    assert cache.generation > generation
    assert "invalid change message" in caplog.text


def test_stale_write_after_invalidation_dropped(
    redis_url, layout, seeder, redis_client, timer
):
    key_hash, record = seeder.key()
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        read_done = asyncio.Event()
        release = asyncio.Event()

        class PausingCopy:
            """Reads Redis, then waits, so an invalidation lands in between."""

            async def lookup(
                self, lookup_hash: str, deadline: float | None = None
            ) -> LookupResult:
                result = await counting.lookup(lookup_hash, deadline)
                read_done.set()
                await release.wait()
                return result

        slow = CachedKeyCopy(PausingCopy(), cache)
        pending = asyncio.create_task(slow.lookup(key_hash))
        await read_done.wait()
        # The key is revoked (record deleted, message applied) after the read.
        redis_client.delete(layout.key(key_hash))
        apply_change_message(cache, key_changed_message(key_hash))
        release.set()
        stale = await pending

        assert stale is not None
        assert stale[0] == record
        assert cache.get(key_hash) is None
        assert await cached.lookup(key_hash) is None

    run_with_copy(redis_url, layout, cache, scenario)


def test_bypass_while_unsubscribed(redis_url, layout, seeder, redis_client, timer):
    key_hash, record = seeder.key()
    unknown_hash = hash_token(generate_token())
    cache = make_cache(timer)

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        await cached.lookup(key_hash)
        cache.suspend()
        assert len(cache.keys) == 0

        redis_client.delete(layout.key(key_hash))
        assert await cached.lookup(key_hash) is None
        assert await cached.lookup(unknown_hash) is None
        assert await cached.lookup(unknown_hash) is None
        assert counting.calls == 4
        assert len(cache.keys) == 0
        assert cache.unknown is not None
        assert len(cache.unknown) == 0

        cache.resume()
        redis_client.set(layout.key(key_hash), record.to_json())
        await cached.lookup(key_hash)
        await cached.lookup(key_hash)
        assert counting.calls == 5

    run_with_copy(redis_url, layout, cache, scenario)


def test_put_checks_generation(timer):
    cache = make_cache(timer)
    result = (KeyRecord("key_1", "org_1", ()), OrgRecord("org_1", True))
    generation = cache.generation
    cache.drop_org("org_other")

    assert cache.put("h1", result, generation) is False
    assert cache.put("h1", result, cache.generation) is True
    assert cache.get("h1") == CacheHit(result)


def test_cached_key_expires_at_request_time(redis_url, layout, seeder, timer):
    now = time.time()
    key_hash, record, token = seeder.key_with_token(expires_at=now + 10)
    cache = make_cache(timer)
    clock = [now]
    request = HttpAttributes(
        method="POST",
        path="/v1/ai/chat",
        request_id="req_test",
        authorization=[f"Bearer {token}"],
    )

    async def scenario(cached: CachedKeyCopy, counting: CountingCopy) -> None:
        authorizer = Authorizer(cached, load_route_table(), clock=lambda: clock[0])
        allowed = await authorizer.authorize(request)
        clock[0] = now + 10
        expired = await authorizer.authorize(request)

        assert allowed.outcome is Outcome.ALLOW
        assert expired.outcome is Outcome.INVALID_API_KEY
        assert counting.calls == 1
        assert cache.keys[key_hash] == record

    run_with_copy(redis_url, layout, cache, scenario)


# --- Redis failures and stale-if-error ---

SAMPLE = (KeyRecord("key_1", "org_1", ("ai:chat",)), OrgRecord("org_1", True))
STALE_WINDOW = 10.0


class FailingCopy:
    """A KeyLookup that always raises ``error``."""

    def __init__(self, error: CopyUnavailable):
        self.error = error

    async def lookup(
        self, key_hash: str, deadline: float | None = None
    ) -> LookupResult:
        raise self.error


def make_stale_cache(timer: FakeTimer) -> RecordCache:
    cache = RecordCache(
        100, TTL, NEGATIVE_TTL, timer=timer, stale_if_error_seconds=STALE_WINDOW
    )
    cache.resume()
    return cache


def failing_lookup(cache: RecordCache, key_hash: str, error: CopyUnavailable):
    return asyncio.run(CachedKeyCopy(FailingCopy(error), cache).lookup(key_hash))


def test_redis_failure_bypasses_cache(timer):
    cache = make_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)

    with pytest.raises(RedisUnavailable):
        failing_lookup(cache, "h2", RedisUnavailable("Redis failed: test"))

    assert cache.redis_failed is True
    assert cache.active is False
    assert cache.get("h1") is None


def test_copy_data_error_keeps_cache(timer):
    cache = make_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)

    with pytest.raises(CopyUnavailable):
        failing_lookup(cache, "h2", CopyUnavailable("malformed KeyRecord"))

    assert cache.redis_failed is False
    assert cache.get("h1") == CacheHit(SAMPLE)


def test_stale_if_error_off_by_default(timer):
    cache = make_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)
    cache.suspend()

    assert cache.get_stale("h1") is None
    with pytest.raises(RedisUnavailable):
        failing_lookup(cache, "h1", RedisUnavailable("Redis failed: test"))


def test_stale_if_error_serves_verified_key(timer):
    cache = make_stale_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)
    cache.suspend()
    failure = RedisUnavailable("Redis failed: test")

    timer.now += STALE_WINDOW - 1
    assert failing_lookup(cache, "h1", failure) == SAMPLE
    with pytest.raises(RedisUnavailable):
        failing_lookup(cache, "h_never_verified", failure)
    timer.now += 2
    with pytest.raises(RedisUnavailable):
        failing_lookup(cache, "h1", failure)


def test_stale_if_error_never_serves_unknown(timer):
    cache = make_stale_cache(timer)
    cache.put("h_unknown", None, cache.generation)

    assert cache.get("h_unknown") == CacheHit(None)
    assert cache.get_stale("h_unknown") is None


def test_cache_hit_renews_stale_entry(timer):
    cache = make_stale_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)

    timer.now += 8
    assert cache.get("h1") == CacheHit(SAMPLE)
    timer.now += 7
    cache.suspend()

    assert cache.get_stale("h1") == SAMPLE
    timer.now += 4
    assert cache.get_stale("h1") is None


def test_suspend_keeps_stale_entries(timer):
    cache = make_stale_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)

    cache.suspend()

    assert cache.get("h1") is None
    assert cache.get_stale("h1") == SAMPLE


def test_put_while_bypassed_keeps_stale_only(timer):
    cache = make_stale_cache(timer)
    cache.suspend()

    assert cache.put("h1", SAMPLE, cache.generation) is False

    assert len(cache.keys) == 0
    assert cache.get_stale("h1") == SAMPLE


@pytest.mark.parametrize(
    "message",
    [key_changed_message("h1"), org_changed_message("org_1"), flush_message()],
    ids=["key", "org", "all"],
)
def test_change_message_drops_stale_entry(timer, message):
    cache = make_stale_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)

    apply_change_message(cache, message)
    cache.suspend()

    assert cache.get_stale("h1") is None


def test_negative_result_drops_stale_entry(timer):
    cache = make_stale_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)

    cache.put("h1", None, cache.generation)

    assert cache.get_stale("h1") is None


def test_resume_clears_stale_entries(timer):
    # Changes made while the subscription was down never reached these entries.
    cache = make_stale_cache(timer)
    cache.put("h1", SAMPLE, cache.generation)
    cache.suspend()

    cache.resume()

    assert cache.get_stale("h1") is None
