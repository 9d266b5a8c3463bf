"""The ``hasp-authz`` command.

``serve`` runs the ext_authz gRPC server. ``check-config`` validates the
settings and the route file as ``serve`` would, prints the effective settings
(passwords redacted) and the compiled route table, and exits 0, or 2 on any
error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from hasp_authz import __version__
from hasp_authz.config import ENVIRONMENT, ConfigError, Settings, load_settings
from hasp_authz.logs import configuration_fields, configure_logging
from hasp_authz.routes import RouteFileError, RouteTable, load_route_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hasp-authz",
        description="Envoy ext_authz server that authorizes requests by API key.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC ext_authz server")
    check = commands.add_parser(
        "check-config",
        help="validate the settings and the route file, print them and exit",
    )
    for command in (serve, check):
        _add_settings(command)
    return parser


def _add_settings(serve: argparse.ArgumentParser) -> None:
    _add(serve, "--config", "config_file", "YAML file of settings, below env and flags")
    _add(serve, "--listen", "listen", "HOST:PORT for the gRPC server")
    _add(serve, "--redis-url", "redis_url", "URL of the Redis copy of the key store")
    _add(serve, "--redis-prefix", "redis_prefix", "prefix of every Redis key")
    _add(serve, "--routes-file", "routes_file", "YAML route table to load")
    _add(serve, "--check-budget-ms", "check_budget_ms", "time limit of one Check, ms")
    _add(serve, "--redis-timeout-ms", "redis_timeout_ms", "Redis socket timeout, ms")
    _add(
        serve,
        "--redis-max-connections",
        "redis_max_connections",
        "size of the Redis connection pool",
    )
    _add(serve, "--log-level", "log_level", "DEBUG, INFO, WARNING or ERROR")

    _add(
        serve,
        "--cache-size",
        "cache_size",
        "max entries in each in-process cache; 0 turns the cache off",
    )
    _add(
        serve,
        "--cache-ttl-seconds",
        "cache_ttl_seconds",
        "lifetime of cached key and org records, seconds",
    )
    _add(
        serve,
        "--negative-cache-ttl-seconds",
        "negative_cache_ttl_seconds",
        "lifetime of cached unknown-key results, seconds; 0 turns them off",
    )
    _add(
        serve,
        "--last-used-flush-seconds",
        "last_used_flush_seconds",
        "interval between writes of key last-used times to Redis, seconds",
    )
    _add(
        serve,
        "--max-concurrent-checks",
        "max_concurrent_checks",
        "Checks running at once; more get the 503 deny at once",
    )
    _add(
        serve,
        "--shutdown-grace-seconds",
        "shutdown_grace_seconds",
        "time that in-flight Checks get to finish after SIGTERM, seconds",
    )
    _add(
        serve,
        "--stale-if-error-seconds",
        "stale_if_error_seconds",
        "while Redis fails, allow keys verified this recently, seconds; 0 is off",
    )
    _add(
        serve,
        "--metrics-listen",
        "metrics_listen",
        'HOST:PORT for /metrics, /healthz and /readyz, or "off"',
    )
    _add(serve, "--log-format", "log_format", "json or text")


def _add(parser: argparse.ArgumentParser, flag: str, name: str, text: str) -> None:
    parser.add_argument(flag, dest=name, help=f"{text} (env {ENVIRONMENT[name]})")


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    overrides = {name: getattr(arguments, name, None) for name in ENVIRONMENT}
    try:
        settings = load_settings(overrides)
        routes = load_route_table(settings.routes_file)
    except (ConfigError, RouteFileError) as error:
        print(f"hasp-authz: error: {error}", file=sys.stderr)
        return 2
    if arguments.command == "check-config":
        print_configuration(settings, routes)
        return 0
    configure_logging(settings.log_level, settings.log_format)
    from hasp_authz.server import serve

    try:
        asyncio.run(serve(settings))
    except OSError as error:
        print(f"hasp-authz: error: {error}", file=sys.stderr)
        return 1
    return 0


def print_configuration(settings: Settings, routes: RouteTable) -> None:
    """Print the effective settings and the compiled route table to stdout."""
    print("settings:")
    for name, value in configuration_fields(settings).items():
        print(f"  {ENVIRONMENT[name]}={'' if value is None else value}")
    print(f"routes ({len(routes.routes)}, from {settings.routes_file}):")
    width = max((len(route.template) for route in routes.routes), default=0)
    for route in routes.routes:
        print(f"  {route.template:<{width}}  {route.allow_header:<16}  {route.scope}")
    print("configuration OK")


if __name__ == "__main__":
    sys.exit(main())
