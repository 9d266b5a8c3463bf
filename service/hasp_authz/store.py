"""Read side of the Redis copy: key and org records for the Check path.

``RedisKeyCopy`` reads Redis on every call; ``cache.CachedKeyCopy`` puts the
in-process cache in front of it. Both are a ``KeyLookup``.

Every failure here (connection refused, timeout, a missing completeness
marker, a record that does not parse) raises CopyUnavailable, which the
servicer turns into the 503 AUTH_UNAVAILABLE deny. An unknown key is not a
failure: it returns None and becomes a 401. RedisUnavailable, a subclass, marks
the failures of Redis itself (an error or no reply in time), as opposed to a
copy that Redis returned but that cannot be used.

Time limit and retry policy. A lookup ends at the Check's deadline, whatever
it is doing: waiting for a pooled connection, connecting, or waiting for a
reply. That counts as a Redis failure only when the deadline left at least one
Redis timeout from the start; a Check that came in late says nothing about
Redis. A failed lookup is retried once, at once, and only when the connection
failed (refused, reset or closed by Redis, as in a restart or failover) and at
least one Redis timeout of the budget remains. redis-py has dropped the failed
connection by then, so the retry runs on a new one. A timeout is not retried,
because more requests make a slow Redis slower, and neither is a wait for a
pooled connection that ran out, because that is overload.

Round trips. A lookup is one round trip: a Lua script (EVALSHA) returns the
completeness marker, the key record and the org record that the key names.
The script reads the org key without declaring it in KEYS, which a standalone
Redis allows (Sentinel included) but Redis Cluster does not, because the org
key may live in another slot. With ``single_round_trip=False``, which the
server sets for a ``redis+cluster://`` URL, a lookup makes two round trips
instead: one non-transactional pipeline for the marker and the key record,
then a GET of the org. On a cluster the pipeline goes to the nodes that serve
the two slots, so the two reads are not taken at one instant. That is safe
because the sync writes a key's org before the key and deletes the key before
its org (publisher.py), and a key record without its org is a 503, not a 401.

A Redis call cancelled at the deadline never leaves its reply for another
request: redis-py 8.2's asyncio ``Connection.read_response`` and pipeline
execution disconnect on any exception, CancelledError included, before the
connection returns to the pool (tests/test_faults.py checks this).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.redis_clients import REDIS_ERRORS

log = logging.getLogger(__name__)
_Record = TypeVar("_Record", KeyRecord, OrgRecord)

# A known key and its org, or None when the copy has no record of the hash.
LookupResult = tuple[KeyRecord, OrgRecord] | None


# Tries of one lookup: the first and at most one retry.
MAX_ATTEMPTS = 2

# KEYS[1] is the completeness marker and KEYS[2] the key record. ARGV[1] is
# the prefix of org records. The org id comes from the key record's JSON. A
# record that does not decode comes back alone, and Python reports it as
# malformed. The org record's key is not declared, so Redis Cluster rejects
# this script.
LOOKUP_SCRIPT = """
local marker = redis.call('EXISTS', KEYS[1])
local raw_key = redis.call('GET', KEYS[2])
if marker == 0 or not raw_key then
  return {marker, raw_key}
end
local ok, record = pcall(cjson.decode, raw_key)
if not ok or type(record) ~= 'table' or type(record.org_id) ~= 'string' then
  return {marker, raw_key}
end
return {marker, raw_key, redis.call('GET', ARGV[1] .. record.org_id)}
"""


class CopyUnavailable(Exception):
    """The Redis copy cannot respond right now. The message is for logs only."""


class RedisUnavailable(CopyUnavailable):
    """Redis failed, or sent no reply before the Check's deadline."""


class KeyLookup(Protocol):
    async def lookup(
        self, key_hash: str, deadline: float | None = None
    ) -> LookupResult:
        """Return the key and its org, or None. Raises CopyUnavailable.

        ``deadline`` is a time of the running event loop's clock
        (``loop.time()``); None sets no limit beyond the client's timeouts.
        """
        ...


