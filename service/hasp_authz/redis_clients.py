"""Parse HASP_REDIS_URL and build the redis-py clients for each Redis deployment.

One URL setting names the deployment, so ``hasp-authz serve`` and ``hasp-keys``
read the same value and one secret contains it:

- ``redis://``, ``rediss://`` and ``unix://``: one server, parsed by redis-py;
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/DB]``:
  the primary that the Sentinels at those addresses name for SERVICE. The user
  and password are the Redis server's. ``?sentinel_password=...`` sets the
  Sentinels' own password, when they have one;
- ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis
  Cluster, discovered from any of the nodes listed. Cluster has database 0 only.

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS. A missing port is 26379
for a Sentinel and 6379 for a cluster node. A URL scheme was chosen over a
separate mode setting because hasp-keys, the sync watcher and the server all
take the one URL already, and a mode setting would have to be kept in step
with it everywhere.

The clients are redis-py's own. For Sentinel they come from
``Sentinel.master_for`` (``redis.asyncio.sentinel`` and ``redis.sentinel``),
whose connection pools query the Sentinels for the primary's address on every
new connection, so clients follow a failover once their old connections fail.
refresh_sentinel_primary covers connections that do not fail. For a cluster
they are ``RedisCluster`` (``redis.asyncio.cluster`` and ``redis.cluster``),
which follows MOVED replies and refreshes the slot map after a connection
error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

STANDALONE = "standalone"
SENTINEL = "sentinel"
CLUSTER = "cluster"

# Scheme -> (deployment, TLS).
# NOTE: the rediss+ forms only pass ssl=True to redis-py, so the server
# certificate is checked against the system CA store. No test runs them
# against a TLS server, and these URLs take no ssl_* query parameters.
_SCHEMES = {
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
}
_DEFAULT_PORTS = {SENTINEL: 26379, CLUSTER: 6379}
EXAMPLES = {
    STANDALONE: "redis://127.0.0.1:6379/0",
    SENTINEL: "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0",
    CLUSTER: "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
}

# A client of any Redis deployment: one server, a Sentinel-managed primary or
# a cluster.
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

# Errors of the Redis layer. redis-py raises RedisClusterException, which is not
# a RedisError, when a cluster client finds no node to send a command to.
REDIS_ERRORS = (RedisError, RedisClusterException)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL: the deployment kind, its addresses and credentials."""

    mode: str
    url: str = field(repr=False)
    # (host, port) of each Sentinel or cluster node; empty for one server.
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False

    @property
    def address(self) -> str:
        """Name the deployment for messages, without credentials."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.nodes)
        if self.mode == SENTINEL:
            return f"Sentinel service {self.service_name!r} via {hosts}"
        if self.mode == CLUSTER:
            return f"Redis Cluster via {hosts}"
        kwargs = parse_url(self.url)
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"

    def server_kwargs(self) -> dict[str, object]:
        """Return the credentials and TLS flag for connections to Redis servers."""
        kwargs: dict[str, object] = {
            "username": self.username,
            "password": self.password,
        }
        if self.ssl:
            kwargs["ssl"] = True
        return kwargs


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a Redis URL of any supported form.

    Raises ValueError with a message that never contains a password.
    """
    try:
        return _parse_redis_url(url)
    except ValueError as error:
        raise ValueError(scrub_credentials(str(error), url)) from None


def scrub_credentials(text: str, url: str) -> str:
    """Replace every piece of ``url``'s user info in ``text`` with ``***``.

    A password with an unencoded ``/``, ``?`` or ``#`` splits the URL in the
    wrong place, and a parser's error message then quotes a part of it. The
    user info ends at the last ``@``, and each of its pieces between
    delimiters is hidden wherever it occurs as a whole word in ``text``.
    """
    _, separator, rest = url.partition("://")
    user_info = rest.rpartition("@")[0] if separator else url.rpartition("@")[0]
    if not user_info:
        return text
    pieces = {user_info, unquote(user_info)}
    for piece in re.split(r"[:/?#@&=]", user_info):
        if len(piece) >= 2:
            pieces.update({piece, unquote(piece)})
    for piece in sorted(pieces, key=len, reverse=True):
        # Whole pieces only, so "et" is hidden in "'et@host'" but the word
        # "parameter" stays readable.
        pattern = rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])"
        text = re.sub(pattern, "***", text)
    return text


