"""The ops HTTP server and the readiness probe, against a real private Redis."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from hasp_authz import ops_http
from hasp_authz.dev.redis_server import RedisServer
from hasp_authz.metrics import Metrics
from hasp_authz.ops_http import (
    MAX_CONNECTIONS,
    NOT_PROBED,
    OpsHttpServer,
    Readiness,
    ReadinessProbe,
)

MARKER = "hasp:test:complete"


def get(port: int, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def ops_server() -> Iterator[tuple[OpsHttpServer, Metrics, list[Readiness]]]:
    metrics = Metrics()
    state = [NOT_PROBED]
    server = OpsHttpServer("127.0.0.1:0", metrics.registry, lambda: state[0])
    server.start()
    try:
        yield server, metrics, state
    finally:
        server.stop()


def test_healthz_returns_200(ops_server):
    server, _, _ = ops_server
    assert get(server.port, "/healthz") == (200, "ok\n")


def test_readyz_follows_probe_result(ops_server):
    server, _, state = ops_server
    status, body = get(server.port, "/readyz")
    assert status == 503
    assert body == "not ready: readiness not probed yet\n"
    state[0] = Readiness(True, "")
    assert get(server.port, "/readyz") == (200, "ready\n")


def test_metrics_shows_decision_counts(ops_server):
    server, metrics, _ = ops_server
    metrics.observe_check("ALLOW", "/v1/ai/chat", 0.001)
    metrics.observe_check("MISSING_SCOPE", "/v1/ai/chat", 0.001)
    status, body = get(server.port, "/metrics")
    assert status == 200
    assert 'hasp_authz_decisions_total{code="ALLOW",route="/v1/ai/chat"} 1.0' in body
    assert (
        'hasp_authz_decisions_total{code="MISSING_SCOPE",route="/v1/ai/chat"} 1.0'
        in body
    )


def test_unknown_path_returns_404(ops_server):
    server, _, _ = ops_server
    status, _ = get(server.port, "/metrics/../admin")
    assert status == 404


def test_listen_on_busy_port_raises(ops_server):
    server, metrics, _ = ops_server
    with pytest.raises(OSError):
        OpsHttpServer(f"127.0.0.1:{server.port}", metrics.registry, lambda: NOT_PROBED)


async def probe_once(url: str, live: bool | None = True) -> Readiness:
    client = aioredis.Redis.from_url(url, socket_timeout=0.5, retry=None)
    subscription = None if live is None else (lambda: live)
    try:
        return await ReadinessProbe(client, MARKER, subscription).probe()
    finally:
        await client.aclose()


def test_probe_ready_with_marker_and_subscription(private_redis, private_client):
    private_client.set(MARKER, "{}")
    assert asyncio.run(probe_once(private_redis.url)) == Readiness(True, "")


def test_probe_needs_no_subscription_when_cache_off(private_redis, private_client):
    private_client.set(MARKER, "{}")
    assert asyncio.run(probe_once(private_redis.url, live=None)).ready


def test_probe_not_ready_without_marker(private_redis):
    result = asyncio.run(probe_once(private_redis.url))
    assert not result.ready
    assert "completeness marker hasp:test:complete missing" in result.reason


def test_probe_not_ready_while_subscription_down(private_redis, private_client):
    private_client.set(MARKER, "{}")
    result = asyncio.run(probe_once(private_redis.url, live=False))
    assert result == Readiness(False, "change subscription down")


def test_readiness_drops_while_redis_stopped(tmp_path):
    """Readiness follows a private Redis through a stop and a restart."""
    redis_server = RedisServer(workdir=tmp_path).start()
    try:
        asyncio.run(_follow_stop_and_restart(redis_server))
    finally:
        redis_server.stop()


async def _follow_stop_and_restart(redis_server: RedisServer) -> None:
    sync_client = redis.Redis.from_url(redis_server.url)
    sync_client.set(MARKER, "{}")
    sync_client.close()
    client = aioredis.Redis.from_url(
        redis_server.url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    )
    probe = ReadinessProbe(client, MARKER, lambda: True, interval=0.1)
    server = OpsHttpServer("127.0.0.1:0", Metrics().registry, lambda: probe.current)
    server.start()
    task = asyncio.create_task(probe.run())
    try:
        await _wait_for_status(server.port, 200)

        redis_server.stop()
        body = await _wait_for_status(server.port, 503)
        assert "Redis unreachable" in body

        # The restarted server keeps nothing on disk, so the marker is gone.
        redis_server.start()
        body = await _wait_for_status(server.port, 503, "marker")
        assert "completeness marker" in body
        await client.set(MARKER, "{}")
        await _wait_for_status(server.port, 200)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.stop()
        await client.aclose()


async def _wait_for_status(
    port: int, status: int, text: str = "", timeout: float = 5.0
) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got, body = await asyncio.to_thread(get, port, "/readyz")
        if got == status and text in body:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"/readyz stayed {got} {body!r}, expected {status}")
        await asyncio.sleep(0.05)


def test_head_returns_status_without_body(ops_server):
    server, _, _ = ops_server
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/healthz", method="HEAD"
    )

    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "3"
        assert response.read() == b""


def test_reset_connection_prints_no_traceback(ops_server, capfd):
    server, _, _ = ops_server
    for _ in range(5):
        connection = socket.create_connection(("127.0.0.1", server.port))
        # SO_LINGER 0 makes close() send a reset while the reply is written.
        connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        connection.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        connection.close()

    assert get(server.port, "/healthz") == (200, "ok\n")
    assert "Traceback" not in capfd.readouterr().err


def test_connection_cap_closes_extra_connections(ops_server):
    server, _, _ = ops_server
    idle = [
        socket.create_connection(("127.0.0.1", server.port))
        for _ in range(MAX_CONNECTIONS)
    ]
    try:
        # Wait until the server has taken every idle connection.
        deadline = time.monotonic() + 5
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        while extra.recv(1) != b"" and time.monotonic() < deadline:
            pass
        assert server.httpd.rejected >= 1
    finally:
        for connection in idle:
            connection.close()
    # The slots come back when the idle connections close.
    deadline = time.monotonic() + 5
    while get(server.port, "/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert get(server.port, "/healthz") == (200, "ok\n")


def test_idle_connection_times_out(monkeypatch):
    monkeypatch.setattr(ops_http, "REQUEST_TIMEOUT_SECONDS", 0.2)
    metrics = Metrics()
    server = OpsHttpServer("127.0.0.1:0", metrics.registry, lambda: NOT_PROBED)
    server.start()
    try:
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        # The server closes the idle connection instead of waiting forever.
        assert connection.recv(1) == b""
        connection.close()
    finally:
        server.stop()


class BrokenClient:
    """A client whose PING fails with an error that is not a Redis error."""

    async def ping(self) -> None:
        raise TypeError("a bug in the client")


def test_probe_reports_unexpected_error(caplog):
    probe = ReadinessProbe(BrokenClient(), MARKER)

    result = asyncio.run(probe.probe())

    assert result == Readiness(False, "readiness probe failed: TypeError")
    assert "readiness probe failed" in caplog.text


def test_stop_without_start_returns():
    server = OpsHttpServer("127.0.0.1:0", Metrics().registry, lambda: NOT_PROBED)
    port = server.port

    server.stop()

    # The socket is closed, so the port can be bound again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
