"""Tests for hasp_authz.redis_clients: the Redis URL forms and the clients they make.

Clients of real Sentinel and Cluster deployments are tested end to end in
tests/test_redis_sentinel.py and tests/test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from deployment_helpers import KeysCli
from hasp_authz.dev.redis_server import free_port
from hasp_authz.redis_clients import (
    CLUSTER,
    SENTINEL,
    STANDALONE,
    BlockingSentinelConnectionPool,
    RedisTarget,
    async_client,
    example_for,
    parse_redis_url,
    sync_client,
)

SENTINEL_URL = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/2"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            SENTINEL_URL,
            RedisTarget(
                SENTINEL,
                SENTINEL_URL,
                (("127.0.0.1", 26379), ("127.0.0.1", 26380)),
                service_name="mymaster",
                db=2,
            ),
        ),
        (
            "redis+sentinel://app:pw%40x@sentinel-a,sentinel-b:26380/hasp"
            "?sentinel_password=spw",
            RedisTarget(
                SENTINEL,
                "",
                (("sentinel-a", 26379), ("sentinel-b", 26380)),
                service_name="hasp",
                username="app",
                password="pw@x",
                sentinel_password="spw",
            ),
        ),
        (
            "rediss+sentinel://[::1]:26379/hasp/",
            RedisTarget(SENTINEL, "", (("::1", 26379),), service_name="hasp", ssl=True),
        ),
        (
            "redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001",
            RedisTarget(
                CLUSTER,
                "",
                (("127.0.0.1", 7000), ("127.0.0.1", 7001)),
                password="pw",
            ),
        ),
        (
            "REDISS+CLUSTER://node-a/0",
            RedisTarget(CLUSTER, "", (("node-a", 6379),), ssl=True),
        ),
        ("redis://127.0.0.1:6379/0", RedisTarget(STANDALONE, "")),
        ("unix:///run/redis.sock?db=1", RedisTarget(STANDALONE, "")),
    ],
    ids=[
        "sentinel",
        "sentinel-credentials",
        "sentinel-ipv6-tls",
        "cluster",
        "cluster-upper-case-tls",
        "redis",
        "unix",
    ],
)
def test_parse_redis_url(url: str, expected: RedisTarget):
    target = parse_redis_url(url)

    assert target.url == url
    for name in (
        "mode", "nodes", "service_name", "db", "username", "password",
        "sentinel_password", "ssl",
    ):  # fmt: skip
        assert getattr(target, name) == getattr(expected, name), name


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:s3cret@127.0.0.1:26379", "missing the Sentinel service"),
        ("redis+sentinel://:s3cret@127.0.0.1:26379/", "missing the Sentinel service"),
        ("redis+sentinel://:s3cret@h:1/svc/zero", "invalid database 'zero'"),
        ("redis+sentinel://:s3cret@h:1/svc/0/extra", "expected the path"),
        ("redis+sentinel://:s3cret@h:port/svc", "invalid port in 'h:port'"),
        ("redis+sentinel://:s3cret@h:70000/svc", "invalid port in 'h:70000'"),
        ("redis+sentinel://:s3cret@h:1,,h:2/svc", "missing host"),
        ("redis+sentinel://:s3cret@h:1/svc?password=x", "unknown query parameter"),
        ("redis+cluster://:s3cret@h:7000/1", "database 0 only"),
        ("redis+cluster://:s3cret@h:7000?ssl=true", "unknown query parameter"),
        ("redis+cluster://:s3cret@h:7000#x", "fragment"),
        ("http://:s3cret@h:6379/0", "schemes"),
        ("redis+sentinal://:s3cret@h:26379/svc", "schemes"),
    ],
)
def test_parse_redis_url_rejects(url: str, message: str):
    with pytest.raises(ValueError, match=message) as caught:
        parse_redis_url(url)

    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        (
            SENTINEL_URL,
            "Sentinel service 'mymaster' via 127.0.0.1:26379,127.0.0.1:26380",
        ),
        ("redis+cluster://:pw@h:7000,h:7001", "Redis Cluster via h:7000,h:7001"),
        ("redis://:pw@127.0.0.1:6390/0", "127.0.0.1:6390"),
        ("unix:///tmp/redis.sock", "/tmp/redis.sock"),
    ],
)
def test_target_address(url: str, address: str):
    assert parse_redis_url(url).address == address


def test_target_repr_hides_passwords():
    target = parse_redis_url(
        "redis+sentinel://:s3cret@h:26379/svc?sentinel_password=s3cret2"
    )

    assert "s3cret" not in repr(target)


@pytest.mark.parametrize(
    ("url", "example"),
    [
        ("redis+sentinel://bad", "redis+sentinel://"),
        ("REDISS+CLUSTER://bad", "redis+cluster://"),
        ("redis://bad:port", "redis://"),
        ("nonsense", "redis://"),
    ],
)
def test_example_for(url: str, example: str):
    assert example_for(url).startswith(example)


def test_check_client_sentinel_pool_blocks():
    asyncio.run(_check_client_sentinel_pool_blocks())


async def _check_client_sentinel_pool_blocks() -> None:
    client = async_client(
        parse_redis_url(SENTINEL_URL), timeout=0.1, max_connections=5, blocking=True
    )
    try:
        pool = client.connection_pool
        assert isinstance(pool, BlockingSentinelConnectionPool)
        assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
        assert pool.max_connections == 5
        assert pool.timeout == 0.1
        assert pool.service_name == "mymaster"
        assert pool.connection_kwargs["socket_timeout"] == 0.1
        assert pool.connection_kwargs["db"] == 2
    finally:
        await client.aclose()


def test_check_client_cluster_options():
    asyncio.run(_check_client_cluster_options())


async def _check_client_cluster_options() -> None:
    client = async_client(
        parse_redis_url("redis+cluster://127.0.0.1:7000"),
        timeout=0.1,
        max_connections=5,
        blocking=True,
    )
    try:
        assert isinstance(client, redis.asyncio.cluster.RedisCluster)
        assert client.retry.get_retries() == 0
        node = client.startup_nodes[0]
        assert (node.host, node.port, node.max_connections) == ("127.0.0.1", 7000, 5)
        assert node.connection_kwargs["socket_timeout"] == 0.1
    finally:
        await client.aclose()


def test_sync_client_sentinel():
    client = sync_client(
        parse_redis_url(SENTINEL_URL), timeout=2.0, retry=Retry(NoBackoff(), 1)
    )
    try:
        assert isinstance(client.connection_pool, redis.sentinel.SentinelConnectionPool)
        assert client.connection_pool.service_name == "mymaster"
    finally:
        client.close()


def test_hasp_keys_bad_url_store_unchanged(tmp_path: Path):
    cli = KeysCli(
        f"sqlite:///{tmp_path / 'keystore.db'}",
        "redis+sentinel://:s3cret@127.0.0.1:26379",
        "hasp:",
        tmp_path,
    )

    result = cli.run("orgs", "create", "acme", "--baa")

    assert result.returncode == 1
    assert "HASP_REDIS_URL" in result.stderr
    assert "missing the Sentinel service" in result.stderr
    assert "redis+sentinel://127.0.0.1:26379" in result.stderr
    assert "s3cret" not in result.stderr
    assert json.loads(cli.ok("orgs", "list", "--json")) == []


def test_hasp_keys_unreachable_cluster_exit_3(tmp_path: Path):
    cli = KeysCli(
        f"sqlite:///{tmp_path / 'keystore.db'}",
        f"redis+cluster://:s3cret@127.0.0.1:{free_port()}",
        "hasp:",
        tmp_path,
    )

    result = cli.run("orgs", "create", "acme")

    assert result.returncode == 3
    assert "Redis Cluster via 127.0.0.1" in result.stderr
    assert "s3cret" not in result.stderr
    assert [org["org_id"] for org in json.loads(cli.ok("orgs", "list", "--json"))] == [
        "acme"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://:S3cr/et@127.0.0.1:7000",
        "redis+cluster://u:S3cr?et@127.0.0.1:7000",
        "redis+sentinel://u:S3cr/et@127.0.0.1:26379/mymaster",
        "redis://:S3cr/et@127.0.0.1:6379/0",
    ],
)
def test_url_error_hides_password_pieces(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)

    message = str(caught.value)
    assert "S3cr" not in message
    assert "'et" not in message


def test_sentinel_password_keeps_plus() -> None:
    target = parse_redis_url(
        "redis+sentinel://127.0.0.1:26379/mymaster?sentinel_password=a+b%2Bc"
    )

    assert target.sentinel_password == "a+b+c"


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379/mymaster/99999999999999999999",
        "redis+sentinel://127.0.0.1:２６３７９/mymaster/0",
        "redis+cluster://127.0.0.1:７０００",
        "redis+sentinel://127.0.0.1:26379/mymaster/１",
    ],
)
def test_url_rejects_odd_numbers(url: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_redis_url(url)


def test_sentinel_error_names_cause_without_client_repr(tmp_path) -> None:
    port = free_port()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("hasp-keys")), "sync"],
        env={
            **os.environ,
            "HASP_KEYSTORE_URL": f"sqlite:///{tmp_path / 'keystore.db'}",
            "HASP_REDIS_URL": f"redis+sentinel://127.0.0.1:{port}/hasp",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "No master found for 'hasp' : a Sentinel - " in result.stderr
    assert "Connection refused" in result.stderr
    assert "redis.client.Redis" not in result.stderr
    assert len(result.stderr) < 400