def _parse_redis_url(url: str) -> RedisTarget:
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in _SCHEMES:
        # redis-py checks the redis://, rediss:// and unix:// forms.
        _check_connection_options(parse_url(url))
        return RedisTarget(STANDALONE, url)
    mode, ssl = _SCHEMES[scheme.lower()]
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise ValueError(f"the URL does not parse: {error}") from None
    if parts.fragment:
        raise ValueError("a fragment (#...) is not allowed")
    user_info, _, hosts = parts.netloc.rpartition("@")
    username, _, password = user_info.partition(":")
    query = _query(parts.query, mode)
    nodes = _nodes(hosts, _DEFAULT_PORTS[mode])
    service_name, db = _path(parts.path, mode)
    return RedisTarget(
        mode,
        url,
        nodes,
        service_name=service_name,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password"),
        ssl=ssl,
    )


def _check_connection_options(kwargs: dict) -> None:
    """Raise ValueError for a query parameter that no connection accepts.

    redis-py's parse_url passes unknown parameters through, and the first
    connection would then fail with TypeError. Building a connection object
    opens no socket, so this checks them at start-up.
    """
    options = dict(kwargs)
    connection_class = options.pop("connection_class", redis.connection.Connection)
    try:
        connection_class(**options)
    except TypeError as error:
        name = re.search(r"argument '(\w+)'", str(error))
        shown = repr(name.group(1)) if name else "in the URL"
        raise ValueError(f"unknown query parameter {shown}") from None


def _query(text: str, mode: str) -> dict[str, str]:
    allowed = {"sentinel_password"} if mode == SENTINEL else set()
    # Decoded as in the user info, so "+" stays "+" (parse_qs would make it a
    # space, and a password with "+" would then fail to authenticate).
    values = {}
    for part in filter(None, text.split("&")):
        name, _, value = part.partition("=")
        values[unquote(name)] = unquote(value)
    unknown = sorted(set(values) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"unknown query parameter {unknown[0]!r} (accepted: {accepted})"
        )
    return values


