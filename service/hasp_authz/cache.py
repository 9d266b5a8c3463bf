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

A Redis failure on the Check path (store.RedisUnavailable: an error, or no
reply within a deadline that left one Redis timeout or more) bypasses the cache
at once. The subscriber then subscribes again before the
cache is used, because its subscription may have failed too without noticing
yet.

Stale-if-error (off unless HASP_STALE_IF_ERROR_SECONDS is above 0). Two more
TTL maps, with that TTL, keep the key and org records of every positive
result that was read from Redis or served from the cache while the
subscription was live. A bypass keeps them, so while the copy cannot answer a
lookup returns the entry if it is younger than the window. Change messages
drop entries from them as from the other maps, and a new subscription clears
them, because changes made while it was down were missed. Unknown keys are
never served stale: they get the 503.

Key expiry is not decided here. A cached KeyRecord keeps ``expires_at``, and
``decision.decide`` compares it with the time of each request.

Not thread-safe: every call must come from the one asyncio event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from hasp_authz.records import KeyRecord, OrgRecord
from hasp_authz.store import CopyUnavailable, KeyLookup, LookupResult, RedisUnavailable

log = logging.getLogger(__name__)


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
        *,
        stale_if_error_seconds: float = 0.0,
    ):
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.keys: TTLCache[str, KeyRecord] = TTLCache(max_entries, ttl_seconds, timer)
        self.orgs: TTLCache[str, OrgRecord] = TTLCache(max_entries, ttl_seconds, timer)
        self.unknown: TTLCache[str, bool] | None = None
        if negative_ttl_seconds > 0:
            self.unknown = TTLCache(max_entries, negative_ttl_seconds, timer)
        # Records verified within the stale-if-error window, kept across a bypass.
        self.stale_keys: TTLCache[str, KeyRecord] | None = None
        self.stale_orgs: TTLCache[str, OrgRecord] | None = None
        if stale_if_error_seconds > 0:
            self.stale_keys = TTLCache(max_entries, stale_if_error_seconds, timer)
            self.stale_orgs = TTLCache(max_entries, stale_if_error_seconds, timer)
        # Bumped by every invalidation, so that a lookup that began earlier does
        # not store its result.
        self.generation = 0
        # True only while the change subscription is live.
        self.active = False
        # Set when a Check's Redis call failed. The subscriber then subscribes
        # again, and clears the flag before it starts.
        self.redis_failed = False

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
        # The live subscription vouches for the entry now, as a read would.
        self._keep_verified(key_hash, (key, org))
        return CacheHit((key, org))

    def get_stale(self, key_hash: str) -> LookupResult:
        """Return the key and org verified within the stale-if-error window, or None."""
        if self.stale_keys is None or self.stale_orgs is None:
            return None
        key = self.stale_keys.get(key_hash)
        if key is None:
            return None
        org = self.stale_orgs.get(key.org_id)
        if org is None:
            return None
        return key, org

    def put(self, key_hash: str, result: LookupResult, generation: int) -> bool:
        """Store a lookup result that began at ``generation``.

        Returns False without storing when the cache is bypassed or an
        invalidation happened since the lookup began. A read from Redis is a
        verification even while the cache is bypassed, so the stale-if-error
        maps take a positive result, or drop the key on a negative one,
        whenever the generation matches.
        """
        if generation != self.generation:
            return False
        if result is not None:
            self._keep_verified(key_hash, result)
        elif self.stale_keys is not None:
            self.stale_keys.pop(key_hash, None)
        if not self.active:
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
        if self.stale_keys is not None:
            self.stale_keys.pop(key_hash, None)

    def drop_org(self, org_id: str) -> None:
        self.generation += 1
        self.orgs.pop(org_id, None)
        if self.stale_orgs is not None:
            self.stale_orgs.pop(org_id, None)

    def clear(self) -> None:
        """Drop every entry, the stale-if-error maps included."""
        self._clear_live()
        if self.stale_keys is not None and self.stale_orgs is not None:
            self.stale_keys.clear()
            self.stale_orgs.clear()

    def suspend(self) -> None:
        """Bypass the cache until ``resume``, keeping only the stale-if-error maps.

        Change messages may be lost from now on, so the live entries go.
        """
        self.active = False
        self._clear_live()

    def resume(self) -> None:
        """Clear everything and start using the cache again.

        The stale-if-error maps go too: changes made while the subscription was
        down were not applied to them.
        """
        self.clear()
        self.active = True

    def report_redis_failure(self) -> None:
        """Bypass the cache until the subscriber has subscribed again."""
        self.redis_failed = True
        self.suspend()

    def _clear_live(self) -> None:
        self.generation += 1
        self.keys.clear()
        self.orgs.clear()
        if self.unknown is not None:
            self.unknown.clear()

    def _keep_verified(
        self, key_hash: str, result: tuple[KeyRecord, OrgRecord]
    ) -> None:
        if self.stale_keys is None or self.stale_orgs is None:
            return
        key, org = result
        self.stale_keys[key_hash] = key
        self.stale_orgs[key.org_id] = org


class CachedKeyCopy:
    """A KeyLookup that returns RecordCache entries and reads the copy on a miss."""

    def __init__(
        self,
        copy: KeyLookup,
        cache: RecordCache,
        observe: Callable[[str], None] | None = None,
    ):
        self.copy = copy
        self.cache = cache
        # Called with "hit", "negative_hit", "miss" or "bypass" for each lookup.
        self.observe = observe
        # True from the first stale-if-error result until a lookup succeeds
        # again, so the warning is logged once per outage.
        self._serving_stale = False

    async def lookup(
        self, key_hash: str, deadline: float | None = None
    ) -> LookupResult:
        """Return the key and its org, or None for an unknown key.

        Raises CopyUnavailable, as the copy does, unless the stale-if-error
        window has the key. Failures are not cached.
        """
        hit = self.peek(key_hash)
        if hit is not None:
            return hit.result
        return await self.fetch(key_hash, deadline)

    def peek(self, key_hash: str) -> CacheHit | None:
        """Return the cached result without awaiting, or None on a miss.

        Counts a hit or a negative hit. A miss is counted by ``fetch``.
        """
        hit = self.cache.get(key_hash)
        if hit is not None and self.observe is not None:
            self.observe("hit" if hit.result is not None else "negative_hit")
        return hit

    async def fetch(self, key_hash: str, deadline: float | None = None) -> LookupResult:
        """Read the copy after a ``peek`` miss, and cache the result.

        Raises CopyUnavailable as ``lookup`` does.
        """
        if self.observe is not None:
            self.observe("miss" if self.cache.active else "bypass")
        generation = self.cache.generation
        try:
            result = await self.copy.lookup(key_hash, deadline)
        except CopyUnavailable as error:
            if isinstance(error, RedisUnavailable):
                self.cache.report_redis_failure()
            return self._stale_or_raise(key_hash, error)
        self.cache.put(key_hash, result, generation)
        if self._serving_stale:
            log.info("the Redis copy is available again; stale-if-error results stop")
            self._serving_stale = False
        return result

    def _stale_or_raise(self, key_hash: str, error: CopyUnavailable) -> LookupResult:
        stale = self.cache.get_stale(key_hash)
        if stale is None:
            raise error
        if not self._serving_stale:
            log.warning(
                "the Redis copy is unavailable (%s); deciding keys verified within "
                "HASP_STALE_IF_ERROR_SECONDS from memory",
                error,
            )
            self._serving_stale = True
        log.debug("stale-if-error result for key_id=%s", stale[0].key_id)
        return stale
