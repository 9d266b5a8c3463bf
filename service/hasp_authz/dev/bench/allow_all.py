"""An ext_authz server that allows every request: the floor of the Python gRPC stack.

It runs on the same stack as hasp-authz (grpc.aio and the generated stubs in
hasp_authz.proto) and returns one prebuilt OK response to every Check. What it
costs per Check is therefore the cost of grpc.aio itself: HTTP/2 framing, the
request's parsing and the response's serialization.

Usage: python -m hasp_authz.dev.bench.allow_all --listen 127.0.0.1:PORT
[--capture FILE] [--uvloop]. ``--listen`` also takes ``unix:PATH``.
``--capture`` writes the first CheckRequest that arrives, serialized, to FILE,
so the direct gRPC load can send exactly what Envoy sends. Never run this
in front of a real upstream: it authorizes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc

from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.proto import google_rpc_status_pb2 as status_pb2

_ALLOW = auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=auth_pb2.OkHttpResponse()
)


class AllowAllServicer(auth_grpc.AuthorizationServicer):
    def __init__(self, capture_path: Path | None = None):
        self.capture_path = capture_path

    async def Check(  # noqa: N802 - the RPC name is fixed by Envoy's proto
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckResponse:
        if self.capture_path is not None:
            self.capture_path.write_bytes(request.SerializeToString())
            self.capture_path = None
        return _ALLOW


async def serve(listen: str, capture_path: Path | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    auth_grpc.add_AuthorizationServicer_to_server(
        AllowAllServicer(capture_path), server
    )
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hasp_authz.dev.bench.allow_all",
        description="ext_authz server that allows every request (benchmark floor).",
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT or unix:PATH")
    parser.add_argument(
        "--capture", type=Path, help="write the first CheckRequest, serialized, here"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop"
    )
    options = parser.parse_args(argv)
    if options.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(options.listen, options.capture))


if __name__ == "__main__":
    main()
