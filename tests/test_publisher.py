"""The Redis publisher, full sync and the watcher's org removal, against a real
Redis and SQLite file."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from hasp_authz.dev.redis_server import free_port
from hasp_authz.keystore import ApiKey
from hasp_authz.keystore.sqlite import SqliteKeyStore
from hasp_authz.publisher import (
    MAX_SYNC_ROUNDS,
    InvalidRedisUrl,
    Publisher,
    PublishError,
    connect,
    full_sync,
    redis_address,
)
from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.tokens import generate_token, hash_token
from hasp_authz.watcher import SyncWatcher

# Maximum difference in seconds between a message's publish time and the
# test's clock. Generous, because only a wrong clock or a missing ``at`` should
# fail it, not a slow machine.
PUBLISH_TIME_TOLERANCE = 5.0


@pytest.fixture
def store(tmp_path: Path):
    with SqliteKeyStore.open(str(tmp_path / "keystore.db")) as opened:
        opened.create_org("acme", baa_active=True)
        yield opened


@pytest.fixture
def publisher(redis_url: str, layout: RedisLayout, redis_client) -> Publisher:
    client = connect(redis_url, timeout=2.0)
    yield Publisher(client, layout)
    client.close()


@pytest.fixture
def subscriber(redis_client: redis.Redis, layout: RedisLayout):
    pubsub = redis_client.pubsub()
    pubsub.subscribe(layout.changes_channel)
    # Wait for the confirmation, so that no later PUBLISH can overtake it.
    assert pubsub.get_message(timeout=2.0)["type"] == "subscribe"
    yield pubsub
    pubsub.close()


def next_message(pubsub) -> str | None:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return message["data"]
    return None


def assert_change_message(raw: str | None, expected: dict[str, str]) -> None:
    """Check a published change message's fields, and that ``at`` is about now."""
    assert raw is not None, "no change message within 2 s"
    message = json.loads(raw)
    published_at = message.pop("at", None)
    assert message == expected
    assert isinstance(published_at, float), f"at is {published_at!r}"
    assert published_at == pytest.approx(time.time(), abs=PUBLISH_TIME_TOLERANCE)


def add_key(store: SqliteKeyStore, org_id: str = "acme", name: str = "ci") -> ApiKey:
    key_hash = hash_token(generate_token())
    return store.create_key(org_id, name, key_hash, ["ai:chat", "control:read"])


def names(client: redis.Redis, layout: RedisLayout) -> set[str]:
    return set(client.scan_iter(match=f"{layout.prefix}*", count=1000))


def test_publish_key_writes_record(store, publisher, redis_client, layout):
    key = add_key(store)
    publisher.publish_key(key)
    record = KeyRecord.from_json(redis_client.get(layout.key(key.key_hash)))
    assert record == KeyRecord(key.key_id, "acme", ("ai:chat", "control:read"))


def test_publish_key_sends_message(store, publisher, subscriber):
    key = add_key(store)
    publisher.publish_key(key)
    assert_change_message(
        next_message(subscriber), {"kind": "key", "hash": key.key_hash}
    )


def test_publish_key_expiry_as_epoch(store, publisher, redis_client, layout):
    key = add_key(store)
    expires = key.created_at + timedelta(days=30)
    publisher.publish_key(replace(key, expires_at=expires))
    record = KeyRecord.from_json(redis_client.get(layout.key(key.key_hash)))
    assert record.expires_at == expires.timestamp()


def test_publish_key_revoked_deletes(store, publisher, redis_client, layout):
    key = add_key(store)
    publisher.publish_key(key)
    revoked, _ = store.revoke_key(key.key_id)
    publisher.publish_key(revoked)
    assert redis_client.exists(layout.key(key.key_hash)) == 0


def test_remove_key_sends_message(store, publisher, subscriber, redis_client, layout):
    key = add_key(store)
    publisher.publish_key(key)
    assert_change_message(
        next_message(subscriber), {"kind": "key", "hash": key.key_hash}
    )
    publisher.remove_key(key.key_hash)
    assert_change_message(
        next_message(subscriber), {"kind": "key", "hash": key.key_hash}
    )
    assert redis_client.exists(layout.key(key.key_hash)) == 0


