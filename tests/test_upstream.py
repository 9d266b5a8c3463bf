"""The demo upstream: echoes method, path and headers for any request."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hasp_authz.dev.redis_server import free_port
from hasp_authz.dev.upstream import EchoServer, serve_in_thread


@pytest.fixture
def upstream() -> Iterator[EchoServer]:
    server = serve_in_thread("127.0.0.1", 0)
    yield server
    server.stop()


@pytest.fixture
def connection(upstream: EchoServer) -> Iterator[http.client.HTTPConnection]:
    client = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
    yield client
    client.close()


def request(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> tuple[http.client.HTTPResponse, Any]:
    """Send a request, keeping repeated headers in order, and parse the JSON reply."""
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers or []:
        connection.putheader(name, value)
    if body is not None:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    raw = response.read()
    return response, json.loads(raw) if raw else None


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "PURGE"])
def test_upstream_echoes_any_method(
    connection: http.client.HTTPConnection, method: str
) -> None:
    response, echoed = request(connection, method, "/v1/ai/chat")

    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert echoed["method"] == method
    assert echoed["path"] == "/v1/ai/chat"


def test_upstream_echoes_path_with_query(
    connection: http.client.HTTPConnection,
) -> None:
    _, echoed = request(connection, "GET", "/v1/usage?month=2026-01&x=%2F")

    assert echoed["path"] == "/v1/usage?month=2026-01&x=%2F"


def test_upstream_echoes_repeated_headers_as_lists(
    connection: http.client.HTTPConnection,
) -> None:
    _, echoed = request(
        connection,
        "GET",
        "/",
        [("X-Hasp-Org-Id", "org_a"), ("x-trace", "1"), ("X-TRACE", "2")],
    )

    headers = echoed["headers"]
    assert headers["x-hasp-org-id"] == ["org_a"]
    assert headers["x-trace"] == ["1", "2"]
    assert headers["host"] == [f"127.0.0.1:{connection.port}"]


def test_upstream_discards_body_and_keeps_connection(
    connection: http.client.HTTPConnection, upstream: EchoServer
) -> None:
    first, first_echo = request(connection, "POST", "/upload", body=b"x" * 100_000)
    second, second_echo = request(connection, "GET", "/after")

    assert first.status == 200
    assert first_echo["headers"]["content-length"] == ["100000"]
    assert second.status == 200
    assert second_echo["path"] == "/after"
    assert upstream.request_count == 2


def test_upstream_discards_chunked_body(
    connection: http.client.HTTPConnection,
) -> None:
    connection.request(
        "POST", "/chunked", body=iter([b"abc", b"defgh"]), encode_chunked=True
    )
    first = connection.getresponse()
    first.read()
    _, after = request(connection, "GET", "/after-chunked")

    assert first.status == 200
    assert after["path"] == "/after-chunked"


def test_upstream_head_has_no_body(connection: http.client.HTTPConnection) -> None:
    response, echoed = request(connection, "HEAD", "/v1/usage")

    assert response.status == 200
    assert echoed is None
    assert int(response.headers["content-length"]) > 0


def test_upstream_rejects_invalid_content_length(
    connection: http.client.HTTPConnection, upstream: EchoServer
) -> None:
    connection.putrequest("POST", "/bad")
    connection.putheader("Content-Length", "-1")
    connection.endheaders()
    response = connection.getresponse()
    response.read()

    assert response.status == 400
    assert upstream.request_count == 0


def test_upstream_records_recent_requests(
    connection: http.client.HTTPConnection, upstream: EchoServer
) -> None:
    request(connection, "DELETE", "/v1/webhooks/wh_1")

    assert upstream.request_count == 1
    assert upstream.recent_requests[-1]["method"] == "DELETE"
    assert upstream.recent_requests[-1]["path"] == "/v1/webhooks/wh_1"


def test_upstream_module_runs_and_stops_on_sigterm() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hasp_authz.dev.upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                response, echoed = request(client, "GET", "/ping")
                client.close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "upstream did not listen"
                time.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=5)
        stderr = process.stderr.read().decode() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert response.status == 200
    assert echoed["path"] == "/ping"
    assert returncode == 0
    # The request is logged on one line.
    assert stderr.count("/ping") == 1