def _nodes(text: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in text.split(","):
        host, port = _host_port(item.strip(), default_port)
        nodes.append((host, port))
    return tuple(nodes)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):
        # An IPv6 address in brackets, such as [::1]:26379.
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError(f"missing host in {item!r}; expected HOST:PORT")
    if not port_text:
        return host, default_port
    if not _is_ascii_number(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port in {item!r}; expected 1 to 65535")
    return host, int(port_text)


def _path(path: str, mode: str) -> tuple[str, int]:
    segments = [unquote(segment) for segment in path.split("/")[1:]]
    if mode == CLUSTER:
        if segments not in ([], [""], ["0"]):
            raise ValueError("Redis Cluster has database 0 only; leave the path out")
        return "", 0
    if not segments or not segments[0]:
        raise ValueError("missing the Sentinel service name, as in /mymaster/0")
    if len(segments) > 2:
        raise ValueError("expected the path /SERVICE or /SERVICE/DB")
    db_text = segments[1] if len(segments) == 2 and segments[1] else "0"
    # Redis' own limit is its `databases` setting, 16 by default; this bound
    # only rejects numbers that no configuration allows.
    if not _is_ascii_number(db_text) or int(db_text) >= 2**31:
        raise ValueError(f"invalid database {db_text!r}; expected a number such as 0")
    return segments[0], int(db_text)


def _is_ascii_number(text: str) -> bool:
    # str.isdigit() is also true for other scripts' digits, such as "７".
    return text.isascii() and text.isdigit()


def example_for(url: str) -> str:
    """Return a valid example URL of the same form as ``url``."""
    scheme = url.partition("://")[0].lower()
    mode = _SCHEMES.get(scheme, (STANDALONE, False))[0]
    return EXAMPLES[mode]


# --- asyncio clients, for hasp-authz serve --------------------------------------


class BlockingSentinelConnectionPool(
    redis.asyncio.sentinel.SentinelConnectionPool,
    redis.asyncio.BlockingConnectionPool,
):
    """redis-py's Sentinel pool that waits for a free connection, up to ``timeout``.

    SentinelConnectionPool finds the primary; BlockingConnectionPool makes a
    caller wait when all ``max_connections`` are in use, where the plain pool
    would fail it at once.
    """


def async_client(
    target: RedisTarget,
    *,
    timeout: float,
    max_connections: int,
    blocking: bool = False,
    **options: object,
) -> AsyncClient:
    """Create an asyncio client for ``target`` that retries nothing by itself.

    ``timeout`` in seconds bounds connecting and each reply, and with
    ``blocking`` also the wait for a pooled connection. ``max_connections``
    bounds the pool. On a cluster it applies to each node, and a request that
    finds all of a node's connections busy fails at once with
    MaxConnectionsError, because redis-py's cluster client has no blocking pool.
    """
    common: dict[str, object] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": None,
        **options,
    }
    if target.mode == CLUSTER:
        return redis.asyncio.cluster.RedisCluster(
            startup_nodes=[
                redis.asyncio.cluster.ClusterNode(host, port)
                for host, port in target.nodes
            ],
            max_connections=max_connections,
            # redis-py's cluster client needs a Retry object; 0 retries still
            # follows MOVED and ASK replies.
            **{**common, "retry": redis.asyncio.retry.Retry(NoBackoff(), 0)},
            **target.server_kwargs(),
        )
    if target.mode == SENTINEL:
        sentinel = redis.asyncio.sentinel.Sentinel(
            target.nodes,
            sentinel_kwargs={
                **_sentinel_kwargs(target, timeout),
                "retry": redis.asyncio.retry.Retry(NoBackoff(), 0),
            },
        )
        pool_options: dict[str, object] = {"max_connections": max_connections}
        if blocking:
            pool_options["connection_pool_class"] = BlockingSentinelConnectionPool
            pool_options["timeout"] = timeout
        return sentinel.master_for(
            target.service_name,
            db=target.db,
            **pool_options,
            **common,
            **target.server_kwargs(),
        )
    pool_class = (
        redis.asyncio.BlockingConnectionPool
        if blocking
        else redis.asyncio.ConnectionPool
    )
    pool_options = {"max_connections": max_connections}
    if blocking:
        pool_options["timeout"] = timeout
    pool = pool_class.from_url(target.url, **pool_options, **common)
    return redis.asyncio.Redis.from_pool(pool)


def _sentinel_kwargs(target: RedisTarget, timeout: float) -> dict[str, object]:
    """Return the options of the connections to the Sentinels.

    The caller adds a Retry of 0 retries, because master discovery already
    moves on to the next Sentinel when one fails.
    """
    kwargs: dict[str, object] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "password": target.sentinel_password,
    }
    if target.ssl:
        kwargs["ssl"] = True
    return kwargs


async def close_async_client(client: AsyncClient) -> None:
    """Close ``client`` and, for a Sentinel client, its connections to the Sentinels."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        await pool.sentinel_manager.aclose()


async def ping_primaries(client: AsyncClient) -> None:
    """Send PING to the server, or to every primary of a cluster. Raises on failure."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.ping(target_nodes=redis.asyncio.cluster.RedisCluster.PRIMARIES)
    else:
        await client.ping()


async def node_client_for_key(
    target: RedisTarget, key: str, *, timeout: float, **options: object
) -> redis.asyncio.Redis:
    """Create a client on the one server that stores ``key``.

    On a cluster that is the primary that serves the key's hash slot, found
    from the slot map of a new cluster client, so the map is current. Elsewhere
    it is a client like ``async_client``'s with a pool of two connections.
    """
    if target.mode != CLUSTER:
        client = async_client(target, timeout=timeout, max_connections=2, **options)
        assert isinstance(client, redis.asyncio.Redis)
        return client
    cluster = async_client(target, timeout=timeout, max_connections=1)
    try:
        assert isinstance(cluster, redis.asyncio.cluster.RedisCluster)
        await cluster.initialize()
        node = cluster.get_node_from_key(key)
    finally:
        await cluster.aclose()
    return redis.asyncio.Redis(
        host=node.host,
        port=int(node.port),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=None,
        max_connections=2,
        **options,
        **target.server_kwargs(),
    )