class RedisKeyCopy:
    """Looks up key and org records in the Redis copy."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        layout: RedisLayout,
        *,
        redis_timeout_seconds: float = 0.0,
        on_redis_error: Callable[[], None] | None = None,
        single_round_trip: bool = True,
    ):
        if single_round_trip and isinstance(client, RedisCluster):
            raise ValueError(
                "Redis Cluster rejects the lookup script, which reads an org record "
                "in an undeclared slot; pass single_round_trip=False"
            )
        self.client = client
        self.layout = layout
        self._script = (
            client.register_script(LOOKUP_SCRIPT) if single_round_trip else None
        )
        self._org_prefix = layout.org("")
        # Called once for each lookup that raises RedisUnavailable.
        self.on_redis_error = on_redis_error
        # One Redis timeout. A retry starts only when this much time remains
        # before the deadline, and a deadline that left less than this from the
        # start is no evidence that Redis failed.
        self.redis_timeout_seconds = redis_timeout_seconds

    async def lookup(
        self, key_hash: str, deadline: float | None = None
    ) -> LookupResult:
        """Return the key and its org, or None when the copy has no such key.

        Raises RedisUnavailable when Redis fails, or when the deadline passes
        although it left one Redis timeout or more. Raises CopyUnavailable
        when a shorter deadline passes, when the completeness marker is
        missing, or when a record is malformed or points at a missing org.
        """
        try:
            return await self._lookup(key_hash, deadline)
        except RedisUnavailable:
            if self.on_redis_error is not None:
                self.on_redis_error()
            raise

    async def _lookup(self, key_hash: str, deadline: float | None) -> LookupResult:
        budget = self._remaining(deadline)
        attempt = 1
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._read(key_hash)
            except TimeoutError:
                raise self._deadline_error(budget) from None
            except REDIS_ERRORS as error:
                if attempt >= MAX_ATTEMPTS or not self._may_retry(error, deadline):
                    raise RedisUnavailable(
                        f"Redis failed: {_describe(error)}"
                    ) from error
                log.debug("retrying a Redis lookup after %s", _describe(error))
                attempt += 1

    def _may_retry(self, error: Exception, deadline: float | None) -> bool:
        if not _is_connection_failure(error):
            return False
        return self._remaining(deadline) >= self.redis_timeout_seconds

    def _deadline_error(self, budget: float) -> CopyUnavailable:
        message = f"no reply from Redis within the {budget * 1000:.0f} ms left"
        if budget < self.redis_timeout_seconds:
            # The Check came in late (a busy process, or a short RPC deadline).
            return CopyUnavailable(f"the check budget ran out: {message}")
        return RedisUnavailable(f"Redis timed out: {message}")

    @staticmethod
    def _remaining(deadline: float | None) -> float:
        if deadline is None:
            return math.inf
        return deadline - asyncio.get_running_loop().time()

    async def _read(self, key_hash: str) -> LookupResult:
        if self._script is not None:
            keys = [self.layout.complete_marker, self.layout.key(key_hash)]
            reply = await self._script(keys=keys, args=[self._org_prefix])
            marker, raw_key = reply[0], reply[1]
            raw_org = reply[2] if len(reply) > 2 else None
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(self.layout.complete_marker)
                pipe.get(self.layout.key(key_hash))
                marker, raw_key = await pipe.execute()
        if not marker:
            raise CopyUnavailable("the completeness marker is missing")
        if raw_key is None:
            return None
        key = _parse(KeyRecord, raw_key)
        if self._script is None:
            raw_org = await self.client.get(self.layout.org(key.org_id))
        if raw_org is None:
            raise CopyUnavailable(f"key {key.key_id} names org {key.org_id}, not found")
        return key, _parse(OrgRecord, raw_org)


def _is_connection_failure(error: Exception) -> bool:
    """Return True for a failed connection, which is worth one retry.

    Returns False for overload (no free pooled connection) and slowness.
    """
    if not isinstance(error, RedisConnectionError):
        return False
    if isinstance(error, MaxConnectionsError):
        return False
    # NOTE: when no pooled connection comes free in time, redis-py 8.2's
    # BlockingConnectionPool raises a plain ConnectionError ("No connection
    # available.") caused by a TimeoutError. A read that hit ETIMEDOUT looks
    # the same, so neither is retried.
    return not isinstance(error.__cause__, TimeoutError)


def _describe(error: Exception) -> str:
    # redis-py 8 errors have a repr without the message, so name both.
    return f"{type(error).__name__}: {error}"


def _parse(record_type: type[_Record], raw: bytes | str) -> _Record:
    try:
        return record_type.from_json(raw)
    except (ValueError, KeyError, TypeError) as error:
        raise CopyUnavailable(f"malformed {record_type.__name__}: {error}") from error
