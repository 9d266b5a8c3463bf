#!/usr/bin/env python3
"""Probe hasp-authz through the standard gRPC health service (grpc.health.v1).

The image installs this file as ``hasp-healthcheck``. The Dockerfile's HEALTHCHECK
runs it, and so do the Kubernetes exec probes: the kubelet's HTTP, TCP and gRPC
probes connect to the pod IP, and the server listens on 127.0.0.1.

Usage: hasp-healthcheck [HOST:PORT]

The address defaults to HASP_LISTEN, else 127.0.0.1:9001, the server's default.
A wildcard host (0.0.0.0 or [::]) is probed on loopback. Exits 0 when the
Authorization service reports SERVING; otherwise prints the reason to stderr
and exits 1.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:9001"
# hasp-authz sets the same status for this service and for "" (the whole server).
SERVICE = "envoy.service.auth.v3.Authorization"
TIMEOUT_SECONDS = 2.0
LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


def probe_address(listen: str) -> str:
    """Return the address to probe for a HASP_LISTEN value such as 0.0.0.0:9001."""
    host, _, port = listen.rpartition(":")
    return f"{LOOPBACK.get(host, host)}:{port}"


def main(argv: list[str]) -> int:
    listen = argv[1] if len(argv) > 1 else os.environ.get("HASP_LISTEN")
    address = probe_address(listen or DEFAULT_ADDRESS)
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(request, timeout=TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        print(
            f"hasp-healthcheck: health check of {address} failed: "
            f"{error.code().name} {error.details()}",
            file=sys.stderr,
        )
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"hasp-healthcheck: {SERVICE} at {address} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
