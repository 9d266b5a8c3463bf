"""docker-compose.yml and deploy/Dockerfile structure.

No Docker engine runs in the test environment, so these tests read the files
and do not build or start anything. Where compose and envoy.yaml must agree
(ports, the mounted config), the tests read both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hasp_authz.dev.envoy_config import load_envoy_config

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
DOCKERFILE_PATH = REPO_ROOT / "deploy" / "Dockerfile"
SHARED_NAMESPACE = "service:hasp-authz"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_PATH.read_text())["services"]


def _endpoint_port(config: dict[str, Any], cluster_name: str) -> int:
    cluster = next(
        cluster
        for cluster in config["static_resources"]["clusters"]
        if cluster["name"] == cluster_name
    )
    lb_endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    return lb_endpoint["endpoint"]["address"]["socket_address"]["port_value"]


def test_compose_has_all_services(services: dict[str, Any]) -> None:
    assert set(services) >= {"envoy", "hasp-authz", "redis", "upstream", "sync"}


def test_compose_images(services: dict[str, Any]) -> None:
    assert services["envoy"]["image"] == "envoyproxy/envoy:v1.40-latest"
    assert services["redis"]["image"] == "redis:7-alpine"
    for name in ["hasp-authz", "upstream", "sync"]:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile", name


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
        if listener["name"] == "ingress"
    )
    listen_port = listener["address"]["socket_address"]["port_value"]

    assert f"{listen_port}:{listen_port}" in services["hasp-authz"]["ports"]


def test_compose_upstream_matches_envoy_cluster(services: dict[str, Any]) -> None:
    upstream = services["upstream"]
    command = upstream["command"]
    upstream_port = _endpoint_port(load_envoy_config(), "upstream")

    assert upstream["entrypoint"] == ["python", "-m", "hasp_authz.dev.upstream"]
    assert command[command.index("--port") + 1] == str(upstream_port)
    assert command[command.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize("name", ["hasp-authz", "sync"])
def test_compose_environment_and_keystore(services: dict[str, Any], name: str) -> None:
    service = services[name]

    assert service["environment"]["HASP_REDIS_URL"] == "redis://redis:6379/0"
    assert service["environment"]["HASP_KEYSTORE_URL"] == "sqlite:////data/keystore.db"
    assert "keystore:/data" in service["volumes"]


def test_compose_declares_keystore_volume() -> None:
    assert "keystore" in yaml.safe_load(COMPOSE_PATH.read_text())["volumes"]


def test_compose_commands(services: dict[str, Any]) -> None:
    assert services["hasp-authz"]["command"] == ["serve"]
    assert services["sync"]["entrypoint"] == ["hasp-keys"]
    assert services["sync"]["command"] == ["sync"]


def _final_stage(dockerfile: str) -> list[str]:
    """Return the instructions after the last FROM, with continuation lines joined."""
    instructions: list[str] = []
    pending = ""
    for line in dockerfile.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            instructions.append(pending.strip())
            pending = ""
    last_from = max(
        index
        for index, instruction in enumerate(instructions)
        if instruction.upper().startswith("FROM ")
    )
    return instructions[last_from:]


def test_dockerfile_final_stage_runs_as_non_root() -> None:
    final_stage = _final_stage(DOCKERFILE_PATH.read_text())
    users = [
        line.split()[1] for line in final_stage if line.upper().startswith("USER ")
    ]

    assert final_stage[0].startswith("FROM python:3.11-slim")
    assert users, "final stage has no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_installs_package_with_entrypoint() -> None:
    final_stage = _final_stage(DOCKERFILE_PATH.read_text())

    assert any("pip install" in line and "hasp-authz" in line for line in final_stage)
    assert 'ENTRYPOINT ["hasp-authz"]' in final_stage
