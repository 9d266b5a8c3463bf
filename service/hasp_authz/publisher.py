"""Write the Redis copy of the key store and announce each change.

``Publisher`` updates one record and publishes the matching change message, for
``hasp-keys create``, ``revoke`` and BAA changes. ``full_sync`` rebuilds the whole
copy from the store, deletes records the store no longer has, and then sets the
complete marker. The record layout and the messages come from ``records``. Each
message carries its publish time (``time.time()`` just before the Redis
script that writes the record and publishes it), so servers can measure how
long a change took to reach them.

The same writes serve one server, Sentinel and Redis Cluster. A record and its
change message go to Redis as one Lua script with the record as its only key,
so they run together on the server that stores the record. No subscriber
receives the message without the write, and a Redis that fails takes neither.
A MULTI transaction would do the same on one server, but redis-py rejects
PUBLISH in a cluster pipeline. A cluster forwards a PUBLISH made in a script
to the subscribers on every node. Records of different slots are not written
atomically together, so the order of the writes keeps every intermediate
state safe for the Check path (store.py):

- a full sync writes every org before any key, so no key record names an org
  that is not there yet; it deletes stale key records before stale org
  records, for the same reason;
- the completeness marker is written last, with the full-sync message, so a
  server that finds the marker reads a complete copy;
- ``hasp-keys create`` runs after the org exists, because the store requires
  it, and the org record was written when the org was created.

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
from hasp_authz.redis_clients import (
    REDIS_ERRORS,
    RedisTarget,
    SyncClient,
    describe_sync_client,
    example_for,
    parse_redis_url,
    sync_client,
    sync_client_password,
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


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> SyncClient:
    """Create a client for ``url``; only a cluster client connects at once.

    ``url`` has any form that redis_clients.parse_redis_url takes. ``timeout``
    in seconds bounds both the connect and each command. A failed connection
    is retried twice with a short backoff, so an unreachable server fails
    within a few timeouts. Raises InvalidRedisUrl for a malformed URL, and
    PublishError when no node of a cluster replies.
    """
    target = check_redis_url(url)
    try:
        return sync_client(
            target,
            timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            decode_responses=True,
        )
    except REDIS_ERRORS as exc:
        detail = _without_password(str(exc) or type(exc).__name__, target.password)
        raise PublishError(f"Redis at {target.address} failed: {detail}") from exc


def check_redis_url(url: str) -> RedisTarget:
    """Parse ``url`` without connecting. Raises InvalidRedisUrl for a bad URL."""
    try:
        return parse_redis_url(url)
    except ValueError as exc:
        detail = _without_password(str(exc), _url_password(url))
        raise InvalidRedisUrl(
            f"invalid Redis URL in HASP_REDIS_URL or --redis-url ({detail}); "
            f"expected a URL such as {example_for(url)}"
        ) from None


def redis_address(client: SyncClient) -> str:
    """Return the server of ``client`` as host:port, the socket path, or the
    Sentinel service or cluster it belongs to."""
    return describe_sync_client(client)


def key_record(key: ApiKey) -> KeyRecord:
    expires_at = None if key.expires_at is None else key.expires_at.timestamp()
    return KeyRecord(key.key_id, key.org_id, key.scopes, expires_at)


def org_record(org: Org) -> OrgRecord:
    return OrgRecord(org.org_id, org.baa_active)


# KEYS[1] is a record. ARGV[1] is its JSON, or empty to delete the record;
# records are never empty. ARGV[2] is the change channel and ARGV[3] the
# message. Returns the number of subscribers on this node, which on a cluster
# is not the number that the message reaches.
WRITE_AND_PUBLISH_SCRIPT = """
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""