# --- synchronous clients, for hasp-keys -----------------------------------------


def sync_client(
    target: RedisTarget, *, timeout: float, retry: Retry, **options: object
) -> SyncClient:
    """Create a synchronous client for ``target``.

    A cluster client connects at once, to read the slot map, so this raises
    the errors in REDIS_ERRORS when no node replies. The other clients
    connect on their first command.
    """
    common: dict[str, object] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        **options,
    }
    if target.mode == CLUSTER:
        return redis.cluster.RedisCluster(
            startup_nodes=[
                redis.cluster.ClusterNode(host, port) for host, port in target.nodes
            ],
            **common,
            **target.server_kwargs(),
        )
    if target.mode == SENTINEL:
        sentinel = redis.sentinel.Sentinel(
            target.nodes,
            sentinel_kwargs={
                **_sentinel_kwargs(target, timeout),
                "retry": Retry(NoBackoff(), 0),
            },
        )
        return sentinel.master_for(
            target.service_name, db=target.db, **common, **target.server_kwargs()
        )
    return redis.Redis.from_url(target.url, **common)


def describe_sync_client(client: SyncClient) -> str:
    """Name the server or deployment that ``client`` talks to, for messages."""
    if isinstance(client, redis.cluster.RedisCluster):
        names = sorted(node.name for node in client.get_primaries())
        return f"Redis Cluster {','.join(names)}"
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        addresses = []
        for sentinel in pool.sentinel_manager.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            addresses.append(f"{kwargs['host']}:{kwargs['port']}")
        return f"Sentinel service {pool.service_name!r} via {','.join(addresses)}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def sync_client_password(client: SyncClient) -> str | None:
    """Return the password that ``client`` sends to Redis, or None."""
    if isinstance(client, redis.cluster.RedisCluster):
        return client.nodes_manager.connection_kwargs.get("password")
    return client.connection_pool.connection_kwargs.get("password")


def close_sync_client(client: SyncClient) -> None:
    """Close ``client`` and, for a Sentinel client, its connections to the Sentinels."""
    client.close()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        pool.sentinel_manager.close()


def primary_run_ids(client: SyncClient) -> frozenset[str]:
    """Return the ``run_id`` of the primary, or of every primary of a cluster.

    A run id changes whenever a server restarts, and a failover puts another
    server, with another run id, in the primary's place.
    """
    if isinstance(client, redis.cluster.RedisCluster):
        replies = client.info(
            "server", target_nodes=redis.cluster.RedisCluster.PRIMARIES
        )
        if "run_id" in replies:
            # redis-py returns the reply alone when the cluster has one primary.
            replies = {"": replies}
        return frozenset(str(info["run_id"]) for info in replies.values())
    return frozenset({str(client.info("server")["run_id"])})


# Seconds between two questions to the Sentinels about the primary.
PRIMARY_CHECK_SECONDS = 1.0


async def refresh_sentinel_primary(client: AsyncClient) -> tuple[str, int] | None:
    """Query the Sentinels for the primary, and close every connection on a change.

    redis-py's Sentinel pool queries them only when it opens a connection, so
    open connections would go on reading a demoted primary, which still
    replies with data from before the failover. Returns the new primary's
    address if it changed, else None, also for a client that is not
    Sentinel-managed. Raises redis-py's errors when no Sentinel replies.
    """
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        return None
    before = pool.master_address
    # get_master_address records the new address and closes idle connections.
    address = await pool.get_master_address()
    if before is None or address == before:
        return None
    # A connection that a Check uses now would go back to the pool unchanged.
    await pool.disconnect(inuse_connections=True)
    return address


def refresh_sentinel_primary_sync(client: SyncClient) -> tuple[str, int] | None:
    """Do what refresh_sentinel_primary does, for a synchronous client."""
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return None
    before = pool.master_address
    address = pool.get_master_address()
    if before is None or address == before:
        return None
    pool.disconnect(inuse_connections=True)
    return address
