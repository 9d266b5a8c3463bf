"""Tests for hasp_authz.last_used: key last-used times reach Redis in batches.

The first part drives LastUsedRecorder in the test process against a real
Redis. The second starts ``hasp-authz serve`` with a short flush interval and
reads the ``{prefix}last_used`` sorted set after real Checks. Tests that stop
Redis start their own redis-server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from hasp_authz.dev.redis_server import RedisServer
from hasp_authz.last_used import ZADD_BATCH_SIZE, LastUsedRecorder
from hasp_authz.records import RedisLayout
from hasp_authz.tokens import generate_token
from test_servicer import (
    STOP_TIMEOUT_SECONDS,
    AuthzServer,
    check_request,
    http_status,
    launch_server,
    mark_complete,
    seed_key,
    wait_for_log,
)

FAILED_LOG = "writing last-used times"
RECOVERED_LOG = "written to Redis again"


def run_recorder(
    redis_url: str,
    layout: RedisLayout,
    scenario: Callable[[LastUsedRecorder], object],
) -> None:
    """Run the async ``scenario`` with a recorder on a new client."""

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url, retry=None, socket_timeout=2)
        try:
            await scenario(LastUsedRecorder(client, layout))
        finally:
            await client.aclose()

    asyncio.run(main())


def scores(client: redis.Redis, layout: RedisLayout) -> dict[str, float]:
    return dict(client.zrange(layout.last_used, 0, -1, withscores=True))


def wait_for_score(
    client: redis.Redis, layout: RedisLayout, key_id: str, within: float
) -> float:
    deadline = time.monotonic() + within
    while (score := client.zscore(layout.last_used, key_id)) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{key_id} not in {layout.last_used} after {within} s")
        time.sleep(0.02)
    return score


# --- LastUsedRecorder in this process ---


def test_record_keeps_latest_time():
    recorder = LastUsedRecorder(None, RedisLayout())  # type: ignore[arg-type]

    recorder.record("key_a", 10.0)
    recorder.record("key_a", 30.0)
    recorder.record("key_a", 20.0)
    recorder.record("key_b", 5.0)

    assert recorder.pending == {"key_a": 30.0, "key_b": 5.0}


def test_flush_writes_pending(redis_url, layout, redis_client):
    async def scenario(recorder: LastUsedRecorder) -> None:
        recorder.record("key_a", 1000.5)
        recorder.record("key_b", 2000.25)
        assert await recorder.flush() is True
        assert recorder.pending == {}

    run_recorder(redis_url, layout, scenario)

    assert scores(redis_client, layout) == {"key_a": 1000.5, "key_b": 2000.25}


def test_flush_without_use_writes_nothing(redis_url, layout, redis_client):
    async def scenario(recorder: LastUsedRecorder) -> None:
        assert await recorder.flush() is True
        recorder.record("key_a", 1000.0)
        await recorder.flush()
        redis_client.delete(layout.last_used)
        # key_a was not used again, so the next flush must not write it back.
        assert await recorder.flush() is True

    run_recorder(redis_url, layout, scenario)

    assert redis_client.exists(layout.last_used) == 0


def test_flush_keeps_greater_time(redis_url, layout, redis_client):
    # Another process already wrote a later time for key_a.
    redis_client.zadd(layout.last_used, {"key_a": 5000.0, "key_b": 100.0})

    async def scenario(recorder: LastUsedRecorder) -> None:
        recorder.record("key_a", 4000.0)
        recorder.record("key_b", 200.0)
        await recorder.flush()

    run_recorder(redis_url, layout, scenario)

    assert scores(redis_client, layout) == {"key_a": 5000.0, "key_b": 200.0}


def test_flush_large_batch(redis_url, layout, redis_client):
    count = ZADD_BATCH_SIZE * 2 + 7

    async def scenario(recorder: LastUsedRecorder) -> None:
        for number in range(count):
            recorder.record(f"key_{number}", 1000.0 + number)
        assert await recorder.flush() is True

    run_recorder(redis_url, layout, scenario)

    written = scores(redis_client, layout)
    assert len(written) == count
    assert written[f"key_{count - 1}"] == 1000.0 + count - 1


def test_flush_retried_after_redis_down(tmp_path, layout, caplog):
    redis_server = RedisServer(workdir=tmp_path).start()

    async def scenario(recorder: LastUsedRecorder) -> None:
        recorder.record("key_a", 1000.0)
        recorder.record("key_b", 2000.0)
        await asyncio.to_thread(redis_server.stop)
        assert await recorder.flush() is False
        recorder.record("key_a", 3000.0)
        recorder.record("key_c", 500.0)
        assert await recorder.flush() is False
        assert recorder.pending == {"key_a": 3000.0, "key_b": 2000.0, "key_c": 500.0}

        await asyncio.to_thread(redis_server.start)
        assert await recorder.flush() is True
        assert recorder.pending == {}

    try:
        with caplog.at_level(logging.INFO, logger="hasp_authz.last_used"):
            run_recorder(redis_server.url, layout, scenario)
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        written = scores(client, layout)
        client.close()
    finally:
        redis_server.stop()

    assert written == {"key_a": 3000.0, "key_b": 2000.0, "key_c": 500.0}
    assert caplog.text.count(FAILED_LOG) == 1
    assert caplog.text.count(RECOVERED_LOG) == 1


def test_flush_cancelled_keeps_times(layout):
    # The kernel completes connections to a listening socket that is never
    # accepted, so the flush waits for a reply until it is cancelled.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def scenario(recorder: LastUsedRecorder) -> None:
            recorder.record("key_a", 1000.0)
            flushing = asyncio.create_task(recorder.flush())
            await asyncio.sleep(0.2)
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
            assert recorder.pending == {"key_a": 1000.0}

        run_recorder(url, layout, scenario)


# --- hasp-authz processes ---


@pytest.fixture
def launch(tmp_path, redis_url, redis_prefix) -> Iterator[Callable[..., AuthzServer]]:
    """Return a function that starts hasp-authz with extra flags; stops them all."""
    servers: list[AuthzServer] = []

    def start(*extra_args: str, url: str = redis_url) -> AuthzServer:
        server = launch_server(tmp_path, url, redis_prefix, extra_args)
        servers.append(server)
        server.wait_until_serving()
        return server

    yield start
    for server in servers:
        server.close()
        print(f"--- hasp-authz log ({server.address}) ---\n{server.log()}")


def check_status(server: AuthzServer, token: str) -> int:
    headers = [("authorization", f"Bearer {token}")]
    return http_status(server.check(check_request(headers=headers)))


def test_serve_flushes_used_keys(launch, redis_client, layout):
    allowed = seed_key(redis_client, layout)
    no_baa = seed_key(redis_client, layout, baa_active=False)
    unused = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    server = launch("--last-used-flush-seconds", "0.2")

    before = time.time()
    assert check_status(server, allowed.token) == 200
    assert check_status(server, no_baa.token) == 402
    assert check_status(server, generate_token()) == 401
    after = time.time()

    first = wait_for_score(redis_client, layout, allowed.record.key_id, 3.0)
    second = wait_for_score(redis_client, layout, no_baa.record.key_id, 3.0)
    assert before <= first <= after
    assert before <= second <= after
    time.sleep(0.5)
    assert set(scores(redis_client, layout)) == {
        allowed.record.key_id,
        no_baa.record.key_id,
    }
    assert redis_client.zscore(layout.last_used, unused.record.key_id) is None


def test_serve_flush_failure_keeps_checks_working(launch, redis_client, layout):
    key = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    # A string under the sorted set's name makes every ZADD fail with WRONGTYPE.
    redis_client.set(layout.last_used, "not a sorted set")
    server = launch("--last-used-flush-seconds", "0.1")

    for _ in range(5):
        assert check_status(server, key.token) == 200
        time.sleep(0.1)
    wait_for_log(server, FAILED_LOG)
    redis_client.delete(layout.last_used)

    wait_for_score(redis_client, layout, key.record.key_id, 3.0)
    assert server.log().count(FAILED_LOG) == 1
    wait_for_log(server, RECOVERED_LOG)


def test_serve_processes_keep_greatest_time(launch, redis_client, layout):
    shared = seed_key(redis_client, layout)
    only_slow = seed_key(redis_client, layout)
    mark_complete(redis_client, layout)
    slow = launch("--last-used-flush-seconds", "3600")
    fast = launch("--last-used-flush-seconds", "0.2")

    assert check_status(slow, shared.token) == 200
    assert check_status(slow, only_slow.token) == 200
    slow_used_before = time.time()
    time.sleep(0.05)
    fast_used_after = time.time()
    assert check_status(fast, shared.token) == 200
    fast_score = wait_for_score(redis_client, layout, shared.record.key_id, 3.0)

    # The slow process writes its earlier time only in its final flush.
    slow.process.send_signal(signal.SIGTERM)
    assert slow.process.wait(timeout=STOP_TIMEOUT_SECONDS) == 0

    assert fast_score >= fast_used_after
    assert redis_client.zscore(layout.last_used, only_slow.record.key_id) is not None
    assert redis_client.zscore(layout.last_used, shared.record.key_id) == fast_score
    assert fast_score > slow_used_before


def test_serve_retries_flush_after_redis_restart(launch, tmp_path, layout):
    redis_server = RedisServer(workdir=tmp_path).start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        early = seed_key(client, layout)
        late = seed_key(client, layout)
        mark_complete(client, layout)
        server = launch("--last-used-flush-seconds", "1", url=redis_server.url)

        assert check_status(server, early.token) == 200
        # Just after a flush, so the next one is about 1 s away.
        wait_for_score(client, layout, early.record.key_id, 3.0)
        before = time.time()
        assert check_status(server, late.token) == 200
        after = time.time()
        redis_server.stop()
        wait_for_log(server, FAILED_LOG, within=3.0)
        time.sleep(1.5)
        assert server.log().count(FAILED_LOG) == 1

        redis_server.start()
        score = wait_for_score(client, layout, late.record.key_id, 3.0)
        written = scores(client, layout)
    finally:
        client.close()
        redis_server.stop()

    assert before <= score <= after
    # Redis came back empty, and the early key was not used again.
    assert set(written) == {late.record.key_id}
    wait_for_log(server, RECOVERED_LOG)