def test_publish_org(store, publisher, subscriber, redis_client, layout):
    org, _ = store.set_baa("acme", False)
    publisher.publish_org(org)
    assert OrgRecord.from_json(redis_client.get(layout.org("acme"))) == OrgRecord(
        "acme", False
    )
    assert_change_message(next_message(subscriber), {"kind": "org", "org_id": "acme"})


def test_full_sync_writes_active(store, redis_client, layout):
    store.create_org("beta")
    active = add_key(store)
    revoked = add_key(store, "beta")
    store.revoke_key(revoked.key_id)
    result = full_sync(store, redis_client, layout)
    assert (result.keys, result.orgs, result.removed) == (1, 2, 0)
    assert names(redis_client, layout) == {
        layout.key(active.key_hash),
        layout.org("acme"),
        layout.org("beta"),
        layout.complete_marker,
    }
    assert OrgRecord.from_json(redis_client.get(layout.org("acme"))).baa_active


def test_full_sync_removes_stale(store, redis_client, layout):
    key = add_key(store)
    stale_key = layout.key("0" * 64)
    redis_client.set(stale_key, KeyRecord("key_old", "acme", ("ai:chat",)).to_json())
    redis_client.set(layout.org("gone"), OrgRecord("gone", True).to_json())
    redis_client.set(layout.key(key.key_hash), "outdated")
    result = full_sync(store, redis_client, layout)
    assert result.removed == 2
    assert redis_client.exists(stale_key, layout.org("gone")) == 0
    assert KeyRecord.from_json(redis_client.get(layout.key(key.key_hash)))


def test_full_sync_leaves_other_names(store, redis_client, layout):
    other = RedisLayout(layout.prefix + "other:")
    unrelated = [f"{layout.prefix}unrelated", other.key("1" * 64), other.org("x")]
    for name in unrelated:
        redis_client.set(name, "keep")
    full_sync(store, redis_client, layout)
    assert redis_client.exists(*unrelated) == len(unrelated)


def test_full_sync_sets_marker(store, redis_client, layout):
    add_key(store)
    before = time.time()
    result = full_sync(store, redis_client, layout)
    marker = json.loads(redis_client.get(layout.complete_marker))
    assert marker == {"synced_at": result.synced_at, "keys": 1, "orgs": 1, "removed": 0}
    assert before <= marker["synced_at"] <= time.time()


def test_full_sync_publishes_flush(store, redis_client, layout, subscriber):
    full_sync(store, redis_client, layout)
    assert_change_message(next_message(subscriber), {"kind": "all"})


def test_watcher_org_removal_sends_message(
    store, tmp_path, redis_client, layout, subscriber
):
    store.create_org("beta")
    watcher = SyncWatcher(store, redis_client, layout)
    watcher.full_sync("test")
    assert_change_message(next_message(subscriber), {"kind": "all"})
    assert redis_client.exists(layout.org("beta")) == 1

    # The row is deleted by plain SQL, so only the change log reports it.
    with closing(sqlite3.connect(tmp_path / "keystore.db")) as connection:
        connection.execute("DELETE FROM orgs WHERE id = 'beta'")
        connection.commit()
    assert watcher.apply_changes() == 1

    assert redis_client.exists(layout.org("beta")) == 0
    assert_change_message(next_message(subscriber), {"kind": "org", "org_id": "beta"})


@pytest.mark.parametrize("batch_size", [1, 2, 500])
def test_full_sync_batches(store, redis_client, layout, batch_size: int):
    keys = [add_key(store, name=f"k{index}") for index in range(5)]
    for index in range(3):
        redis_client.set(layout.key(f"{index:064x}"), "stale")
    result = full_sync(store, redis_client, layout, batch_size=batch_size)
    assert (result.keys, result.removed) == (5, 3)
    for key in keys:
        assert redis_client.exists(layout.key(key.key_hash)) == 1


