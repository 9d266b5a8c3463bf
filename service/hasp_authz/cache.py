"""In-process cache of key and org records in front of the Redis copy.

Three bounded ``cachetools.TTLCache`` maps: key records by key hash, org records
by org id, and hashes that the copy does not contain (negative entries, with a
much shorter TTL). Only successful lookups are stored. A failure (Redis error,
missing completeness marker, malformed record) raises through and is never
cached.

Freshness comes from invalidation, not from the TTL: ``ChangeSubscriber``
(invalidation.py) drops entries when a change message arrives. So the cache is
used only while that subscription is live. Before the first subscription and
after a loss it is bypassed, with no reads and no writes, because messages
published meanwhile are lost.

A lookup that read Redis before an invalidation must not store its result after
it. Every invalidation bumps ``generation``; a lookup notes the generation before
it reads Redis and stores its result only if the generation is unchanged.

Key expiry is not decided here. A cached KeyRecord keeps ``expires_at``, and
``decision.decide`` compares it with the time of each request.

Not thread-safe: every call must come from the one asyncio event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from hasp_authz.records import KeyRecord, OrgRecord
from hasp_authz.store import KeyLookup, LookupResult


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A cached lookup result: the key and its org, or None for an unknown hash."""

    result: LookupResult


class RecordCache:
    """Bounded TTL caches of key records, org records and unknown hashes."""

    def __init__(
        self,
        max_entries: int,
        ttl_seconds: float,
        negative_ttl_seconds: float,
        timer: Callable[[], float] = time.monotonic,
    ):
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.keys: TTLCache[str, KeyRecord] = TTLCache(max_entries, ttl_seconds, timer)
        self.orgs: TTLCache[str, OrgRecord] = TTLCache(max_entries, ttl_seconds, timer)
        self.unknown: TTLCache[str, bool] | None = None
        if negative_ttl_seconds > 0:
            self.unknown = TTLCache(max_entries, negative_ttl_seconds, timer)
        # Bumped by every invalidation, so that a lookup that began earlier does
        # not store its result.
        self.generation = 0
        # True only while the change subscription is live.
        self.active = False

    def get(self, key_hash: str) -> CacheHit | None:
        """Return the cached result for ``key_hash``, or None on a miss.

        A key whose org entry is gone (dropped or expired) is a miss, so an org
        change reaches every key of that org.
        """
        if not self.active:
            return None
        if self.unknown is not None and key_hash in self.unknown:
            return CacheHit(None)
        key = self.keys.get(key_hash)
        if key is None:
            return None
        org = self.orgs.get(key.org_id)
        if org is None:
            return None
        return CacheHit((key, org))

    def put(self, key_hash: str, result: LookupResult, generation: int) -> bool:
        """Store a lookup result that began at ``generation``.

        Returns False without storing when the cache is bypassed or an
        invalidation happened since the lookup began.
        """
        if not self.active or generation != self.generation:
            return False
        if result is None:
            if self.unknown is None:
                return False
            self.unknown[key_hash] = True
            return True
        key, org = result
        self.keys[key_hash] = key
        self.orgs[key.org_id] = org
        return True

    def drop_key(self, key_hash: str) -> None:
        """Drop one key's record and its negative entry."""
        self.generation += 1
        self.keys.pop(key_hash, None)
        if self.unknown is not None:
            self.unknown.pop(key_hash, None)

    def drop_org(self, org_id: str) -> None:
        self.generation += 1
        self.orgs.pop(org_id, None)

    def clear(self) -> None:
        self.generation += 1
        self.keys.clear()
        self.orgs.clear()
        if self.unknown is not None:
            self.unknown.clear()

    def suspend(self) -> None:
        """Clear everything and bypass the cache until ``resume``."""
        self.active = False
        self.clear()

    def resume(self) -> None:
        """Clear everything and start using the cache again."""
        self.clear()
        self.active = True


class CachedKeyCopy:
    """A KeyLookup that returns RecordCache entries and reads the copy on a miss."""

    def __init__(self, copy: KeyLookup, cache: RecordCache):
        self.copy = copy
        self.cache = cache

    async def lookup(self, key_hash: str) -> LookupResult:
        """Return the key and its org, or None for an unknown key.

        Raises CopyUnavailable, as the copy does. Failures are not cached.
        """
        hit = self.cache.get(key_hash)
        if hit is not None:
            return hit.result
        generation = self.cache.generation
        result = await self.copy.lookup(key_hash)
        self.cache.put(key_hash, result, generation)
        return result
