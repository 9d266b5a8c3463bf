"""Read side of the Redis copy: key and org records for the Check path.

``RedisKeyCopy`` reads Redis on every call; ``cache.CachedKeyCopy`` puts the
in-process cache in front of it. Both are a ``KeyLookup``.

Every failure here (connection refused, timeout, a missing completeness
marker, a record that does not parse) raises CopyUnavailable, which the
servicer turns into the 503 AUTH_UNAVAILABLE deny. An unknown key is not a
failure: it returns None and becomes a 401.
"""

from __future__ import annotations

import logging
from typing import Protocol, TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout

log = logging.getLogger(__name__)
_Record = TypeVar("_Record", KeyRecord, OrgRecord)

# A known key and its org, or None when the copy has no record of the hash.
LookupResult = tuple[KeyRecord, OrgRecord] | None


class CopyUnavailable(Exception):
    """The Redis copy cannot answer right now. The message is for logs only."""


class KeyLookup(Protocol):
    async def lookup(self, key_hash: str) -> LookupResult:
        """Return the key and its org, or None. Raises CopyUnavailable."""
        ...


class RedisKeyCopy:
    """Looks up key and org records in the Redis copy."""

    def __init__(self, client: redis.Redis, layout: RedisLayout):
        self.client = client
        self.layout = layout

    async def lookup(self, key_hash: str) -> LookupResult:
        """Return the key and its org, or None when the copy has no such key.

        Raises CopyUnavailable when Redis fails, the completeness marker is
        missing, or a record is malformed or points at a missing org.
        """
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(self.layout.complete_marker)
                pipe.get(self.layout.key(key_hash))
                marker, raw_key = await pipe.execute()
            if not marker:
                raise CopyUnavailable("the completeness marker is missing")
            if raw_key is None:
                return None
            key = _parse(KeyRecord, raw_key)
            raw_org = await self.client.get(self.layout.org(key.org_id))
        except RedisError as error:
            raise CopyUnavailable(f"Redis failed: {error}") from error
        if raw_org is None:
            raise CopyUnavailable(f"key {key.key_id} names org {key.org_id}, not found")
        return key, _parse(OrgRecord, raw_org)


def _parse(record_type: type[_Record], raw: bytes | str) -> _Record:
    try:
        return record_type.from_json(raw)
    except (ValueError, KeyError, TypeError) as error:
        raise CopyUnavailable(f"malformed {record_type.__name__}: {error}") from error
