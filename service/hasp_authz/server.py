"""Run the ext_authz gRPC server with the standard gRPC health service.

Beside the gRPC server, two background tasks run on the same event loop: the
ChangeSubscriber that keeps the in-process cache fresh (only when the cache is
on) and the LastUsedRecorder's periodic flush. On SIGTERM or SIGINT the server
drains in-flight Checks, stops both tasks and flushes last-used times once more.
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

# Seconds in-flight Checks get to finish after SIGTERM or SIGINT.
SHUTDOWN_GRACE_SECONDS = 5.0
# Connect and socket timeout of the last-used flush client, in seconds.
BACKGROUND_TIMEOUT_SECONDS = 2.0
# Time limit of the last flush at shutdown, in seconds.
FINAL_FLUSH_TIMEOUT_SECONDS = 5.0


def build_redis_client(settings: Settings) -> redis.Redis:
    """Create the Check path's Redis client with deliberate timeouts and pool size.

    No retries: one failed call becomes a 503 that the client may retry, which
    keeps every Check inside its budget.
    """
    timeout = settings.redis_timeout_ms / 1000
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=settings.redis_max_connections,
        retry_on_timeout=False,
        retry=None,
        health_check_interval=0,
    )


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
    copy = RedisKeyCopy(client, layout)
    if settings.cache_size == 0:
        return copy, None
    cache = RecordCache(
        settings.cache_size,
        settings.cache_ttl_seconds,
        settings.negative_cache_ttl_seconds,
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
            authorizer, budget_seconds=settings.check_budget_ms / 1000
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
        await _set_serving(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(SHUTDOWN_GRACE_SECONDS)
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
    service = AuthzService(settings)
    await service.start()
    log.info(
        "hasp-authz serving on %s with %d routes; settings %r",
        settings.listen, len(service.routes.routes), settings,
    )  # fmt: skip

    await _wait_for_stop_signal()
    log.info(
        "stopping: draining in-flight checks for up to %.0f s", SHUTDOWN_GRACE_SECONDS
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
