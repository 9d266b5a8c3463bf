"""Write the Redis copy of the key store and announce each change.

``Publisher`` updates one record and publishes the matching change message, for
``hasp-keys create``, ``revoke`` and BAA changes. ``full_sync`` rebuilds the whole
copy from the store, deletes records the store no longer has, and then sets the
complete marker. The record layout and the messages come from ``records``. Each
message carries its publish time (``time.time()`` just before the Redis
transaction), so servers can measure how long a change took to reach them.

Redis errors become PublishError, whose message names the server as host:port and
never contains the password from the URL.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hasp_authz.keystore import ApiKey, KeyStore, Org
from hasp_authz.records import (
    KeyRecord,
    OrgRecord,
    RedisLayout,
    flush_message,
    key_changed_message,
    org_changed_message,
)

DEFAULT_TIMEOUT = 5.0
BATCH_SIZE = 500
# A sync re-reads the store until two reads agree. Each extra round means another
# process changed the store during the previous one, so a few rounds are plenty.
MAX_SYNC_ROUNDS = 5


class PublishError(Exception):
    """A Redis command failed, or the store kept changing during a sync."""


class InvalidRedisUrl(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SyncResult:
    """Counts written by ``full_sync``. ``synced_at`` is in seconds since the epoch."""

    keys: int
    orgs: int
    removed: int
    synced_at: float


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> redis.Redis:
    """Create a client for ``url`` without connecting yet.

    ``timeout`` in seconds bounds both the connect and each command. A failed
    connection is retried twice with a short backoff, so an unreachable server
    fails within a few timeouts. Raises InvalidRedisUrl for a malformed URL.
    """
    try:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        )
    except ValueError as exc:
        detail = _without_password(str(exc), _url_password(url))
        raise InvalidRedisUrl(
            f"invalid Redis URL ({detail}), expected redis://host:port/db"
        ) from None


def redis_address(client: redis.Redis) -> str:
    """Return the server of ``client`` as host:port, or the socket path."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def key_record(key: ApiKey) -> KeyRecord:
    expires_at = None if key.expires_at is None else key.expires_at.timestamp()
    return KeyRecord(key.key_id, key.org_id, key.scopes, expires_at)


def org_record(org: Org) -> OrgRecord:
    return OrgRecord(org.org_id, org.baa_active)


class Publisher:
    """Update single records in the Redis copy and publish each change."""

    def __init__(self, client: redis.Redis, layout: RedisLayout):
        self.client = client
        self.layout = layout

    def publish_key(self, key: ApiKey) -> None:
        """Write an active key's record, or delete a revoked key's record."""
        if not key.active:
            self.remove_key(key.key_hash)
            return
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.layout.key(key.key_hash), key_record(key).to_json())
            pipe.publish(
                self.layout.changes_channel,
                key_changed_message(key.key_hash, at=time.time()),
            )
            pipe.execute()

    def remove_key(self, key_hash: str) -> None:
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.layout.key(key_hash))
            pipe.publish(
                self.layout.changes_channel,
                key_changed_message(key_hash, at=time.time()),
            )
            pipe.execute()

    def publish_org(self, org: Org) -> None:
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.layout.org(org.org_id), org_record(org).to_json())
            pipe.publish(
                self.layout.changes_channel,
                org_changed_message(org.org_id, at=time.time()),
            )
            pipe.execute()


def full_sync(
    store: KeyStore,
    redis_client: redis.Redis,
    layout: RedisLayout,
    batch_size: int = BATCH_SIZE,
) -> SyncResult:
    """Make the Redis copy equal to the store, set the marker and publish a flush.

    Writes every org and active key, then deletes key and org records that the
    store does not have. The store is then read again, and any difference is
    applied until two reads agree. That way a create or revoke that runs at the
    same time is neither undone nor lost.
    Raises PublishError, or KeyStoreError when reading the store fails.
    """
    with redis_errors(redis_client):
        records = _store_records(store, layout)
        _write(redis_client, records, batch_size)
        removed = _delete_stale(redis_client, layout, records, batch_size)
        records, removed_later = _settle(
            store, redis_client, layout, records, batch_size
        )
        result = SyncResult(
            keys=_count(records, layout.key("")),
            orgs=_count(records, layout.org("")),
            removed=removed + removed_later,
            synced_at=time.time(),
        )
        _mark_complete(redis_client, layout, result)
    return result


