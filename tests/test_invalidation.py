"""Tests for hasp_authz.invalidation: change messages keep every cache fresh.

The first part runs ChangeSubscriber in the test process against a real Redis.
The second starts three ``hasp-authz serve`` processes that share one private
redis-server and prefix, with cache TTLs of an hour, so only invalidation can
explain a fresh result. Data is written with the real ``hasp-keys`` command and
a SQLite key store, and Checks go over gRPC.

Freshness within 1 s of a change is a contract, so the tests measure it from
the moment the ``hasp-keys`` command has exited, which is after it published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from hasp_authz.cache import RecordCache
from hasp_authz.dev.redis_server import RedisServer, free_port
from hasp_authz.invalidation import Change, ChangeSubscriber, apply_change_message
from hasp_authz.metrics import Metrics
from hasp_authz.records import (
    KeyRecord,
    OrgRecord,
    RedisLayout,
    flush_message,
    key_changed_message,
    org_changed_message,
)
from hasp_authz.tokens import generate_token, hash_token
from test_servicer import (
    SUBSCRIBED_LOG,
    AuthzServer,
    check_request,
    deny_error,
    http_status,
    launch_server,
    wait_for_log,
)

HASP_KEYS = Path(sys.executable).with_name("hasp-keys")
FRESHNESS_SECONDS = 1.0
CLI_TIMEOUT_SECONDS = 30.0
# Long enough that no entry expires during a test.
LONG_TTL_SECONDS = "3600"
LOST_LOG = "is down"
RESTORED_LOG = "subscription restored"

# Runs the real hasp-keys command with its token generator pinned, so a test can
# look a token up before the key exists.
PINNED_TOKEN_SCRIPT = """\
import os, sys
import hasp_authz.cli.keys as keys
keys.generate_token = lambda: os.environ["TEST_PINNED_TOKEN"]
sys.exit(keys.main(sys.argv[1:]))
"""


# --- ChangeSubscriber in this process ---


def sample_result(suffix: str) -> tuple[KeyRecord, OrgRecord]:
    org = OrgRecord(f"org_{suffix}", True)
    return KeyRecord(f"key_{suffix}", org.org_id, ("ai:chat",)), org


async def eventually(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def running_subscriber(
    redis_url: str, layout: RedisLayout, **options
) -> tuple[ChangeSubscriber, asyncio.Task]:
    cache = RecordCache(100, 3600, 3600)
    subscriber = ChangeSubscriber(redis_url, layout, cache, **options)
    task = asyncio.create_task(subscriber.run())
    assert await eventually(lambda: cache.active, 5.0), "never subscribed"
    return subscriber, task


async def stop_subscriber(subscriber: ChangeSubscriber, task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await subscriber.close()


def test_subscriber_applies_published_messages(redis_url, layout):
    async def main() -> None:
        subscriber, task = await running_subscriber(redis_url, layout)
        cache = subscriber.cache
        publisher = aioredis.Redis.from_url(redis_url)
        try:
            for suffix in ("a", "b", "c"):
                cache.put(f"hash_{suffix}", sample_result(suffix), cache.generation)
            cache.put("hash_unknown", None, cache.generation)

            await publisher.publish(
                layout.changes_channel, key_changed_message("hash_a")
            )
            assert await eventually(lambda: "hash_a" not in cache.keys, 1.0)
            await publisher.publish(
                layout.changes_channel, key_changed_message("hash_unknown")
            )
            assert await eventually(lambda: cache.get("hash_unknown") is None, 1.0)
            await publisher.publish(
                layout.changes_channel, org_changed_message("org_b")
            )
            assert await eventually(lambda: "org_b" not in cache.orgs, 1.0)
            assert cache.get("hash_c") is not None

            await publisher.publish(layout.changes_channel, flush_message())
            assert await eventually(lambda: len(cache.keys) == 0, 1.0)
            assert cache.active
        finally:
            await publisher.aclose()
            await stop_subscriber(subscriber, task)

    asyncio.run(main())


def test_subscriber_invalid_message_clears(redis_url, layout, caplog):
    async def main() -> None:
        subscriber, task = await running_subscriber(redis_url, layout)
        cache = subscriber.cache
        publisher = aioredis.Redis.from_url(redis_url)
        try:
            cache.put("hash_a", sample_result("a"), cache.generation)
            await publisher.publish(layout.changes_channel, "not json")
            assert await eventually(lambda: len(cache.keys) == 0, 1.0)
        finally:
            await publisher.aclose()
            await stop_subscriber(subscriber, task)

    with caplog.at_level(logging.WARNING, logger="hasp_authz.invalidation"):
        asyncio.run(main())

    assert "invalid change message" in caplog.text


@pytest.mark.parametrize("change", ["deleted", "rewritten"])
def test_subscriber_marker_change_clears(redis_url, layout, redis_client, change):
    redis_client.set(layout.complete_marker, "{}")

    async def main() -> None:
        subscriber, task = await running_subscriber(redis_url, layout)
        cache = subscriber.cache
        try:
            cache.put("hash_a", sample_result("a"), cache.generation)
            # No change message: only Redis' tracking invalidation reports this.
            if change == "deleted":
                redis_client.delete(layout.complete_marker)
            else:
                redis_client.set(layout.complete_marker, '{"keys": 2}')
            assert await eventually(lambda: len(cache.keys) == 0, 1.0)
            assert cache.active
        finally:
            await stop_subscriber(subscriber, task)

    asyncio.run(main())


def test_subscriber_loss_bypasses_until_restored(tmp_path, layout, caplog):
    redis_server = RedisServer(workdir=tmp_path).start()

    async def main() -> None:
        subscriber, task = await running_subscriber(redis_server.url, layout)
        cache = subscriber.cache
        try:
            cache.put("hash_a", sample_result("a"), cache.generation)
            await asyncio.to_thread(redis_server.stop)
            assert await eventually(lambda: not cache.active, 1.0)
            assert len(cache.keys) == 0
            assert not cache.put("hash_a", sample_result("a"), cache.generation)
            # Several reconnect attempts fail while Redis is down.
            await asyncio.sleep(1.0)
            assert subscriber.failures >= 3

            await asyncio.to_thread(redis_server.start)
            assert await eventually(lambda: cache.active, 3.0)
            assert subscriber.failures == 0
        finally:
            await stop_subscriber(subscriber, task)

    try:
        with caplog.at_level(logging.INFO, logger="hasp_authz.invalidation"):
            asyncio.run(main())
    finally:
        redis_server.stop()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert LOST_LOG in warnings[0].getMessage()
    assert caplog.text.count(RESTORED_LOG) == 1


def test_subscriber_resubscribes_after_check_failure(redis_url, layout, caplog):
    async def main() -> None:
        subscriber, task = await running_subscriber(redis_url, layout)
        cache = subscriber.cache
        try:
            cache.report_redis_failure()
            assert not cache.active
            assert await eventually(lambda: cache.active, 3.0)
            assert cache.redis_failed is False
        finally:
            await stop_subscriber(subscriber, task)

    with caplog.at_level(logging.INFO, logger="hasp_authz.invalidation"):
        asyncio.run(main())

    assert "a Check's Redis call failed; subscribing again" in caplog.text
    assert caplog.text.count(RESTORED_LOG) == 1


def test_subscriber_unreachable_at_start(layout, caplog):
    async def main() -> None:
        cache = RecordCache(100, 3600, 3600)
        url = f"redis://127.0.0.1:{free_port()}/0"
        subscriber = ChangeSubscriber(url, layout, cache)
        task = asyncio.create_task(subscriber.run())
        await asyncio.sleep(0.5)
        assert not cache.active
        assert not cache.put("hash_a", sample_result("a"), cache.generation)
        await stop_subscriber(subscriber, task)

    with caplog.at_level(logging.WARNING, logger="hasp_authz.invalidation"):
        asyncio.run(main())

    assert caplog.text.count(LOST_LOG) == 1


def test_subscriber_detects_silent_redis(tmp_path, layout):
    redis_server = RedisServer(workdir=tmp_path).start()

    async def main() -> None:
        subscriber, task = await running_subscriber(
            redis_server.url, layout, keepalive_seconds=0.2
        )
        cache = subscriber.cache
        admin = aioredis.Redis.from_url(redis_server.url)
        try:
            # Redis keeps the connection open but replies to nothing, not even PING.
            await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            assert await eventually(lambda: not cache.active, 1.0)
            assert await eventually(lambda: cache.active, 4.0)
        finally:
            await admin.aclose()
            await stop_subscriber(subscriber, task)

    try:
        asyncio.run(main())
    finally:
        redis_server.stop()


def test_subscriber_reports_publish_times(redis_url, layout, redis_client):
    redis_client.set(layout.complete_marker, "{}")
    reported: list[float | None] = []
    sent_at = time.time()

    async def main() -> None:
        subscriber, task = await running_subscriber(
            redis_url, layout, on_change=reported.append
        )
        cache = subscriber.cache
        publisher = aioredis.Redis.from_url(redis_url)
        channel = layout.changes_channel
        try:
            await publisher.publish(channel, key_changed_message("hash_a", at=sent_at))
            await publisher.publish(channel, org_changed_message("org_b"))
            await publisher.publish(channel, "not json")
            await publisher.publish(channel, flush_message(at=sent_at + 1.0))
            assert await eventually(lambda: len(reported) == 3, 1.0)

            # Client tracking reports the marker change. That clears the cache
            # but is no change message, so on_change is not called.
            cache.put("hash_c", sample_result("c"), cache.generation)
            await publisher.set(layout.complete_marker, '{"keys": 1}')
            assert await eventually(lambda: len(cache.keys) == 0, 1.0)
        finally:
            await publisher.aclose()
            await stop_subscriber(subscriber, task)

    asyncio.run(main())

    assert reported == [
        pytest.approx(sent_at, abs=1e-6),
        None,
        pytest.approx(sent_at + 1.0, abs=1e-6),
    ]


def test_subscriber_feeds_change_lag_metric(redis_url, layout):
    metrics = Metrics()

    async def main() -> None:
        subscriber, task = await running_subscriber(
            redis_url, layout, on_change=metrics.observe_change
        )
        publisher = aioredis.Redis.from_url(redis_url)
        try:
            message = key_changed_message("hash_a", at=time.time())
            await publisher.publish(layout.changes_channel, message)
            assert await eventually(lambda: metrics.newest_change_at is not None, 1.0)
        finally:
            await publisher.aclose()
            await stop_subscriber(subscriber, task)

    asyncio.run(main())

    registry = metrics.registry
    assert registry.get_sample_value("hasp_authz_change_lag_seconds_count") == 1
    lag = registry.get_sample_value("hasp_authz_change_lag_seconds_sum")
    assert 0 <= lag < FRESHNESS_SECONDS


def test_subscriber_survives_failing_on_change(redis_url, layout, caplog):
    def fail(published_at: float | None) -> None:
        raise RuntimeError("metrics broke")

    async def main() -> None:
        subscriber, task = await running_subscriber(redis_url, layout, on_change=fail)
        cache = subscriber.cache
        publisher = aioredis.Redis.from_url(redis_url)
        try:
            for suffix in ("a", "b"):
                cache.put(f"hash_{suffix}", sample_result(suffix), cache.generation)
            await publisher.publish(
                layout.changes_channel, key_changed_message("hash_a")
            )
            assert await eventually(lambda: "hash_a" not in cache.keys, 1.0)
            await publisher.publish(
                layout.changes_channel, key_changed_message("hash_b")
            )
            assert await eventually(lambda: "hash_b" not in cache.keys, 1.0)
            assert cache.active
            assert subscriber.failures == 0
        finally:
            await publisher.aclose()
            await stop_subscriber(subscriber, task)

    with caplog.at_level(logging.WARNING, logger="hasp_authz.invalidation"):
        asyncio.run(main())

    assert caplog.text.count("on_change callback failed") == 2
    assert LOST_LOG not in caplog.text


# --- apply_change_message without Redis ---


def cache_with_two_keys() -> RecordCache:
    cache = RecordCache(100, 3600, 3600)
    # A new cache stays bypassed until resumed, as the subscriber does on subscribing.
    cache.resume()
    for suffix in ("a", "b"):
        assert cache.put(f"hash_{suffix}", sample_result(suffix), cache.generation)
    return cache


def test_apply_returns_publish_time():
    cache = cache_with_two_keys()

    change = apply_change_message(
        cache, key_changed_message("hash_a", at=1718000000.25)
    )

    assert change == Change("key", "hash_a", 1718000000.25)
    assert "hash_a" not in cache.keys
    assert "hash_b" in cache.keys


def test_apply_without_publish_time():
    cache = cache_with_two_keys()

    change = apply_change_message(cache, key_changed_message("hash_a").encode())

    assert change == Change("key", "hash_a", None)
    assert "hash_a" not in cache.keys
    assert "hash_b" in cache.keys


def test_apply_null_publish_time_silently(caplog):
    cache = cache_with_two_keys()

    with caplog.at_level(logging.WARNING, logger="hasp_authz.invalidation"):
        change = apply_change_message(cache, '{"kind":"key","hash":"hash_a","at":null}')

    assert change == Change("key", "hash_a", None)
    assert "hash_a" not in cache.keys
    assert caplog.text == ""


def test_apply_integer_publish_time():
    change = apply_change_message(
        cache_with_two_keys(), '{"kind":"org","org_id":"org_a","at":1718000000}'
    )

    assert change == Change("org", "org_a", 1718000000.0)
    assert isinstance(change.published_at, float)


@pytest.mark.parametrize(
    "at",
    [
        pytest.param('"x"', id="string"),
        pytest.param('"1718000000"', id="numeric-string"),
        pytest.param("NaN", id="nan"),
        pytest.param("Infinity", id="infinity"),
        pytest.param("-Infinity", id="minus-infinity"),
        pytest.param("1e400", id="float-overflow"),
        pytest.param("1" + "0" * 400, id="integer-overflow"),
        pytest.param("[1718000000]", id="list"),
        pytest.param("{}", id="object"),
        pytest.param("true", id="boolean"),
    ],
)
def test_apply_ignores_invalid_publish_time(at, caplog):
    cache = cache_with_two_keys()
    raw = '{"kind":"key","hash":"hash_a","at":' + at + "}"

    with caplog.at_level(logging.WARNING, logger="hasp_authz.invalidation"):
        change = apply_change_message(cache, raw)

    assert change == Change("key", "hash_a", None)
    assert "hash_a" not in cache.keys
    # Applied as a key change, not as an invalid message that clears everything.
    assert "hash_b" in cache.keys
    assert "ignoring invalid publish time" in caplog.text
    assert "invalid change message" not in caplog.text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"kind":"org","org_id":"org_a","at":"x"}', Change("org", "org_a", None)),
        ('{"kind":"all","at":[1]}', Change("all", None, None)),
    ],
    ids=["org", "all"],
)
def test_apply_invalid_publish_time_other_kinds(raw, expected):
    cache = cache_with_two_keys()

    change = apply_change_message(cache, raw)

    assert change == expected
    assert "org_a" not in cache.orgs


def test_apply_invalid_message_returns_none():
    cache = cache_with_two_keys()

    assert apply_change_message(cache, b'{"kind":"rename","at":1718000000}') is None
    assert len(cache.keys) == 0


# --- three hasp-authz processes ---


class KeysCli:
    """Runs the real hasp-keys command against one key store, Redis and prefix."""

    def __init__(self, keystore_url: str, redis_url: str, prefix: str):
        self.environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HASP_")},
            "HASP_KEYSTORE_URL": keystore_url,
            "HASP_REDIS_URL": redis_url,
            "HASP_REDIS_PREFIX": prefix,
        }

    def run(self, *arguments: str) -> str:
        return self._run([str(HASP_KEYS), *arguments], self.environment)

    def create_key(self, org_id: str, name: str) -> dict:
        output = self.run(
            "create", "--org", org_id, "--name", name, "--scope", "ai:chat", "--json"
        )
        return json.loads(output)

    def create_key_with_token(self, token: str, org_id: str, name: str) -> dict:
        command = [sys.executable, "-c", PINNED_TOKEN_SCRIPT, "create"]
        command += ["--org", org_id, "--name", name, "--scope", "ai:chat", "--json"]
        environment = {**self.environment, "TEST_PINNED_TOKEN": token}
        return json.loads(self._run(command, environment))

    @staticmethod
    def _run(command: list[str], environment: dict[str, str]) -> str:
        completed = subprocess.run(
            command,
            env=environment,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_SECONDS,
        )
        assert completed.returncode == 0, (
            f"{command[0]} {command[-1]} exited with {completed.returncode}:\n"
            f"{completed.stderr}"
        )
        return completed.stdout


@dataclass
class Fleet:
    """Three hasp-authz processes on one private Redis, and the keys they serve."""

    redis_server: RedisServer
    cli: KeysCli
    servers: list[AuthzServer]
    layout: RedisLayout
    tokens: dict[str, str]
    key_ids: dict[str, str]

    def request(self, name: str):
        token = self.tokens[name]
        return check_request(headers=[("authorization", f"Bearer {token}")])

    def statuses(self, name: str) -> list[int]:
        request = self.request(name)
        return [http_status(server.check(request)) for server in self.servers]

    def warm(self) -> None:
        """Check every key on every server, then prove that the caches serve them."""
        for name in self.tokens:
            self.statuses(name)
        assert self.statuses("main") == [200, 200, 200]
        # The canary's record leaves Redis without a change message, so a 200
        # can only come from each process's cache.
        client = redis.Redis.from_url(self.redis_server.url)
        try:
            client.delete(self.layout.key(hash_token(self.tokens["canary"])))
        finally:
            client.close()
        assert self.statuses("canary") == [200, 200, 200]

    def wait_for_status(self, name: str, expected: int, within: float) -> None:
        """Check every server until each returns ``expected``, within ``within`` s."""
        request = self.request(name)
        started = time.monotonic()
        waiting = list(self.servers)
        last: dict[str, int] = {}
        while waiting:
            for server in list(waiting):
                last[server.address] = http_status(server.check(request))
                if last[server.address] == expected:
                    waiting.remove(server)
            if waiting and time.monotonic() - started > within:
                pytest.fail(
                    f"{name}: expected {expected} from every server within "
                    f"{within} s, last statuses {last}"
                )
            time.sleep(0.01)


def start_authz(log_dir: Path, redis_url: str, prefix: str) -> AuthzServer:
    server = launch_server(
        log_dir,
        redis_url,
        prefix,
        [
            "--cache-ttl-seconds", LONG_TTL_SECONDS,
            "--negative-cache-ttl-seconds", LONG_TTL_SECONDS,
        ],
    )  # fmt: skip
    server.wait_until_serving()
    return server


@pytest.fixture
def fleet(tmp_path: Path, redis_prefix: str) -> Iterator[Fleet]:
    redis_server = RedisServer(workdir=tmp_path).start()
    servers: list[AuthzServer] = []
    try:
        cli = KeysCli(
            f"sqlite:///{tmp_path}/keystore.db", redis_server.url, redis_prefix
        )
        cli.run("orgs", "create", "acme", "--baa")
        cli.run("orgs", "create", "beta", "--baa")
        created = {
            "main": cli.create_key("acme", "main"),
            "canary": cli.create_key("acme", "canary"),
            "beta": cli.create_key("beta", "beta"),
        }
        cli.run("sync")
        for _ in range(3):
            servers.append(start_authz(tmp_path, redis_server.url, redis_prefix))
        for server in servers:
            wait_for_log(server, SUBSCRIBED_LOG)
        yield Fleet(
            redis_server,
            cli,
            servers,
            layout=RedisLayout(redis_prefix),
            tokens={name: key["token"] for name, key in created.items()},
            key_ids={name: key["key_id"] for name, key in created.items()},
        )
    finally:
        for server in servers:
            server.close()
            print(f"--- hasp-authz log ({server.address}) ---\n{server.log()}")
        redis_server.stop()


def test_revoke_reaches_every_server(fleet):
    fleet.warm()

    fleet.cli.run("revoke", fleet.key_ids["main"])

    fleet.wait_for_status("main", 401, within=FRESHNESS_SECONDS)
    assert fleet.statuses("beta") == [200, 200, 200]


def test_baa_off_reaches_every_server(fleet):
    fleet.warm()

    fleet.cli.run("orgs", "baa", "acme", "off")

    fleet.wait_for_status("main", 402, within=FRESHNESS_SECONDS)
    assert fleet.statuses("beta") == [200, 200, 200]


def test_new_key_after_negative_lookup(fleet):
    fleet.warm()
    fleet.tokens["late"] = generate_token()
    assert fleet.statuses("late") == [401, 401, 401]
    assert fleet.statuses("late") == [401, 401, 401]

    created = fleet.cli.create_key_with_token(fleet.tokens["late"], "acme", "late")

    assert created["token"] == fleet.tokens["late"]
    fleet.wait_for_status("late", 200, within=FRESHNESS_SECONDS)


def test_redis_restart_empty_fails_closed(fleet):
    fleet.warm()
    fleet.tokens["unknown"] = generate_token()
    pids = [server.process.pid for server in fleet.servers]

    fleet.redis_server.stop()
    fleet.redis_server.start()

    for name in ("main", "canary", "beta", "unknown"):
        assert fleet.statuses(name) == [503, 503, 503], name
    error = deny_error(fleet.servers[0].check(fleet.request("main")))
    assert error["code"] == "AUTH_UNAVAILABLE"

    fleet.cli.run("sync")

    fleet.wait_for_status("main", 200, within=2.0)
    assert fleet.statuses("canary") == [200, 200, 200]
    assert fleet.statuses("unknown") == [401, 401, 401]
    for server, pid in zip(fleet.servers, pids, strict=True):
        assert server.process.poll() is None
        assert server.process.pid == pid
        wait_for_log(server, RESTORED_LOG)
        assert server.log().count(LOST_LOG) == 1
        assert server.log().count(RESTORED_LOG) == 1
