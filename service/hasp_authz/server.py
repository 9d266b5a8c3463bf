"""Run the ext_authz gRPC server with the standard gRPC health service."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hasp_authz.authorizer import Authorizer
from hasp_authz.config import Settings
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.records import RedisLayout
from hasp_authz.routes import load_route_table
from hasp_authz.servicer import AuthorizationServicer
from hasp_authz.store import RedisKeyCopy

log = logging.getLogger(__name__)

# Seconds in-flight Checks get to finish after SIGTERM or SIGINT.
SHUTDOWN_GRACE_SECONDS = 5.0


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


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop."""
    routes = load_route_table(settings.routes_file)
    client = build_redis_client(settings)
    copy = RedisKeyCopy(client, RedisLayout(settings.redis_prefix))
    servicer = AuthorizationServicer(
        Authorizer(copy, routes), budget_seconds=settings.check_budget_ms / 1000
    )

    server = grpc.aio.server()
    auth_grpc.add_AuthorizationServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    await _set_serving(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "hasp-authz serving on %s with %d routes; settings %r",
        settings.listen, len(routes.routes), settings,
    )  # fmt: skip

    await _wait_for_stop_signal()
    log.info(
        "stopping: draining in-flight checks for up to %.0f s", SHUTDOWN_GRACE_SECONDS
    )
    await _set_serving(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    await client.aclose()
    log.info("hasp-authz stopped")


async def _set_serving(health_servicer: health.aio.HealthServicer, status: int) -> None:
    for service in ("", "envoy.service.auth.v3.Authorization"):
        await health_servicer.set(service, status)


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
