"""Direct gRPC load: send N Checks to an ext_authz server, without Envoy.

It runs as its own process, so the server's CPU time can be read apart from
the load's. The harness starts it and waits for the line ``ready`` on stdout
(channel up, warm-up Checks done). It then reads the server's CPU time and
writes ``go`` to stdin. This process sends the Checks with bounded concurrency
and prints one JSON line of results.

The requests are serialized once, before the timed part, from a CheckRequest
template (Envoy's own, captured by allow_all.py) with the Authorization value
replaced. Responses come back as bytes and are parsed after the timed part,
so the load spends little CPU per Check.

Usage: python -m hasp_authz.dev.bench.grpc_load --target ADDR --input FILE
--count N --concurrency C [--warmup N] [--max-seconds S] [--uvloop]. FILE is JSON:
``{"template": base64, "authorization": [values, cycled in order]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import math
import sys
import time

import grpc

from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# Seconds after which a Check counts as failed.
CHECK_TIMEOUT_SECONDS = 5.0


def build_requests(template: bytes, authorization_values: list[str]) -> list[bytes]:
    """Serialize one CheckRequest per Authorization value, from the template."""
    request = auth_pb2.CheckRequest.FromString(template)
    headers = request.attributes.request.http.header_map.headers
    entry = next((h for h in headers if h.key == "authorization"), None)
    if entry is None:
        entry = headers.add(key="authorization")
    result = []
    for value in authorization_values:
        entry.value = ""
        entry.raw_value = value.encode("latin-1")
        result.append(request.SerializeToString())
    return result


def summarize(responses: list[bytes]) -> dict[str, int]:
    """Count responses by outcome: ``allow`` or ``deny <HTTP status>``."""
    counts: collections.Counter[str] = collections.Counter()
    for raw in responses:
        response = auth_pb2.CheckResponse.FromString(raw)
        if response.status.code == 0:
            counts["allow"] += 1
        else:
            counts[f"deny {response.denied_response.status.code}"] += 1
    return dict(counts)


async def run(options: argparse.Namespace) -> dict:
    with open(options.input) as file:
        spec = json.load(file)
    requests = build_requests(base64.b64decode(spec["template"]), spec["authorization"])
    async with grpc.aio.insecure_channel(options.target) as channel:
        check = channel.unary_unary(CHECK_METHOD)
        await _send(check, requests, 0, options.warmup, options.concurrency, math.inf)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.perf_counter()
        # The timed Checks go on where the warm-up stopped, so a list of
        # distinct keys is not repeated within one run.
        responses, latencies, failures = await _send(
            check,
            requests,
            options.warmup,
            options.count,
            options.concurrency,
            started + options.max_seconds,
        )
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "count": len(latencies) + failures,
        "seconds": seconds,
        "failures": failures,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "outcomes": summarize(responses),
    }


async def _send(
    check,
    requests: list[bytes],
    first: int,
    count: int,
    concurrency: int,
    deadline: float,
):
    """Send ``count`` Checks from ``concurrency`` tasks and return the replies.

    Sending starts at request number ``first`` and stops early at ``deadline``
    (a time.perf_counter value).
    """
    responses: list[bytes] = []
    latencies: list[float] = []
    failures = 0
    next_index = first
    end = first + count

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < end and time.perf_counter() < deadline:
            request = requests[next_index % len(requests)]
            next_index += 1
            sent = time.perf_counter()
            try:
                response = await check(request, timeout=CHECK_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - sent)
            responses.append(response)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return responses, latencies, failures


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hasp_authz.dev.bench.grpc_load")
    parser.add_argument("--target", required=True, help="HOST:PORT or unix:PATH")
    parser.add_argument("--input", required=True, help="JSON file of requests")
    parser.add_argument("--count", type=int, required=True, help="timed Checks")
    parser.add_argument("--concurrency", type=int, default=32, help="Checks in flight")
    parser.add_argument("--warmup", type=int, default=500, help="untimed Checks first")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="stop the timed part after this many seconds",
    )
    parser.add_argument("--uvloop", action="store_true", help="run the load on uvloop")
    options = parser.parse_args(argv)
    if options.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(json.dumps(asyncio.run(run(options))), flush=True)


if __name__ == "__main__":
    main()
