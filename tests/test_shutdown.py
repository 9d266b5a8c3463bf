"""Graceful shutdown on SIGTERM, against a real ``hasp-authz serve`` process.

The health service must report NOT_SERVING first, Checks in flight must finish
with a well-formed response within HASP_SHUTDOWN_GRACE_SECONDS, and the process
must exit 0. A Redis of the test's own is stalled with a busy script so that a
Check is in flight when SIGTERM arrives.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

from grpc_health.v1 import health_pb2

from fault_helpers import freeze, stall_once, thaw
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from test_servicer import (
    AuthzServer,
    check_request,
    http_status,
    mark_complete,
    seed_key,
)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Without the cache every Check reads Redis, and budgets of seconds let a
# Check stay in flight while the test sends SIGTERM.
SLOW_CHECK_ARGS = [
    "--cache-size", "0",
    "--check-budget-ms", "4000",
    "--redis-timeout-ms", "3500",
]  # fmt: skip


def wait_for_health(server: AuthzServer, expected: int, within: float) -> None:
    deadline = time.monotonic() + within
    while server.health_status("") != expected:
        assert time.monotonic() < deadline, f"health never reported {expected}"
        time.sleep(0.02)


def send_in_thread(
    pool: ThreadPoolExecutor, server: AuthzServer, request: auth_pb2.CheckRequest
) -> Future[auth_pb2.CheckResponse]:
    future = pool.submit(server.check, request)
    time.sleep(0.2)
    assert not future.done(), "the Check was expected to wait for Redis"
    return future


def test_sigterm_finishes_in_flight_check(
    start_server, private_redis, private_client, layout
):
    key = seed_key(private_client, layout)
    mark_complete(private_client, layout)
    server = start_server(
        redis_url=private_redis.url,
        extra_args=[*SLOW_CHECK_ARGS, "--shutdown-grace-seconds", "10"],
    )
    request = check_request(headers=[key.authorization])
    assert http_status(server.check(request)) == 200

    stall = stall_once(private_redis.url, 1.5)
    with ThreadPoolExecutor(max_workers=2) as pool:
        in_flight = send_in_thread(pool, server, request)
        server.process.send_signal(signal.SIGTERM)
        wait_for_health(server, NOT_SERVING, within=1.0)
        assert not in_flight.done()
        # Still decided while draining: Envoy may send more before it stops.
        during_drain = pool.submit(server.check, request)
        response = in_flight.result(timeout=10)
        second = during_drain.result(timeout=10)
    stall.join()
    exit_code = server.process.wait(timeout=10)

    assert http_status(response) == 200
    identity = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert identity["x-hasp-key-id"] == key.record.key_id
    assert http_status(second) == 200
    assert exit_code == 0
    assert "hasp-authz stopped" in server.log()


def test_sigterm_exits_after_grace_despite_stuck_check(
    start_server, private_redis, private_client, layout
):
    key = seed_key(private_client, layout)
    mark_complete(private_client, layout)
    server = start_server(
        redis_url=private_redis.url,
        extra_args=[*SLOW_CHECK_ARGS, "--shutdown-grace-seconds", "1"],
    )
    request = check_request(headers=[key.authorization])

    freeze(private_redis)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            stuck = send_in_thread(pool, server, request)
            sent_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            exit_code = server.process.wait(timeout=10)
            stopped_after = time.monotonic() - sent_at
            # The Check was cancelled; Envoy turns that into its own JSON 503.
            assert stuck.exception(timeout=5) is not None
    finally:
        thaw(private_redis)

    assert exit_code == 0
    # The 1 s grace period plus closing Redis clients and the process itself.
    assert stopped_after < 3.0
    assert "checks still in flight" in server.log()