class Publisher:
    """Update single records in the Redis copy and publish each change."""

    def __init__(self, client: SyncClient, layout: RedisLayout):
        self.client = client
        self.layout = layout

    def publish_key(self, key: ApiKey) -> None:
        """Write an active key's record, or delete a revoked key's record."""
        if not key.active:
            self.remove_key(key.key_hash)
            return
        self._write(
            self.layout.key(key.key_hash),
            key_record(key).to_json(),
            key_changed_message(key.key_hash, at=time.time()),
        )

    def remove_key(self, key_hash: str) -> None:
        self._write(
            self.layout.key(key_hash), "", key_changed_message(key_hash, at=time.time())
        )

    def publish_org(self, org: Org) -> None:
        self._write(
            self.layout.org(org.org_id),
            org_record(org).to_json(),
            org_changed_message(org.org_id, at=time.time()),
        )

    def remove_org(self, org_id: str) -> None:
        """Delete an org's record, for an org that is gone from the store."""
        self._write(
            self.layout.org(org_id), "", org_changed_message(org_id, at=time.time())
        )

    def _write(self, name: str, value: str, message: str) -> None:
        with redis_errors(self.client):
            write_and_publish(self.client, name, value, self.layout, message)


def write_and_publish(
    client: SyncClient,
    name: str,
    value: str,
    layout: RedisLayout,
    message: str,
) -> None:
    """Set record ``name`` to ``value``, or delete it when ``value`` is empty,
    and publish ``message`` on the change channel, in one script."""
    script = client.register_script(WRITE_AND_PUBLISH_SCRIPT)
    script(keys=[name], args=[value, layout.changes_channel, message])


def full_sync(
    store: KeyStore,
    redis_client: SyncClient,
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
        _write(redis_client, records, layout, batch_size)
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
    client: SyncClient,
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
        _write(client, changed, layout, batch_size)
        _delete(client, deleted, layout, batch_size)
        removed += len(deleted)
        written = latest
    raise PublishError(
        f"the key store changed during each of {MAX_SYNC_ROUNDS} sync rounds: "
        "run 'hasp-keys sync' again when fewer changes are running"
    )


def _write(
    client: SyncClient,
    records: dict[str, str],
    layout: RedisLayout,
    batch_size: int,
) -> None:
    """Write ``records``, every org record before the first key record.

    A batch is a non-transactional pipeline, which redis-py splits by node on
    a cluster, and ``execute`` returns once every node has replied.
    """
    org_prefix = layout.org("")
    orgs = [item for item in records.items() if item[0].startswith(org_prefix)]
    others = [item for item in records.items() if not item[0].startswith(org_prefix)]
    for items in (orgs, others):
        for batch in _batches(items, batch_size):
            pipe = client.pipeline(transaction=False)
            for name, value in batch:
                pipe.set(name, value)
            pipe.execute()


def _delete(
    client: SyncClient,
    names: list[str],
    layout: RedisLayout,
    batch_size: int,
) -> None:
    """Delete ``names``, every key record before the first org record."""
    org_prefix = layout.org("")
    orgs = [name for name in names if name.startswith(org_prefix)]
    others = [name for name in names if not name.startswith(org_prefix)]
    for group in (others, orgs):
        for batch in _batches(group, batch_size):
            # DEL of names in several slots: redis-py's cluster client splits
            # it into one DEL per slot.
            client.delete(*batch)


def _delete_stale(
    client: SyncClient,
    layout: RedisLayout,
    keep: dict[str, str],
    batch_size: int,
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
    _delete(client, sorted(stale), layout, batch_size)
    return len(stale)


def _mark_complete(
    client: SyncClient,
    layout: RedisLayout,
    result: SyncResult,
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
    write_and_publish(
        client, layout.complete_marker, marker, layout, flush_message(at=time.time())
    )


@contextmanager
def redis_errors(client: SyncClient) -> Iterator[None]:
    """Convert redis-py errors into PublishError naming the server."""
    try:
        yield
    except REDIS_ERRORS as exc:
        password = sync_client_password(client)
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
    return _without_client_reprs(text)


def _without_client_reprs(text: str) -> str:
    """Replace each ``<redis.client.Redis(...)>`` repr with ``a Sentinel``.

    redis-py's MasterNotFoundError names every Sentinel it asked by the repr
    of its client, about 1.5 kB each, which buries the cause that follows it.
    """
    result = []
    index = 0
    while (start := text.find("<redis.", index)) != -1:
        result.append(text[index:start])
        depth = 0
        end = start
        while end < len(text):
            if text[end] == "<":
                depth += 1
            elif text[end] == ">":
                depth -= 1
                if depth == 0:
                    break
            end += 1
        result.append("a Sentinel")
        index = end + 1
    result.append(text[index:])
    return "".join(result)
