"""Helpers shared by the fault, overload and shutdown tests.

They drive a real ``hasp-authz serve`` process (see test_servicer.AuthzServer)
against a redis-server of the test's own, which they kill, freeze with SIGSTOP
or stall with a busy script.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from hasp_authz.dev.redis_server import RedisServer
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.records import OrgRecord, RedisLayout
from hasp_authz.tokens import hash_token
from test_servicer import (
    AuthzServer,
    SeededKey,
    deny_error,
    deny_headers,
    http_status,
)

# The default check budget is 0.2 s and Envoy gives up after 0.5 s. A Check
# without a response within this limit would reach the client as Envoy's own
# 503, so the tests hold every response under it. The gap to the budget leaves
# room for a slow test machine.
ANSWER_LIMIT_SECONDS = 0.45
# A service that runs again must decide correctly within this long.
RECOVERY_SECONDS = 2.0


def write_key(client: redis.Redis, layout: RedisLayout, key: SeededKey) -> None:
    """Write a seeded key's record and its org (with a BAA) again, as a sync would."""
    client.set(layout.key(hash_token(key.token)), key.record.to_json())
    client.set(
        layout.org(key.record.org_id), OrgRecord(key.record.org_id, True).to_json()
    )


def freeze(server: RedisServer) -> None:
    """Stop redis-server with SIGSTOP: connections stay open and get no reply."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


def kill(server: RedisServer) -> None:
    """Kill redis-server with SIGKILL; a later start() runs a new, empty one."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(timeout=5)
    server.stop()


def timed_check(
    server: AuthzServer, request: auth_pb2.CheckRequest
) -> tuple[auth_pb2.CheckResponse, float]:
    started = time.monotonic()
    response = server.check(request)
    return response, time.monotonic() - started


def assert_auth_unavailable(response: auth_pb2.CheckResponse) -> None:
    """Assert the documented 503: AUTH_UNAVAILABLE, retryable, with Retry-After."""
    assert http_status(response) == 503, response
    headers = deny_headers(response)
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "1"
    error = deny_error(response)
    assert error["code"] == "AUTH_UNAVAILABLE"
    assert error["type"] == "service_unavailable"
    assert error["retryable"] is True
    assert error["request_id"].startswith("req_")


def wait_for_status(
    server: AuthzServer,
    request: auth_pb2.CheckRequest,
    expected: int,
    within: float,
) -> float:
    """Check until the HTTP status is ``expected``; return the seconds it took."""
    started = time.monotonic()
    while True:
        status = http_status(server.check(request))
        elapsed = time.monotonic() - started
        if status == expected:
            return elapsed
        assert elapsed < within, f"still {status}, not {expected}, after {within} s"
        time.sleep(0.01)


# Keeps Redis busy for ARGV[1] microseconds. Redis runs one script at a time on
# its only command thread, so every client waits for its reply.
_STALL_SCRIPT = """
local start = redis.call('TIME')
local began = start[1] * 1000000 + start[2]
repeat
  local now = redis.call('TIME')
until now[1] * 1000000 + now[2] - began >= tonumber(ARGV[1])
return 0
"""


def stall_once(url: str, seconds: float) -> threading.Thread:
    """Stall Redis for ``seconds`` from a thread; returns once the stall runs."""

    def run() -> None:
        client = redis.Redis.from_url(url, socket_timeout=seconds + 5)
        try:
            client.eval(_STALL_SCRIPT, 0, int(seconds * 1_000_000))
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Long enough for the script to reach Redis before the caller goes on.
    time.sleep(0.05)
    return thread


@contextmanager
def redis_stalls(url: str, stall_ms: int, gap_seconds: float) -> Iterator[None]:
    """Stall Redis for ``stall_ms`` again and again, ``gap_seconds`` apart, in a thread.

    A busy script is used because ``CLIENT PAUSE`` ends only at Redis' next
    periodic check (100 ms apart by default), which makes short pauses far
    longer than asked.
    """
    stop = threading.Event()
    admin = redis.Redis.from_url(url, socket_timeout=5)
    stall = admin.register_script(_STALL_SCRIPT)

    def stall_repeatedly() -> None:
        while not stop.is_set():
            stall(args=[stall_ms * 1000])
            stop.wait(gap_seconds)

    thread = threading.Thread(target=stall_repeatedly, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        admin.close()
