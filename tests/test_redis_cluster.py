"""hasp-authz and hasp-keys on a Redis Cluster of three primaries.

The cluster (hasp_authz.dev.redis_server.RedisClusterServers) is shared by the
module, and each test writes under a key prefix of its own. hasp-keys writes
the copy through the ``redis+cluster://`` URL and a ``hasp-authz serve``
process serves Checks from it. The prefix has no hash tag, so the records
spread over the slots of all three primaries, and the tests check that they do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis
import redis.asyncio.cluster
from redis.cluster import RedisCluster, key_slot

from deployment_helpers import (
    KeysCli,
    authz_server,
    check_status,
    require_redis_server,
    wait_for,
)
from hasp_authz.dev.redis_server import RedisClusterServers
from hasp_authz.keystore import open_keystore
from hasp_authz.records import RedisLayout
from hasp_authz.store import RedisKeyCopy
from hasp_authz.tokens import generate_token, hash_token
from test_operations import fetch, sample
from test_sync_watch import now_text, run_sql

# Keys created for the spread test. With three equal slot ranges, the chance
# that 30 random hashes miss one primary is 3 * (2/3)^30, about 1 in 20,000.
SPREAD_KEYS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    require_redis_server()
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def cli(tmp_path: Path, cluster: RedisClusterServers, redis_prefix: str) -> KeysCli:
    keystore_url = f"sqlite:///{tmp_path / 'keystore.db'}"
    return KeysCli(keystore_url, cluster.url, redis_prefix, tmp_path)


@pytest.fixture
def server(tmp_path: Path, cluster: RedisClusterServers, redis_prefix: str):
    yield from authz_server(tmp_path, cluster.url, redis_prefix)


@pytest.fixture
def client(cluster: RedisClusterServers, redis_prefix: str) -> Iterator[RedisCluster]:
    """A cluster client that deletes this test's records afterwards."""
    nodes = [redis.cluster.ClusterNode("127.0.0.1", s.port) for s in cluster.servers]
    opened = RedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        yield opened
    finally:
        names = list(opened.scan_iter(match=f"{redis_prefix}*", count=1000))
        if names:
            opened.delete(*names)
        opened.close()


def port_of_slot(cluster: RedisClusterServers, slot: int) -> int:
    for first, last, port in cluster.ports_by_slot_range():
        if first <= slot <= last:
            return port
    raise LookupError(f"no node serves slot {slot}")


def port_of_key(cluster: RedisClusterServers, name: str) -> int:
    return port_of_slot(cluster, key_slot(name.encode()))


def has_record(port: int, name: str) -> bool:
    """Return True when the node on ``port`` has ``name``; False while it fails."""
    try:
        with redis.Redis(port=port, socket_timeout=1) as node:
            return node.exists(name) == 1
    except redis.RedisError:
        return False


def create_key_on_other_node(
    cli: KeysCli, cluster: RedisClusterServers, layout: RedisLayout, org_id: str
) -> dict:
    """Create keys until one's record lives on a node without the marker."""
    marker_port = port_of_key(cluster, layout.complete_marker)
    for number in range(20):
        created = cli.create_key(org_id, f"key-{number}")
        name = layout.key(hash_token(created["token"]))
        if port_of_key(cluster, name) != marker_port:
            return created
    pytest.fail("20 keys in a row landed on the marker's node")


def test_records_spread_over_every_primary(
    cli: KeysCli, cluster: RedisClusterServers, client: RedisCluster, redis_prefix: str
):
    layout = RedisLayout(redis_prefix)
    cli.ok("orgs", "create", "acme", "--baa")
    created = cli.create_key("acme", "via-cli")
    with closing(open_keystore(cli.keystore_url)) as store:
        for number in range(SPREAD_KEYS):
            store.create_key(
                "acme", f"k{number}", hash_token(generate_token()), ["ai:chat"]
            )

    output = cli.ok("sync")

    assert f"keys {SPREAD_KEYS + 1}" in output
    names = sorted(client.scan_iter(match=layout.key("*"), count=1000))
    assert len(names) == SPREAD_KEYS + 1
    assert layout.key(hash_token(created["token"])) in names
    ports = {port_of_key(cluster, name) for name in names}
    assert ports == {server.port for server in cluster.servers}
    for server in cluster.servers:
        with redis.Redis(port=server.port, decode_responses=True) as node:
            on_node = list(node.scan_iter(match=layout.key("*"), count=1000))
        assert on_node, f"no key record on the node on port {server.port}"
    assert client.exists(layout.org("acme")) == 1
    assert client.exists(layout.complete_marker) == 1


