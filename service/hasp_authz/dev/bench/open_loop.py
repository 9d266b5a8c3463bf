"""Open-loop HTTP/1.1 load: requests start on a fixed schedule, whatever the replies.

Request ``i`` is due at ``start + i / rate``. When it is due, the generator
takes an idle keep-alive connection, or opens a new one when none is idle (up
to ``--max-connections``), or else waits for one. A slow server therefore
delays only the requests that wait, never the schedule. Closed-loop tools (wrk) send
the next request on a connection only after the reply, so a slow server receives
fewer requests and its worst latencies go unmeasured.

Latency runs from the moment the generator dispatched a request to its
complete response, so the wait for a connection and the connect time count.
asyncio timers fire up to about 1 ms late, so requests leave in small bursts.
That dispatch lag is reported apart (``lag_p99_ms``), and a run whose lag p99
exceeds a few milliseconds measured the generator, not the server.

Usage: python -m hasp_authz.dev.bench.open_loop --port PORT --input FILE
--rate R --seconds S [--warmup-seconds W] [--uvloop]. FILE is JSON:
``{"authorization": [values, cycled in order]}``. The target is always
127.0.0.1. Prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

from hasp_authz.dev.bench.http_request import raw_request

HOST = "127.0.0.1"
# A request without a complete response after this many seconds counts as failed.
REQUEST_TIMEOUT_SECONDS = 2.0


class ResponseError(Exception):
    pass


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection that carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.usable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[int]:
        """Write ``request``; the future gets the response's status code."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        try:
            status, length = _parse_head(head)
        except ResponseError as error:
            self._fail(error)
            return
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        if b"\r\nconnection: close" in head:
            self.usable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection closed: {exc}"))

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: Exception) -> None:
        self.usable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)


def _parse_head(head: bytes) -> tuple[int, int]:
    if not head.startswith(b"http/1.1 "):
        raise ResponseError(f"not an HTTP/1.1 response: {head[:40]!r}")
    status = int(head[9:12])
    marker = head.find(b"\r\ncontent-length:")
    if marker < 0:
        raise ResponseError("response without Content-Length is not supported")
    line_end = head.find(b"\r\n", marker + 2)
    value = head[marker + 17 : line_end if line_end >= 0 else None]
    return status, int(value.strip())


class OpenLoopLoad:
    """Sends requests on a fixed schedule over a bounded pool of connections."""

    def __init__(self, port: int, requests: list[bytes], max_connections: int):
        self.port = port
        self.requests = requests
        self.max_connections = max_connections
        self.idle: asyncio.Queue[HttpConnection | None] = asyncio.Queue()
        self.open_connections = 0
        self.peak_connections = 0
        # Runs go on through the list where the previous run stopped, so a list
        # of distinct keys is not repeated between the warm-up and the timed run.
        self.next_request = 0

    async def run(self, rate: float, seconds: float) -> dict:
        loop = asyncio.get_running_loop()
        # NOTE: time.perf_counter, not loop.time(): uvloop's clock has 1 ms steps.
        latencies: list[float] = []
        lags: list[float] = []
        statuses: collections.Counter[str] = collections.Counter()
        total = int(rate * seconds)
        tasks = set()

        start = time.perf_counter() + 0.01
        for index in range(total):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = self.requests[self.next_request % len(self.requests)]
            self.next_request += 1
            task = loop.create_task(self._one(request, due, latencies, lags, statuses))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_SECONDS + 1)

        latencies.sort()
        lags.sort()
        return {
            "rate": rate,
            "sent": total,
            "completed": len(latencies),
            "statuses": dict(statuses),
            "p50_ms": _percentile(latencies, 0.50) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
            "lag_p99_ms": _percentile(lags, 0.99) * 1000,
            "peak_connections": self.peak_connections,
        }

    async def _one(self, request, due, latencies, lags, statuses) -> None:
        dispatched = time.perf_counter()
        lags.append(dispatched - due)
        connection = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                connection = await self._acquire()
                status = await connection.send(request)
        except (TimeoutError, OSError, ResponseError) as error:
            statuses[type(error).__name__] += 1
            if connection is not None:
                connection.close()
                self._release(connection)
            return
        latencies.append(time.perf_counter() - dispatched)
        statuses[str(status)] += 1
        self._release(connection)

    async def _acquire(self) -> HttpConnection:
        while True:
            if not self.idle.empty():
                connection = self.idle.get_nowait()
            elif self.open_connections < self.max_connections:
                return await self._connect()
            else:
                connection = await self.idle.get()
            if connection is not None and connection.usable:
                return connection

    async def _connect(self) -> HttpConnection:
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                HttpConnection, HOST, self.port
            )
        except OSError:
            self.open_connections -= 1
            self.idle.put_nowait(None)
            raise
        return connection

    def _release(self, connection: HttpConnection) -> None:
        if connection.usable:
            self.idle.put_nowait(connection)
            return
        # A None wakes a request that waits for a connection, so it opens one.
        self.open_connections -= 1
        self.idle.put_nowait(None)

    def close(self) -> None:
        while not self.idle.empty():
            connection = self.idle.get_nowait()
            if connection is not None:
                connection.close()


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def main_async(options: argparse.Namespace) -> dict:
    with open(options.input) as file:
        values = json.load(file)["authorization"]
    host = f"{HOST}:{options.port}"
    requests = [raw_request(host, value) for value in values]
    load = OpenLoopLoad(options.port, requests, options.max_connections)
    try:
        if options.warmup_seconds > 0:
            await load.run(options.rate, options.warmup_seconds)
        return await load.run(options.rate, options.seconds)
    finally:
        load.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hasp_authz.dev.bench.open_loop")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--input", required=True, help="JSON file of requests")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True, help="timed duration")
    parser.add_argument("--warmup-seconds", type=float, default=1.0)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    options = parser.parse_args(argv)
    if options.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    started = time.monotonic()
    result = asyncio.run(main_async(options))
    result["wall_seconds"] = time.monotonic() - started
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