def test_full_sync_glob_prefix(store, redis_client, redis_prefix: str):
    layout = RedisLayout(redis_prefix + "[a]*?\\:")
    lookalike = RedisLayout(redis_prefix + "a-x\\:")
    redis_client.set(lookalike.key("2" * 64), "other tenant")
    redis_client.set(layout.key("3" * 64), "stale")
    result = full_sync(store, redis_client, layout)
    assert result.removed == 1
    assert redis_client.exists(lookalike.key("2" * 64)) == 1


def test_full_sync_bytes_client(store, redis_url: str, redis_client, layout):
    key = add_key(store)
    raw_client = redis.Redis.from_url(redis_url)
    full_sync(store, raw_client, layout)
    result = full_sync(store, raw_client, layout)
    raw_client.close()
    assert result.removed == 0
    assert redis_client.exists(layout.key(key.key_hash)) == 1


class RacingStore:
    """A store that runs ``race`` right after the sync's first read of the keys."""

    def __init__(self, store: SqliteKeyStore, race):
        self.store = store
        self.race = race
        self.reads = 0

    def list_orgs(self):
        return self.store.list_orgs()

    def list_keys(self, org_id=None, include_revoked=True):
        keys = self.store.list_keys(org_id, include_revoked)
        self.reads += 1
        if self.reads == 1:
            self.race()
        return keys


def test_full_sync_revoke_during_sync(store, publisher, redis_client, layout):
    key = add_key(store)

    def revoke_command():
        revoked, _ = store.revoke_key(key.key_id)
        publisher.publish_key(revoked)

    racing = RacingStore(store, revoke_command)
    result = full_sync(racing, redis_client, layout)
    assert redis_client.exists(layout.key(key.key_hash)) == 0
    assert result.keys == 0
    assert result.removed == 1


def test_full_sync_create_during_sync(store, publisher, redis_client, layout):
    created = []

    def create_command():
        created.append(add_key(store))
        publisher.publish_key(created[0])

    result = full_sync(RacingStore(store, create_command), redis_client, layout)
    assert redis_client.exists(layout.key(created[0].key_hash)) == 1
    assert result.keys == 1


def test_full_sync_store_never_settles(store, redis_client, layout):
    racing = RacingStore(store, lambda: None)
    racing.list_keys = lambda org_id=None, include_revoked=True: [add_key(store)]
    with pytest.raises(PublishError, match=f"each of {MAX_SYNC_ROUNDS} sync rounds"):
        full_sync(racing, redis_client, layout)
    assert redis_client.exists(layout.complete_marker) == 0


@pytest.mark.parametrize("password", [None, "s3cret-pw"])
def test_publish_unreachable_redis(store, layout, password: str | None):
    port = free_port()
    auth = f":{password}@" if password else ""
    publisher = Publisher(connect(f"redis://{auth}127.0.0.1:{port}/0", 0.5), layout)
    with pytest.raises(PublishError) as caught:
        publisher.publish_org(store.get_org("acme"))
    message = str(caught.value)
    assert f"Redis at 127.0.0.1:{port} failed" in message
    assert "s3cret-pw" not in message
    assert "\n" not in message


def test_full_sync_unreachable_redis(store, layout):
    client = connect(f"redis://127.0.0.1:{free_port()}/0", 0.5)
    with pytest.raises(PublishError, match="failed"):
        full_sync(store, client, layout)


@pytest.mark.parametrize(
    "url",
    ["http://:s3cret-pw@127.0.0.1/0", "redis://:s3cret-pw@127.0.0.1:port/0", ""],
    ids=["scheme", "port", "empty"],
)
def test_connect_invalid_url(url: str):
    with pytest.raises(InvalidRedisUrl, match="invalid Redis URL") as caught:
        connect(url)
    assert "s3cret-pw" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6390/0", "127.0.0.1:6390"),
        ("redis://:pw@127.0.0.1:7000/2", "127.0.0.1:7000"),
        ("unix:///tmp/redis.sock", "/tmp/redis.sock"),
    ],
)
def test_redis_address(url: str, address: str):
    assert redis_address(connect(url)) == address
