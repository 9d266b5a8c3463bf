"""Envoy configs for the benchmark, rendered from envoy.yaml, and their processes.

The front Envoy is envoy.yaml as ``render_envoy_config`` renders it, with these
changes where a case needs them: the ext_authz filter removed (the proxy's
ceiling), several endpoints or a Unix socket in the ``hasp_authz`` cluster,
and no ``allowed_headers`` (Envoy then sends every request header).

The upstream is a second Envoy that responds to every request itself with 200
(``direct_response``). The demo upstream (a Python ThreadingHTTPServer) would
cap every case at its own rate and take CPU from the sidecar on a small
machine, so the cases would differ less than the sidecars do.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from hasp_authz.dev.envoy_config import (
    AUTHZ_CLUSTER,
    LISTENER_NAME,
    EnvoyProcess,
    find_envoy,
    render_envoy_config,
)

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
UPSTREAM_BODY = '{"ok":true}'


def front_config(
    *,
    listen_port: int,
    admin_port: int,
    upstream_port: int,
    authz_addresses: list[str] | None,
    all_headers: bool = False,
) -> str:
    """Render envoy.yaml for one case.

    ``authz_addresses`` lists ``HOST:PORT`` or ``unix:PATH`` endpoints of the
    ``hasp_authz`` cluster; None removes the ext_authz filter.
    """
    text = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        upstream_port=upstream_port,
        # Replaced below; render_envoy_config needs some port.
        authz_port=1,
    )
    config = yaml.safe_load(text)
    filters = _http_connection_manager(config)["http_filters"]
    authz_filter = next(f for f in filters if f["name"] == EXT_AUTHZ_FILTER)
    if authz_addresses is None:
        filters.remove(authz_filter)
        return yaml.safe_dump(config, sort_keys=False)
    if all_headers:
        del authz_filter["typed_config"]["allowed_headers"]
    cluster = next(
        c for c in config["static_resources"]["clusters"] if c["name"] == AUTHZ_CLUSTER
    )
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [_endpoint(address) for address in authz_addresses]}
    ]
    return yaml.safe_dump(config, sort_keys=False)


def upstream_config(*, listen_port: int, admin_port: int) -> str:
    """Return an Envoy config that responds to every request with 200 and a body."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
    }
    manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench_upstream",
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]
            },
            # NOTE: without the buffer filter Envoy sends the direct response
            # to a POST before it has read the body, then closes the HTTP/1.1
            # connection, so the front Envoy opened one connection per request
            # (seen with Envoy 1.40).
            "http_filters": [
                {
                    "name": "envoy.filters.http.buffer",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                        "buffer.v3.Buffer",
                        "max_request_bytes": 65536,
                    },
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                        "router.v3.Router"
                    },
                },
            ],
        },
    }
    config = {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench_upstream",
                    "address": _socket_address("127.0.0.1", listen_port),
                    "filter_chains": [{"filters": [manager]}],
                }
            ]
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def start_envoy(
    config_text: str, workdir: Path, name: str, *, concurrency: int
) -> EnvoyProcess:
    """Start Envoy on ``config_text`` and wait until its admin reports ready.

    The access log goes to /dev/null: Envoy still formats every line, as in
    production, but a run does not fill the disk.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(config_text)
    stderr_path = workdir / f"{name}.stderr"
    stderr_file = stderr_path.open("wb")
    command = [
        find_envoy(),
        "--config-path", str(config_path),
        "--use-dynamic-base-id",
        "--concurrency", str(concurrency),
        "--log-level", "warn",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr_file,
    )
    envoy = EnvoyProcess(
        process,
        admin_port=yaml.safe_load(config_text)["admin"]["address"]["socket_address"][
            "port_value"
        ],
        config_path=config_path,
        stdout_path=Path("/dev/null"),
        stderr_path=stderr_path,
        log_files=[stderr_file],
    )
    try:
        envoy.wait_until_ready()
    except BaseException:
        envoy.stop()
        raise
    return envoy


def _http_connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listeners = config["static_resources"]["listeners"]
    listener = next(item for item in listeners if item["name"] == LISTENER_NAME)
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _endpoint(address: str) -> dict[str, Any]:
    if address.startswith("unix:"):
        return {"endpoint": {"address": {"pipe": {"path": address[len("unix:") :]}}}}
    host, _, port = address.rpartition(":")
    return {"endpoint": {"address": _socket_address(host, int(port))}}


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}
