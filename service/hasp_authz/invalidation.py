"""Keep the in-process cache fresh: apply change messages from Redis pub/sub.

``hasp-keys`` publishes one message on ``{prefix}changes`` per change (see
records.py), and ``ChangeSubscriber`` applies each to the RecordCache:

- ``{"kind": "key", "hash": H}`` drops key H and its negative entry, so a key
  created after a failed lookup is usable at once;
- ``{"kind": "org", "org_id": O}`` drops org O;
- ``{"kind": "all"}`` (sent after a full sync) clears everything;
- anything else clears everything and logs a warning.

Each message may also carry ``"at"``, its publish time in epoch seconds. After
applying a message the subscriber passes that time, or None, to its
``on_change`` callback, which the server uses to measure the lag from publish
to invalidation. ``at`` is optional because older publishers leave it out, and
null counts as missing. Any other ``at`` that is not a finite number is ignored
with a warning, and the message is applied as if it had none, because a message
must never fail to invalidate because of its timestamp.

A direct change of the completeness marker (deleted by hand, FLUSHDB, a new
sync) publishes nothing, so the same connection also enables Redis client-side
caching invalidations for the marker key (CLIENT TRACKING ... BCAST PREFIX,
Redis 6.0 or newer) and clears the cache when one arrives. An empty or flushed
copy is then read from Redis and answered with 503, never from stale entries.
A server that rejects CLIENT TRACKING (an ACL, a proxy) leaves the subscription
down, so the cache stays bypassed and the warning names the error.

Tracking reports the changes made on the server it is enabled on. With
Sentinel the subscription is on the primary. A failover ends it, because
the old primary has died or Sentinel closes its client connections while
demoting it, and the next subscription queries the Sentinels for the new
primary. On a Redis Cluster the subscription is on the primary that serves
the marker's hash slot, found anew for each subscription.
NOTE: if that slot is moved to another node while the subscription stays up
(resharding), marker changes are not reported until the subscription is set
up again. Change messages still arrive, because a cluster forwards each
PUBLISH to the subscribers on every node.

While the subscription is down the cache is bypassed, because messages
published meanwhile are lost. The subscriber clears the cache on loss,
reconnects with exponential backoff (0.1 s doubling to 2 s), and clears it once
more after it has subscribed again, before the cache is used. A Check whose
Redis call failed bypasses the cache too (``RecordCache.report_redis_failure``),
and the subscriber then drops its connection and subscribes again, so the
cache returns only once Redis has answered a new subscription.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.backoff import ExponentialBackoff

from hasp_authz.cache import RecordCache
from hasp_authz.config import redact_url
from hasp_authz.records import RedisLayout
from hasp_authz.redis_clients import (
    CLUSTER,
    close_async_client,
    node_client_for_key,
    parse_redis_url,
)

log = logging.getLogger(__name__)

# The pub/sub channel on which Redis sends client-side caching invalidations to
# a RESP2 connection that redirects them to itself.
TRACKING_CHANNEL = "__redis__:invalidate"
# Seconds without any message before the subscriber sends PING. No reply within
# the same time counts as a lost connection. A frozen Redis or a connection that
# dies silently (no FIN or RST, as in a network partition) is so noticed within
# twice this, and cache hits go on until then unless a Check's own Redis call
# fails first. Two PINGs a second per process are no load for Redis.
KEEPALIVE_SECONDS = 0.5
# Connect and command timeout of the subscriber's connection, in seconds.
CONNECTION_TIMEOUT_SECONDS = 1.0


class Change(NamedTuple):
    """A parsed change message.

    ``subject`` is a key hash, an org id or None. ``published_at`` is the
    message's ``at`` in epoch seconds, or None when it is missing or invalid.
    """

    kind: str
    subject: str | None
    published_at: float | None = None


_SUBJECT_FIELDS = {"key": "hash", "org": "org_id"}


def parse_change(raw: bytes | str) -> Change:
    """Parse one change message. Raises ValueError when it is not a known kind.

    An invalid ``at`` never raises. It is logged and gives ``published_at=None``.
    """
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kind = data.get("kind")
    if kind == "all":
        return Change("all", None, _published_at(data, kind))
    if not isinstance(kind, str) or kind not in _SUBJECT_FIELDS:
        raise ValueError(f"unknown kind {kind!r:.40}")
    field = _SUBJECT_FIELDS[kind]
    subject = data.get(field)
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"{kind} message without a string {field!r}")
    return Change(kind, subject, _published_at(data, kind))


def _published_at(data: dict, kind: str) -> float | None:
    """Return the message's ``at`` as finite epoch seconds, or None."""
    at = data.get("at")
    if at is None:
        return None
    # json.loads returns true and false as bool, an int subclass, so they are
    # excluded by name. It returns NaN, Infinity and numbers beyond the float
    # range as non-finite floats.
    # NOTE: an integer of more than 4300 digits (Python's default int limit)
    # fails json.loads, so such a message is invalid and clears the whole cache.
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        try:
            seconds = float(at)
        except OverflowError:
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    log.warning(
        "ignoring invalid publish time at=%.40r in a %s change message; "
        "applying the change without it",
        at,
        kind,
    )
    return None


def apply_change_message(cache: RecordCache, raw: bytes | str) -> Change | None:
    """Drop the cache entries that one change message names.

    Returns the parsed change, or None for an invalid message, which clears the
    whole cache instead.
    """
    try:
        change = parse_change(raw)
    except ValueError as error:
        # NOTE: the raw message is not logged, because it may hold a key hash.
        log.warning(
            "invalid change message of %d bytes (%s); clearing the in-process cache",
            len(raw),
            error,
        )
        cache.clear()
        return None
    if change.kind == "key":
        cache.drop_key(change.subject)
    elif change.kind == "org":
        cache.drop_org(change.subject)
    else:
        cache.clear()
    log.debug("applied change message kind=%s", change.kind)
    return change


