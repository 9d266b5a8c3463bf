"""Run the ext_authz gRPC server with the standard gRPC health service.

Beside the gRPC server, background tasks run on the same event loop: the
ChangeSubscriber that keeps the in-process cache fresh (only when the cache is
on), the LastUsedRecorder's periodic flush and the readiness probe. The
operations HTTP server (/metrics, /healthz, /readyz) runs in a thread of its
own unless HASP_METRICS_LISTEN is "off". SIGHUP reloads the route file.

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
import redis.asyncio.cluster as redis_cluster
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hasp_authz.authorizer import Authorizer
from hasp_authz.cache import CachedKeyCopy, RecordCache
from hasp_authz.config import METRICS_OFF, Settings
from hasp_authz.invalidation import ChangeSubscriber
from hasp_authz.last_used import LastUsedRecorder
from hasp_authz.logs import configuration_fields
from hasp_authz.metrics import Metrics
from hasp_authz.ops_http import OpsHttpServer, ReadinessProbe
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.records import RedisLayout
from hasp_authz.redis_clients import (
    PRIMARY_CHECK_SECONDS,
    REDIS_ERRORS,
    SENTINEL,
    AsyncClient,
    async_client,
    close_async_client,
    parse_redis_url,
    refresh_sentinel_primary,
)
from hasp_authz.reload import RouteReloader
from hasp_authz.routes import RouteTable, load_route_table
from hasp_authz.servicer import AuthorizationServicer
from hasp_authz.store import KeyLookup, RedisKeyCopy

log = logging.getLogger(__name__)

# Connect and socket timeout of the last-used flush client, in seconds.
BACKGROUND_TIMEOUT_SECONDS = 2.0
# Time limit of the last flush at shutdown, in seconds.
FINAL_FLUSH_TIMEOUT_SECONDS = 5.0


def build_redis_client(settings: Settings) -> AsyncClient:
    """Create the Check path's Redis client with deliberate timeouts and pool size.

    Connect, read and write each time out after HASP_REDIS_TIMEOUT_MS. The pool
    has at most HASP_REDIS_MAX_CONNECTIONS connections. For one server and for
    Sentinel it is a blocking pool (redis-py's BlockingConnectionPool, or
    redis_clients.BlockingSentinelConnectionPool), so a Check that finds every
    connection busy waits for one, up to one Redis timeout and never past its
    own deadline. The default pool would fail that Check at once, even when a
    connection comes free a moment later. On a cluster the limit applies to
    each node and a Check past it fails at once, because redis-py's cluster
    client has no blocking pool. redis-py retries nothing here: the one retry
    of a failed connection is store.RedisKeyCopy's, which knows the Check's
    deadline.
    """
    timeout = settings.redis_timeout_ms / 1000
    return async_client(
        parse_redis_url(settings.redis_url),
        timeout=timeout,
        max_connections=settings.redis_max_connections,
        blocking=True,
        health_check_interval=0,
    )


def build_background_client(settings: Settings) -> AsyncClient:
    """Create the client for last-used flushes, apart from the Check path's pool.

    A slow flush then never takes a connection that a Check is waiting for.
    """
    return async_client(
        parse_redis_url(settings.redis_url),
        timeout=BACKGROUND_TIMEOUT_SECONDS,
        max_connections=2,
    )


def build_key_lookup(
    settings: Settings,
    client: AsyncClient,
    layout: RedisLayout,
    metrics: Metrics,
) -> tuple[KeyLookup, ChangeSubscriber | None, RecordCache | None]:
    """Return the Check path's key lookup, cached unless HASP_CACHE_SIZE is 0.

    The subscriber and the cache are None when the cache is off.
    """
    copy = RedisKeyCopy(
        client,
        layout,
        redis_timeout_seconds=settings.redis_timeout_ms / 1000,
        on_redis_error=metrics.observe_redis_error,
        # Redis Cluster rejects the one-round-trip script, which reads an org
        # record in a slot that it does not declare.
        single_round_trip=not isinstance(client, redis_cluster.RedisCluster),
    )
    if settings.cache_size == 0:
        return copy, None, None
    cache = RecordCache(
        settings.cache_size,
        settings.cache_ttl_seconds,
        settings.negative_cache_ttl_seconds,
        stale_if_error_seconds=settings.stale_if_error_seconds,
    )
    subscriber = ChangeSubscriber(
        settings.redis_url, layout, cache, on_change=metrics.observe_change
    )
    return CachedKeyCopy(copy, cache, metrics.observe_cache), subscriber, cache


class AuthzService:
    """The gRPC server with its Redis clients and background tasks."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        layout = RedisLayout(settings.redis_prefix)
        self.client = build_redis_client(settings)
        self.background_client = build_background_client(settings)
        lookup, self.subscriber, self.cache = build_key_lookup(
            settings, self.client, layout, self.metrics
        )
        self.recorder = LastUsedRecorder(self.background_client, layout)
        self.authorizer = Authorizer(
            lookup, load_route_table(settings.routes_file), last_used=self.recorder
        )
        self.servicer = AuthorizationServicer(
            self.authorizer,
            budget_seconds=settings.check_budget_ms / 1000,
            max_concurrent_checks=settings.max_concurrent_checks,
            metrics=self.metrics,
        )
        self.reloader = RouteReloader(
            settings.routes_file,
            self._apply_routes,
            on_result=lambda result: self.metrics.route_reloads.labels(result).inc(),
        )
        # The probe uses the background client, so it never waits for a
        # connection that a Check needs, and a flood of Checks never fails it.
        self.readiness = ReadinessProbe(
            self.background_client,
            layout.complete_marker,
            (lambda: self.cache.active) if self.cache is not None else None,
        )
        self.ops_http: OpsHttpServer | None = None
        if settings.metrics_listen != METRICS_OFF:
            # Binds now, so an address in use fails the start-up.
            self.ops_http = OpsHttpServer(
                settings.metrics_listen,
                self.metrics.registry,
                lambda: self.readiness.current,
            )
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        self.tasks: list[asyncio.Task] = []

    async def _watch_sentinel_primary(self) -> None:
        """Follow a Sentinel failover even when no Redis call fails.

        A primary that was frozen and comes back still replies until the
        Sentinels demote it, with data from before the failover, so a Check
        on an old connection could allow a key revoked since. On a change
        every connection is closed. The cache is bypassed until the change
        subscription has moved to the new primary, because the cache may hold
        records read from the old primary, and a subscription left there
        misses the change messages published on the new one.
        """
        while True:
            await asyncio.sleep(PRIMARY_CHECK_SECONDS)
            changed = None
            try:
                for client in (self.client, self.background_client):
                    changed = await refresh_sentinel_primary(client) or changed
            except REDIS_ERRORS as error:
                log.warning(
                    "cannot ask the Sentinels for the primary: %s",
                    type(error).__name__,
                )
                continue
            if changed is None:
                continue
            if self.cache is not None:
                self.cache.report_redis_failure()
            log.warning(
                "Redis primary changed to %s:%d; closed the connections to the "
                "old one and bypass the in-process cache until the change "
                "subscription is on the new one",
                *changed,
                extra={"event": "redis_primary_changed"},
            )

    @property
    def routes(self) -> RouteTable:
        return self.authorizer.routes

    def _apply_routes(self, table: RouteTable) -> None:
        # One assignment on the event loop: a Check in flight keeps the table
        # it read, and the next Check reads the new one.
        self.authorizer.routes = table

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
        self.tasks.append(asyncio.create_task(self.readiness.run()))
        if parse_redis_url(self.settings.redis_url).mode == SENTINEL:
            self.tasks.append(asyncio.create_task(self._watch_sentinel_primary()))
        if self.ops_http is not None:
            self.ops_http.start()
        self.reloader.install(asyncio.get_running_loop())

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
        if self.ops_http is not None:
            # Blocks until the HTTP thread ends, which takes at most its
            # 0.5 s shutdown poll.
            await asyncio.to_thread(self.ops_http.stop)
        await _final_flush(self.recorder)
        if self.subscriber is not None:
            await self.subscriber.close()
        await close_async_client(self.background_client)
        await close_async_client(self.client)


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop."""
    service = AuthzService(settings)
    await service.start()
    log.info(
        "hasp-authz serving on %s with %d routes; settings %r",
        settings.listen, len(service.routes.routes), settings,
        extra={"event": "started", "settings": configuration_fields(settings),
               "routes": len(service.routes.routes)},
    )  # fmt: skip

    await _wait_for_stop_signal()
    log.info(
        "stopping: health reports NOT_SERVING; draining in-flight checks for up to "
        "%g s",
        settings.shutdown_grace_seconds,
        extra={"event": "stopping"},
    )
    await service.stop()
    log.info(
        "hasp-authz stopped",
        extra={"event": "stopped", "settings": configuration_fields(settings)},
    )


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
