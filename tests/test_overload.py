"""Overload: past HASP_MAX_CONCURRENT_CHECKS, Checks get the 503 deny at once.

A real ``hasp-authz serve`` process with a small limit and a redis-server of the
test's own. Freezing Redis (SIGSTOP) keeps each admitted Check busy until its
Redis timeout (0.4 s here), so a burst fills every slot. The Checks past
the limit must be denied with the documented 503 without waiting for a slot,
and the gRPC health service must still respond.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fault_helpers import (
    assert_auth_unavailable,
    freeze,
    thaw,
    wait_for_status,
)
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from test_servicer import check_request, http_status, mark_complete, seed_key

LIMIT = 8
BURST = 100
# The debug line of each Check denied for overload.
OVERLOAD_DEBUG_LOG = "overloaded\n"


async def burst(
    address: str, request: auth_pb2.CheckRequest, count: int
) -> tuple[list[tuple[auth_pb2.CheckResponse, float]], int, float]:
    """Send ``count`` Checks at once and a health check while they run.

    Returns each Check's response and latency, the health status and the
    health check's latency.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = auth_grpc.AuthorizationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def timed_check() -> tuple[auth_pb2.CheckResponse, float]:
            started = time.monotonic()
            response = await stub.Check(request, timeout=5)
            return response, time.monotonic() - started

        async def timed_health() -> tuple[int, float]:
            await asyncio.sleep(0.01)
            started = time.monotonic()
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            return reply.status, time.monotonic() - started

        checks = [asyncio.create_task(timed_check()) for _ in range(count)]
        health_status, health_seconds = await timed_health()
        return await asyncio.gather(*checks), health_status, health_seconds


def test_check_fails_fast_when_overloaded(
    start_server, private_redis, private_client, layout
):
    key = seed_key(private_client, layout)
    mark_complete(private_client, layout)
    server = start_server(
        redis_url=private_redis.url,
        extra_args=[
            "--cache-size", "0",
            "--max-concurrent-checks", str(LIMIT),
            "--check-budget-ms", "450",
            "--redis-timeout-ms", "400",
        ],
    )  # fmt: skip
    request = check_request(headers=[key.authorization])
    assert http_status(server.check(request)) == 200

    freeze(private_redis)
    try:
        results, health_status, health_seconds = asyncio.run(
            burst(server.address, request, BURST)
        )
    finally:
        thaw(private_redis)

    for response, _ in results:
        assert_auth_unavailable(response)
    # Queued for LIMIT slots, the last Check would wait BURST / LIMIT Redis
    # timeouts (5 s); denied at once, the burst ends after about one. The bound
    # leaves room for a loaded CI machine and still tells the two apart.
    assert max(seconds for _, seconds in results) < 2.5
    log = server.log()
    denied = log.count(OVERLOAD_DEBUG_LOG)
    reached_redis = log.count("key copy unavailable")
    assert denied + reached_redis == BURST
    # A slot that comes free before the whole burst has arrived admits one
    # more Check on a slow test machine.
    assert reached_redis <= 2 * LIMIT
    assert health_status == health_pb2.HealthCheckResponse.SERVING
    assert health_seconds < 0.5
    assert "overloaded: " in server.log()
    # Every slot comes free again once Redis replies.
    assert wait_for_status(server, request, 200, within=2.0) < 2.0


def test_burst_within_limit_is_not_denied(
    start_server, private_redis, private_client, layout
):
    key = seed_key(private_client, layout)
    mark_complete(private_client, layout)
    server = start_server(
        redis_url=private_redis.url, extra_args=["--max-concurrent-checks", "64"]
    )
    request = check_request(headers=[key.authorization])

    results, health_status, _ = asyncio.run(burst(server.address, request, 50))

    assert [http_status(response) for response, _ in results] == [200] * 50
    assert health_status == health_pb2.HealthCheckResponse.SERVING
    assert "overloaded: " not in server.log()