def test_checks_decide_on_cluster(
    tmp_path: Path,
    cli: KeysCli,
    cluster: RedisClusterServers,
    client: RedisCluster,
    redis_prefix: str,
):
    cli.ok("orgs", "create", "acme", "--baa")
    cli.ok("orgs", "create", "nobaa")
    allowed = cli.create_key("acme", "chat")
    unpaid = cli.create_key("nobaa", "chat")
    cli.ok("sync")
    flush = ("--last-used-flush-seconds", "0.2")
    servers = authz_server(tmp_path, cluster.url, redis_prefix, *flush)
    server = next(servers)
    try:
        assert check_status(server, allowed["token"]) == 200
        assert check_status(server, generate_token()) == 401
        assert check_status(server, unpaid["token"]) == 402
        wait_for(lambda: fetch(server, "/readyz")[0] == 200, 10, "readiness")
        last_used = RedisLayout(redis_prefix).last_used
        wait_for(
            lambda: client.zscore(last_used, allowed["key_id"]) is not None,
            5,
            "the last-used flush",
        )
    finally:
        servers.close()


def test_revocation_reaches_cache_across_nodes(
    cli: KeysCli, cluster: RedisClusterServers, server, redis_prefix: str
):
    layout = RedisLayout(redis_prefix)
    cli.ok("orgs", "create", "acme", "--baa")
    cli.ok("sync")
    key = create_key_on_other_node(cli, cluster, layout, "acme")
    wait_for(lambda: fetch(server, "/readyz")[0] == 200, 10, "readiness")
    assert check_status(server, key["token"]) == 200
    hits = sample(server, "hasp_authz_cache_lookups_total", result="hit")
    assert check_status(server, key["token"]) == 200
    assert sample(server, "hasp_authz_cache_lookups_total", result="hit") == hits + 1

    cli.ok("revoke", key["key_id"])

    # The key's record and the subscription are on different nodes, so the
    # change message crossed the cluster bus.
    wait_for(lambda: check_status(server, key["token"]) == 401, 1.0, "a 401")


def test_marker_deletion_reaches_cache(
    cli: KeysCli, server, client: RedisCluster, redis_prefix: str
):
    cli.ok("orgs", "create", "acme", "--baa")
    key = cli.create_key("acme", "cached")
    cli.ok("sync")
    wait_for(lambda: fetch(server, "/readyz")[0] == 200, 10, "readiness")
    assert check_status(server, key["token"]) == 200

    client.delete(RedisLayout(redis_prefix).complete_marker)

    # Client tracking on the marker's node reports the deletion.
    wait_for(lambda: check_status(server, key["token"]) == 503, 1.0, "a 503")


def test_watcher_applies_sql_revocation(cli: KeysCli, server):
    cli.ok("orgs", "create", "acme", "--baa")
    key = cli.create_key("acme", "watched")
    watcher = cli.start_watcher()
    try:
        wait_for(lambda: "full sync (scheduled)" in watcher.log_tail(), 10, "a sync")
        assert check_status(server, key["token"]) == 200

        run_sql(
            cli.keystore_url,
            "UPDATE api_keys SET revoked_at = ? WHERE id = ?",
            (now_text(cli.keystore_url), key["key_id"]),
        )

        wait_for(lambda: check_status(server, key["token"]) == 401, 1.0, "a 401")
    finally:
        watcher.stop()


def test_watcher_reloads_restarted_empty_node(tmp_path: Path, redis_prefix: str):
    require_redis_server()
    layout = RedisLayout(redis_prefix)
    with RedisClusterServers(tmp_path / "cluster") as own:
        cli = KeysCli(
            f"sqlite:///{tmp_path / 'keystore.db'}", own.url, redis_prefix, tmp_path
        )
        cli.ok("orgs", "create", "acme", "--baa")
        key = create_key_on_other_node(cli, own, layout, "acme")
        name = layout.key(hash_token(key["token"]))
        watcher = cli.start_watcher("--marker-check-seconds", "0.5")
        try:
            wait_for(
                lambda: "full sync (scheduled)" in watcher.log_tail(), 10, "a sync"
            )
            node = next(s for s in own.servers if s.port == port_of_key(own, name))

            node.kill()
            node.start()

            # The node replies CLUSTERDOWN until it has rejoined the others.
            wait_for(lambda: has_record(node.port, name), 15, "the reloaded record")
            assert "a new Redis primary" in watcher.log_path.read_text()
        finally:
            watcher.stop()


def test_lookup_script_rejected_on_cluster():
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=7000)

    with pytest.raises(ValueError, match="single_round_trip=False"):
        RedisKeyCopy(client, RedisLayout())