def _store_records(store: KeyStore, layout: RedisLayout) -> dict[str, str]:
    """Return the Redis copy the store calls for, as record name to JSON."""
    records = {
        layout.org(org.org_id): org_record(org).to_json() for org in store.list_orgs()
    }
    for key in store.list_keys(include_revoked=False):
        records[layout.key(key.key_hash)] = key_record(key).to_json()
    return records


def _settle(
    store: KeyStore,
    client: redis.Redis,
    layout: RedisLayout,
    written: dict[str, str],
    batch_size: int,
) -> tuple[dict[str, str], int]:
    """Re-read the store and apply changes until a read matches what was written.

    Returns the final records and the number of records deleted on the way.
    """
    removed = 0
    for _ in range(MAX_SYNC_ROUNDS):
        latest = _store_records(store, layout)
        if latest == written:
            return latest, removed
        changed = {
            name: value for name, value in latest.items() if written.get(name) != value
        }
        deleted = [name for name in written if name not in latest]
        _write(client, changed, batch_size)
        _delete(client, deleted, batch_size)
        removed += len(deleted)
        written = latest
    raise PublishError(
        f"the key store changed during each of {MAX_SYNC_ROUNDS} sync rounds: "
        "run 'hasp-keys sync' again when fewer changes are running"
    )


def _write(client: redis.Redis, records: dict[str, str], batch_size: int) -> None:
    for batch in _batches(list(records.items()), batch_size):
        pipe = client.pipeline(transaction=False)
        for name, value in batch:
            pipe.set(name, value)
        pipe.execute()


def _delete(client: redis.Redis, names: list[str], batch_size: int) -> None:
    for batch in _batches(names, batch_size):
        client.delete(*batch)


def _delete_stale(
    client: redis.Redis, layout: RedisLayout, keep: dict[str, str], batch_size: int
) -> int:
    """Delete the key and org records missing from ``keep``.

    Returns the number of records deleted.
    """
    stale: set[str] = set()
    for namespace in (layout.key(""), layout.org("")):
        pattern = _glob_escape(namespace) + "*"
        for name in client.scan_iter(match=pattern, count=1000):
            # NOTE: a client made without decode_responses returns bytes, which
            # never equal the str names, so every record would look stale.
            if isinstance(name, bytes):
                name = name.decode()
            if name not in keep:
                stale.add(name)
    _delete(client, sorted(stale), batch_size)
    return len(stale)


def _mark_complete(
    client: redis.Redis, layout: RedisLayout, result: SyncResult
) -> None:
    marker = json.dumps(
        {
            "synced_at": result.synced_at,
            "keys": result.keys,
            "orgs": result.orgs,
            "removed": result.removed,
        },
        separators=(",", ":"),
    )
    pipe = client.pipeline(transaction=True)
    pipe.set(layout.complete_marker, marker)
    pipe.publish(layout.changes_channel, flush_message(at=time.time()))
    pipe.execute()


@contextmanager
def redis_errors(client: redis.Redis) -> Iterator[None]:
    """Convert redis-py errors into PublishError naming the server."""
    try:
        yield
    except redis.RedisError as exc:
        password = client.connection_pool.connection_kwargs.get("password")
        detail = _without_password(str(exc) or type(exc).__name__, password)
        raise PublishError(
            f"Redis at {redis_address(client)} failed: {detail}"
        ) from exc


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _count(records: dict[str, str], namespace: str) -> int:
    return sum(1 for name in records if name.startswith(namespace))


def _glob_escape(text: str) -> str:
    """Escape the characters that SCAN MATCH treats as glob syntax."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _without_password(text: str, password: str | None) -> str:
    # NOTE: a guard only. No redis-py message seen so far contains the password.
    if password:
        text = text.replace(password, "***")
    return text
