"""Time hasp-authz's own Python per Check, in-process and without gRPC.

Usage: python -m hasp_authz.dev.bench.inprocess [--checks N]

It calls ``AuthorizationServicer.Check`` directly on one event loop with a
CheckRequest shaped like Envoy's, so the figure is the Python that hasp-authz
adds on top of grpc.aio, with no network, no serialization and no Redis. The
cases are a key in the in-process cache (with Envoy's two allowed headers and
with fifteen headers) and a malformed key. It prints wall-clock microseconds
per Check, the median of five batches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

from hasp_authz.authorizer import Authorizer
from hasp_authz.cache import CachedKeyCopy, RecordCache
from hasp_authz.metrics import Metrics
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.records import KeyRecord, OrgRecord
from hasp_authz.routes import load_route_table
from hasp_authz.servicer import AuthorizationServicer
from hasp_authz.tokens import generate_token, hash_token

BATCHES = 5
REQUEST_ID = "0f0e5a52-1b7c-4a8e-9d3c-2a1b3c4d5e6f"
# Headers that a browser or SDK typically sends beside the key.
EXTRA_HEADERS = [
    ("user-agent", "example-sdk/1.2.3 python/3.11"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate"),
    ("content-type", "application/json"),
    ("content-length", "2"),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-forwarded-proto", "https"),
    ("x-envoy-expected-rq-timeout-ms", "15000"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("cache-control", "no-cache"),
    ("accept-language", "en-US"),
    ("x-client-version", "1.2.3"),
    ("connection", "keep-alive"),
]


class _Context:
    """The one ServicerContext method that the servicer calls."""

    def time_remaining(self) -> float:
        return 0.5


def build_request(headers: list[tuple[str, str]]) -> auth_pb2.CheckRequest:
    """Build a CheckRequest as Envoy sends it with encode_raw_headers."""
    http = auth_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/ai/chat", host="api.example.test"
    )
    for name, value in [(":path", "/v1/ai/chat"), (":method", "POST"), *headers]:
        http.header_map.headers.add(key=name, raw_value=value.encode())
    request = auth_pb2.AttributeContext.Request(http=http)
    return auth_pb2.CheckRequest(attributes=auth_pb2.AttributeContext(request=request))


def build_servicer(token: str) -> AuthorizationServicer:
    """Return a servicer whose cache contains ``token``'s key, as after one Check."""
    cache = RecordCache(1000, 30.0, 1.0)
    cache.active = True
    key = KeyRecord("key_bench", "org_bench", ("ai:chat",))
    cache.put(hash_token(token), (key, OrgRecord("org_bench", True)), 0)
    metrics = Metrics()
    # Every lookup is a cache hit, so the copy behind the cache is never called.
    lookup = CachedKeyCopy(None, cache, metrics.observe_cache)  # type: ignore[arg-type]
    authorizer = Authorizer(lookup, load_route_table())
    return AuthorizationServicer(authorizer, budget_seconds=0.2, metrics=metrics)


async def time_checks(
    servicer: AuthorizationServicer, request: auth_pb2.CheckRequest, checks: int
) -> float:
    """Return the median microseconds per Check over BATCHES batches."""
    context = _Context()
    for _ in range(checks // 10):
        await servicer.Check(request, context)
    batches = []
    for _ in range(BATCHES):
        started = time.perf_counter()
        for _ in range(checks):
            await servicer.Check(request, context)
        batches.append((time.perf_counter() - started) / checks * 1e6)
    return statistics.median(batches)


async def run(checks: int) -> dict[str, float]:
    token = generate_token()
    servicer = build_servicer(token)
    key = [("authorization", f"Bearer {token}"), ("x-request-id", REQUEST_ID)]
    cases = {
        "cache hit, 2 headers": build_request(key),
        "cache hit, 15 headers": build_request(key + EXTRA_HEADERS),
        "malformed key, 2 headers": build_request(
            [("authorization", "Bearer nonsense"), ("x-request-id", REQUEST_ID)]
        ),
    }
    return {
        name: await time_checks(servicer, request, checks)
        for name, request in cases.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hasp_authz.dev.bench.inprocess")
    parser.add_argument("--checks", type=int, default=20_000, help="Checks per batch")
    options = parser.parse_args(argv)
    # Deny lines and their suppression warnings would go to stderr; drop them.
    logging.disable(logging.WARNING)
    for name, micros in asyncio.run(run(options.checks)).items():
        print(f"{name}: {micros:.1f} µs per Check")


if __name__ == "__main__":
    main()
