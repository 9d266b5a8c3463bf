"""Run the ext_authz gRPC server with the standard gRPC health service.

Beside the gRPC server, two background tasks run on the same event loop: the
ChangeSubscriber that keeps the in-process cache fresh (only when the cache is
on) and the LastUsedRecorder's periodic flush.

Shutdown on SIGTERM or SIGINT: the health service reports NOT_SERVING at once.
Checks, new ones included, still get responses until none is in flight,
because Envoy in the same pod may still send requests while it stops. That
lasts at most HASP_SHUTDOWN_GRACE_SECONDS less one check budget. Then the
server stops accepting RPCs and gives the Checks in flight the rest of the
grace period before it cancels them. Last, it stops both tasks and flushes
last-used times once more, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hasp_authz.authorizer import Authorizer
from hasp_authz.cache import CachedKeyCopy, RecordCache
from hasp_authz.config import Settings
from hasp_authz.invalidation import ChangeSubscriber
from hasp_authz.last_used import LastUsedRecorder
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.records import RedisLayout
from hasp_authz.routes import load_route_table
from hasp_authz.servicer import AuthorizationServicer
from hasp_authz.store import KeyLookup, RedisKeyCopy

log = logging.getLogger(__name__)

# Connect and socket timeout of the last-used flush client, in seconds.
BACKGROUND_TIMEOUT_SECONDS = 2.0
# Time limit of the last flush at shutdown, in seconds.
FINAL_FLUSH_TIMEOUT_SECONDS = 5.0


def build_redis_client(settings: Settings) -> redis.Redis:
    """Create the Check path's Redis client with deliberate timeouts and pool size.

    Connect, read and write each time out after HASP_REDIS_TIMEOUT_MS. The pool
    has at most HASP_REDIS_MAX_CONNECTIONS connections. It is redis-py's
    BlockingConnectionPool, so a Check that finds every connection busy waits
    for one, up to one Redis timeout and never past its own deadline. The
    default ConnectionPool would fail that Check at once, even when a
    connection comes free a moment later. redis-py retries nothing here: the
    one retry of a failed connection is store.RedisKeyCopy's, which knows the
    Check's deadline.
    """
    timeout = settings.redis_timeout_ms / 1000
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=None,
        health_check_interval=0,
    )
    return redis.Redis.from_pool(pool)


def build_background_client(settings: Settings) -> redis.Redis:
    """Create the client for last-used flushes, apart from the Check path's pool.

    A slow flush then never takes a connection that a Check is waiting for.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=BACKGROUND_TIMEOUT_SECONDS,
        socket_connect_timeout=BACKGROUND_TIMEOUT_SECONDS,
        max_connections=2,
        retry=None,
    )


def build_key_lookup(
    settings: Settings, client: redis.Redis, layout: RedisLayout
) -> tuple[KeyLookup, ChangeSubscriber | None]:
    """Return the Check path's key lookup, cached unless HASP_CACHE_SIZE is 0.

    The subscriber is None when the cache is off.
    """
    copy = RedisKeyCopy(
        client, layout, redis_timeout_seconds=settings.redis_timeout_ms / 1000
    )
    if settings.cache_size == 0:
        return copy, None
    cache = RecordCache(
        settings.cache_size,
        settings.cache_ttl_seconds,
        settings.negative_cache_ttl_seconds,
        stale_if_error_seconds=settings.stale_if_error_seconds,
    )
    subscriber = ChangeSubscriber(settings.redis_url, layout, cache)
    return CachedKeyCopy(copy, cache), subscriber


class AuthzService:
    """The gRPC server with its Redis clients and background tasks."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.routes = load_route_table(settings.routes_file)
        layout = RedisLayout(settings.redis_prefix)
        self.client = build_redis_client(settings)
        self.background_client = build_background_client(settings)
        lookup, self.subscriber = build_key_lookup(settings, self.client, layout)
        self.recorder = LastUsedRecorder(self.background_client, layout)
        authorizer = Authorizer(lookup, self.routes, last_used=self.recorder)
        self.servicer = AuthorizationServicer(
            authorizer,
            budget_seconds=settings.check_budget_ms / 1000,
            max_concurrent_checks=settings.max_concurrent_checks,
        )
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Listen, report SERVING and start the background tasks."""
        auth_grpc.add_AuthorizationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.server.add_insecure_port(self.settings.listen) == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await self.server.start()
        await _set_serving(self.health, health_pb2.HealthCheckResponse.SERVING)
        flush_seconds = self.settings.last_used_flush_seconds
        self.tasks.append(asyncio.create_task(self.recorder.run(flush_seconds)))
        if self.subscriber is not None:
            self.tasks.append(asyncio.create_task(self.subscriber.run()))

    async def stop(self) -> None:
        """Drain in-flight Checks, stop the tasks, flush once more, close clients."""
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace_seconds
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        budget = self.settings.check_budget_ms / 1000
        idle = await self.servicer.wait_until_idle(max(0.0, grace - budget))
        if not idle:
            log.info(
                "stopping: %d checks still in flight; no new ones are accepted",
                self.servicer.in_flight,
            )
        await self.server.stop(max(0.0, deadline - loop.time()))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await _final_flush(self.recorder)
        if self.subscriber is not None:
            await self.subscriber.close()
        await self.background_client.aclose()
        await self.client.aclose()


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop."""
    # TODO: metrics.py, ops_http.py (/metrics, /healthz, /readyz), logs.py,
    # policy.py (per-route context_extensions) and reload.py (SIGHUP) are built
    # and unit-tested but not started here yet, so serve() exposes none of them.
    service = AuthzService(settings)
    await service.start()
    log.info(
        "hasp-authz serving on %s with %d routes; settings %r",
        settings.listen, len(service.routes.routes), settings,
    )  # fmt: skip

    await _wait_for_stop_signal()
    log.info(
        "stopping: health reports NOT_SERVING; draining in-flight checks for up to "
        "%g s",
        settings.shutdown_grace_seconds,
    )
    await service.stop()
    log.info("hasp-authz stopped")


async def _final_flush(recorder: LastUsedRecorder) -> None:
    try:
        written = await asyncio.wait_for(recorder.flush(), FINAL_FLUSH_TIMEOUT_SECONDS)
    except TimeoutError:
        written = False
    if not written:
        log.warning(
            "final last-used flush failed; the times of %d keys are lost",
            len(recorder.pending),
        )


async def _set_serving(health_servicer: health.aio.HealthServicer, status: int) -> None:
    for service in ("", "envoy.service.auth.v3.Authorization"):
        await health_servicer.set(service, status)


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
