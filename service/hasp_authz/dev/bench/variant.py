"""Run ``hasp-authz serve`` with one of the changes that the benchmark evaluates.

Usage: python -m hasp_authz.dev.bench.variant [--uvloop] [--unix-socket PATH]
[--two-round-trips]. Every other setting comes from the HASP_* environment,
as for ``hasp-authz serve``.

- ``--uvloop`` installs uvloop's event loop policy, then calls
  hasp_authz.cli.authz.main, so the server runs unchanged on uvloop.
- ``--unix-socket PATH`` listens on ``unix:PATH``. grpc.aio accepts that
  address, but HASP_LISTEN accepts only HOST:PORT, so this replaces the
  validated setting after load_settings.
- ``--two-round-trips`` reads a missed key with two Redis round trips (a
  pipeline, then the org), the lookup that Redis Cluster needs, instead of
  the default single script call.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import sys

from hasp_authz.cli import authz
from hasp_authz.config import ConfigError, load_settings
from hasp_authz.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hasp_authz.dev.bench.variant")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--unix-socket", metavar="PATH")
    parser.add_argument("--two-round-trips", action="store_true")
    options = parser.parse_args(argv)

    if options.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if options.two_round_trips:
        from hasp_authz import server

        # build_key_lookup looks RedisKeyCopy up in server's globals at call time.
        server.RedisKeyCopy = functools.partial(
            server.RedisKeyCopy, single_round_trip=False
        )
    if options.unix_socket is None:
        return authz.main(["serve"])
    return _serve_on_unix_socket(options.unix_socket)


def _serve_on_unix_socket(path: str) -> int:
    from hasp_authz.server import serve

    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"hasp-authz: error: {error}", file=sys.stderr)
        return 2
    settings = dataclasses.replace(settings, listen=f"unix:{path}")
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
