"""``hasp-keys sync --watch`` through the real Envoy stack, on both key stores.

A control plane writes the store directly in SQL; the watcher must carry each
change to Redis, and the servers must act on it, within 1 s. The watcher also
rebuilds a Redis that lost its data and removes records the store no longer
has. Each test starts its own stack (Redis, watcher, hasp-authz, upstream,
Envoy) so it can restart Redis without disturbing other tests.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis

from hasp_authz.dev.stack import LocalStack, StackPorts
from hasp_authz.records import KeyRecord, RedisLayout
from hasp_authz.tokens import generate_token, hash_token
from test_e2e import Stack

pytestmark = pytest.mark.e2e

WATCH_ARGUMENTS = ("--full-sync-seconds", "3", "--last-used-seconds", "1")
AUTHZ_ENV = {"HASP_LAST_USED_FLUSH_SECONDS": "0.5"}


@pytest.fixture
def stack(keystore_url: str, tmp_path: Path) -> Iterator[Stack]:
    local = LocalStack(
        workdir=tmp_path / "stack",
        keystore_url=keystore_url,
        ports=StackPorts.free(),
        watch_arguments=WATCH_ARGUMENTS,
        authz_env=AUTHZ_ENV,
    )
    local.start()
    try:
        local.hasp_keys("orgs", "create", "acme", "--baa")
        stack = Stack(local, keys={}, key_ids={})
        created = stack.create_key("acme", "chat", "ai:chat")
        stack.keys["chat"] = created["token"]
        stack.key_ids["chat"] = created["key_id"]
        yield stack
    finally:
        local.stop()


def run_sql(keystore_url: str, statement: str, parameters: tuple = ()) -> None:
    """Run one statement directly against the store, as a control plane would."""
    if keystore_url.startswith("sqlite:///"):
        path = keystore_url.removeprefix("sqlite:///")
        with closing(sqlite3.connect(path)) as connection:
            connection.execute(statement, parameters)
            connection.commit()
        return
    with psycopg.connect(keystore_url, autocommit=True) as connection:
        connection.execute(statement.replace("?", "%s"), parameters)


def now_text(keystore_url: str) -> object:
    """Return the current time in the form the backend stores."""
    moment = datetime.now(UTC)
    if keystore_url.startswith("sqlite:///"):
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
    return moment


def wait_until(
    condition: Callable[[], bool], limit: float, interval: float = 0.02
) -> float:
    """Poll ``condition`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed <= limit, f"condition still false after {elapsed:.2f} s"
        time.sleep(interval)
    return time.monotonic() - started


def chat_status(stack: Stack, token: str) -> Callable[[], int]:
    return lambda: stack.request("POST", "/v1/ai/chat", token=token).status


def test_sql_revoke_seen_within_1s(stack: Stack) -> None:
    status = chat_status(stack, stack.keys["chat"])
    assert status() == 200
    run_sql(
        stack.local.keystore_url,
        "UPDATE api_keys SET revoked_at = ? WHERE id = ?",
        (now_text(stack.local.keystore_url), stack.key_ids["chat"]),
    )
    assert wait_until(lambda: status() == 401, limit=1.0) <= 1.0


def test_sql_insert_usable_within_1s(stack: Stack) -> None:
    token = generate_token()
    status = chat_status(stack, token)
    assert status() == 401
    key_id = "key_" + uuid.uuid4().hex[:20].translate(str.maketrans("ilou", "0123"))
    run_sql(
        stack.local.keystore_url,
        "INSERT INTO api_keys (id, org_id, name, key_hash, scopes) "
        "VALUES (?, ?, ?, ?, ?)",
        (key_id, "acme", "inserted by SQL", hash_token(token), "ai:chat"),
    )
    assert wait_until(lambda: status() == 200, limit=1.0) <= 1.0


def test_sql_baa_off_seen_within_1s(stack: Stack) -> None:
    status = chat_status(stack, stack.keys["chat"])
    assert status() == 200
    run_sql(
        stack.local.keystore_url,
        "UPDATE orgs SET baa_active = ? WHERE id = ?",
        (False, "acme"),
    )
    assert wait_until(lambda: status() == 402, limit=1.0) <= 1.0


def test_sql_delete_removes_record(stack: Stack) -> None:
    status = chat_status(stack, stack.keys["chat"])
    assert status() == 200
    run_sql(
        stack.local.keystore_url,
        "DELETE FROM api_keys WHERE id = ?",
        (stack.key_ids["chat"],),
    )
    assert wait_until(lambda: status() == 401, limit=1.0) <= 1.0


def test_flushed_redis_repopulated(stack: Stack) -> None:
    status = chat_status(stack, stack.keys["chat"])
    client = redis.Redis.from_url(stack.local.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    assert status() == 503
    assert wait_until(lambda: status() == 200, limit=5.0, interval=0.1) <= 5.0


def test_restarted_redis_repopulated(stack: Stack) -> None:
    status = chat_status(stack, stack.keys["chat"])
    assert status() == 200
    stack.local.restart_redis()
    assert status() in (503, 200)
    assert wait_until(lambda: status() == 200, limit=5.0, interval=0.1) <= 5.0


def test_stale_record_removed(stack: Stack) -> None:
    token = generate_token()
    layout = RedisLayout(stack.local.redis_prefix)
    client = redis.Redis.from_url(stack.local.redis_url)
    try:
        stray = KeyRecord("key_stray0000000000000000", "acme", ("ai:chat",))
        client.set(layout.key(hash_token(token)), stray.to_json())
        # The full sync runs every 3 s here (300 s by default).
        assert wait_until(
            lambda: not client.exists(layout.key(hash_token(token))),
            limit=5.0,
            interval=0.1,
        )
    finally:
        client.close()
    assert chat_status(stack, token)() == 401


def test_expired_key_refused(stack: Stack) -> None:
    created = json.loads(
        stack.local.hasp_keys(
            "create", "--org", "acme", "--name", "short-lived",
            "--scope", "ai:chat", "--expires-in", "2s", "--json",
        )
    )  # fmt: skip
    status = chat_status(stack, created["token"])
    assert status() == 200
    expires_at = datetime.fromisoformat(created["expires_at"]).timestamp()
    time.sleep(max(0.0, expires_at - time.time()))
    assert status() == 401


def test_last_used_reaches_store(stack: Stack) -> None:
    assert chat_status(stack, stack.keys["chat"])() == 200

    def last_used() -> str | None:
        keys = json.loads(stack.local.hasp_keys("list", "--json"))
        by_id = {key["key_id"]: key for key in keys}
        return by_id[stack.key_ids["chat"]].get("last_used_at")

    assert wait_until(lambda: last_used() is not None, limit=5.0, interval=0.2)