class ChangeSubscriber:
    """Subscribes to the change channel on its own connection and feeds a cache.

    ``on_change``, when given, is called with ``Change.published_at`` after each
    applied change message, but not for invalid messages or marker invalidations.
    """

    def __init__(
        self,
        redis_url: str,
        layout: RedisLayout,
        cache: RecordCache,
        *,
        backoff: ExponentialBackoff | None = None,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        on_change: Callable[[float | None], None] | None = None,
    ):
        self.target = parse_redis_url(redis_url)
        # Created by each subscription, on the server that stores the marker.
        self.client: redis.Redis | None = None
        self.redis_url = redact_url(redis_url)
        self.layout = layout
        self.cache = cache
        self.backoff = backoff or ExponentialBackoff(cap=2.0, base=0.1)
        self.keepalive_seconds = keepalive_seconds
        self.on_change = on_change
        self.failures = 0
        # True from a logged loss until the next subscription, so that a loss and
        # its recovery are each logged once, not once per retry.
        self._loss_logged = False

    async def run(self) -> None:
        """Subscribe and apply messages until cancelled, reconnecting on loss."""
        while True:
            try:
                await self._subscribe_and_listen()
            except Exception as error:
                # Any failure, a bug included, leaves the cache bypassed.
                self._on_lost(error)
            await asyncio.sleep(self.backoff.compute(self.failures))
            self.failures += 1

    async def close(self) -> None:
        if self.client is not None:
            await close_async_client(self.client)
            self.client = None

    async def _subscribe_and_listen(self) -> None:
        # The new subscription covers any failure reported before this point.
        self.cache.redis_failed = False
        client = await self._connect()
        async with client.pubsub() as pubsub:
            await pubsub.connect()
            await self._track_marker(pubsub.connection)
            await pubsub.subscribe(self.layout.changes_channel, TRACKING_CHANNEL)
            await self._listen(pubsub)

    async def _connect(self) -> redis.Redis:
        """Return a client on the server that stores the completeness marker.

        On a cluster the client is made anew for each subscription, from a
        fresh slot map, so a subscription after a failover finds the new
        primary. A Sentinel client queries the Sentinels on every new
        connection anyway, so it is kept.
        """
        if self.client is not None and self.target.mode != CLUSTER:
            return self.client
        await self.close()
        # NOTE: RESP2 on purpose. Under RESP3 (redis-py's default) Redis sends
        # tracking invalidations as push replies, which PubSub does not return.
        self.client = await node_client_for_key(
            self.target,
            self.layout.complete_marker,
            timeout=CONNECTION_TIMEOUT_SECONDS,
            protocol=2,
        )
        return self.client

    async def _track_marker(self, connection: Connection) -> None:
        """Have Redis send this connection an invalidation when the marker changes."""
        await connection.send_command("CLIENT", "ID")
        client_id = await connection.read_response()
        await connection.send_command(
            "CLIENT", "TRACKING", "ON", "REDIRECT", client_id,
            "BCAST", "PREFIX", self.layout.complete_marker,
        )  # fmt: skip
        await connection.read_response()

    async def _listen(self, pubsub: PubSub) -> None:
        unconfirmed = {self.layout.changes_channel, TRACKING_CHANNEL}
        awaiting_pong = False
        while True:
            message = await pubsub.get_message(timeout=self.keepalive_seconds)
            if self.cache.redis_failed:
                raise ConnectionError("a Check's Redis call failed; subscribing again")
            if message is None:
                if awaiting_pong:
                    raise ConnectionError(
                        f"no reply to PING within {self.keepalive_seconds:g} s"
                    )
                await pubsub.ping()
                awaiting_pong = True
                continue
            awaiting_pong = False
            self._handle(message, unconfirmed)

    def _handle(self, message: dict, unconfirmed: set[str]) -> None:
        kind = message["type"]
        channel = _text(message["channel"])
        if kind == "subscribe":
            unconfirmed.discard(channel)
            if not unconfirmed:
                self._on_subscribed()
        elif kind == "message" and channel == TRACKING_CHANNEL:
            log.debug("completeness marker changed; clearing the in-process cache")
            self.cache.clear()
        elif kind == "message":
            change = apply_change_message(self.cache, message["data"])
            if change is not None:
                self._report_change(change)
        elif kind == "unsubscribe":
            raise ConnectionError(f"Redis unsubscribed this connection from {channel}")

    def _report_change(self, change: Change) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(change.published_at)
        except Exception:
            # The change is already applied, so a failing callback (a metrics
            # bug) must not take the subscription and the cache down with it.
            log.exception("on_change callback failed for a %s change", change.kind)

    def _on_subscribed(self) -> None:
        self.cache.resume()
        self.failures = 0
        if self._loss_logged:
            log.info(
                "change subscription restored on %s; in-process cache in use again",
                self.redis_url,
            )
            self._loss_logged = False
        else:
            log.info(
                "subscribed to %s on %s; in-process cache in use",
                self.layout.changes_channel,
                self.redis_url,
            )

    def _on_lost(self, error: Exception) -> None:
        self.cache.suspend()
        if self._loss_logged:
            log.debug("change subscription still down: %s", _describe(error))
            return
        self._loss_logged = True
        log.warning(
            "change subscription to %s on %s is down (%s); bypassing the "
            "in-process cache and reconnecting",
            self.layout.changes_channel,
            self.redis_url,
            _describe(error),
        )


def _describe(error: Exception) -> str:
    # NOTE: redis-py 8 errors have a repr such as "network:ConnectionError"
    # without the message, so the log line names the type and the message.
    return f"{type(error).__name__}: {error}"


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""
