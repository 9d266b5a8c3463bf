"""The local stack behind ``make run``, also used by the end-to-end tests.

It starts Redis (unless a URL is given), writes the key store's contents into
Redis with ``hasp-keys sync``, then starts hasp-authz, the demo upstream and
Envoy, and stops them all in reverse order. hasp-authz, the watcher, the
upstream and Envoy each write stdout and stderr to ``{workdir}/{name}.log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hasp_authz.dev.envoy_config import find_envoy, render_envoy_config
from hasp_authz.dev.processes import ManagedProcess, ProcessFailed
from hasp_authz.dev.redis_server import RedisServer, free_port
from hasp_authz.records import DEFAULT_PREFIX
from hasp_authz.routes import DEFAULT_ROUTES_FILE

REPO_ROOT = Path(__file__).resolve().parents[3]
BIN_DIR = Path(sys.executable).parent
DEFAULT_KEYSTORE_URL = "sqlite:///.run/keystore.db"


@dataclass(frozen=True)
class StackPorts:
    """Ports on 127.0.0.1. The defaults are the ones envoy.yaml names."""

    envoy: int = 8080
    envoy_admin: int = 9901
    authz: int = 9001
    upstream: int = 8000
    # hasp-authz's HTTP server for /metrics, /healthz and /readyz.
    metrics: int = 9002

    @classmethod
    def free(cls) -> StackPorts:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


@dataclass
class LocalStack:
    workdir: Path
    keystore_url: str
    ports: StackPorts = field(default_factory=StackPorts)
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_PREFIX
    log_level: str = "INFO"
    # Run `hasp-keys sync --watch` beside the server, with these extra arguments.
    watch: bool = True
    watch_arguments: tuple[str, ...] = ()
    # Extra environment for hasp-authz, for example shorter cache lifetimes.
    authz_env: dict[str, str] = field(default_factory=dict)
    # Envoy routes placed before the catch-all route (see render_envoy_config).
    envoy_extra_routes: Sequence[dict[str, Any]] = ()
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _redis: RedisServer | None = None

    @property
    def metrics_url(self) -> str:
        """Base URL of hasp-authz's /metrics, /healthz and /readyz."""
        return f"http://127.0.0.1:{self.ports.metrics}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for hasp-keys and hasp-authz that points at this stack."""
        assert self.redis_url is not None, "start() sets the Redis URL"
        return {
            "HASP_REDIS_URL": self.redis_url,
            "HASP_REDIS_PREFIX": self.redis_prefix,
            "HASP_KEYSTORE_URL": self.keystore_url,
        }

    def start(self) -> LocalStack:
        """Start every piece and wait until each listens. Stops all on failure."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.redis_url is None:
                self._redis = RedisServer(workdir=self.workdir).start()
                self.redis_url = self._redis.url
            self.hasp_keys("sync")
            if self.watch:
                self._start_watcher()
            self.start_authz()
            self._start_upstream()
            self._start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def start_authz(self) -> None:
        """Start hasp-authz, or start it again after stop_authz()."""
        authz = self._spawn(
            "hasp-authz",
            [str(BIN_DIR / "hasp-authz"), "serve"],
            env={
                **self.env,
                "HASP_LISTEN": f"127.0.0.1:{self.ports.authz}",
                "HASP_METRICS_LISTEN": f"127.0.0.1:{self.ports.metrics}",
                "HASP_LOG_LEVEL": self.log_level,
                **self.authz_env,
            },
        )
        authz.wait_for_port(self.ports.authz)

    def _start_watcher(self) -> None:
        command = [str(BIN_DIR / "hasp-keys"), "sync", "--watch", *self.watch_arguments]
        self._spawn("sync-watch", command, env=self.env)

    def restart_redis(self) -> None:
        """Restart the stack's own redis-server on the same port, empty."""
        self.stop_redis()
        self.start_redis()

    def stop_redis(self) -> None:
        """Stop the stack's own redis-server. start_redis() runs it again, empty."""
        assert self._redis is not None, "only a Redis that the stack started"
        self._redis.stop()

    def start_redis(self) -> None:
        """Start the stack's own redis-server again on its port, empty.

        ``hasp-keys sync --watch``, when the stack runs it, reloads the copy.
        """
        assert self._redis is not None, "only a Redis that the stack started"
        self._redis.start()

    def stop_authz(self) -> int | None:
        """Stop hasp-authz alone, leaving Envoy without its sidecar."""
        process = self.processes.pop("hasp-authz", None)
        return process.stop() if process else None

    def signal_authz(self, signum: int) -> None:
        """Send a signal to hasp-authz: SIGHUP, or SIGSTOP, SIGCONT, SIGKILL."""
        self.processes["hasp-authz"].send_signal(signum)

    def envoy_access_log(self) -> list[dict[str, Any]]:
        """Parse the JSON access log lines that Envoy wrote to envoy.log so far."""
        return _json_lines(self.workdir / "envoy.log")

    def authz_log_lines(self) -> list[str]:
        """Return every line that hasp-authz wrote to stdout or stderr so far.

        The log file is appended to, so lines of earlier runs (before a
        stop_authz() and start_authz()) come first.
        """
        log_path = self.workdir / "hasp-authz.log"
        try:
            return log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def authz_log_entries(self) -> list[dict[str, Any]]:
        """Parse hasp-authz's JSON log lines (HASP_LOG_FORMAT=json, the default).

        Lines that are not a JSON object, such as a traceback printed before
        logging was set up, are skipped.
        """
        return _json_lines(self.workdir / "hasp-authz.log")

    def _start_upstream(self) -> None:
        command = [
            sys.executable,
            "-m",
            "hasp_authz.dev.upstream",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports.upstream),
        ]
        self._spawn("upstream", command).wait_for_port(self.ports.upstream)

    def _start_envoy(self) -> None:
        config_path = self.workdir / "envoy.yaml"
        config_path.write_text(
            render_envoy_config(
                listen_port=self.ports.envoy,
                admin_port=self.ports.envoy_admin,
                authz_port=self.ports.authz,
                upstream_port=self.ports.upstream,
                extra_routes=self.envoy_extra_routes,
            )
        )
        command = [
            find_envoy(),
            "-c",
            str(config_path),
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
            # The access log goes to envoy.log within 1 s of each request,
            # instead of after Envoy's default of 10 s.
            "--file-flush-interval-msec",
            "1000",
        ]
        self._spawn("envoy", command).wait_for_port(self.ports.envoy, timeout=30)

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        process = ManagedProcess(name, command, self.workdir / f"{name}.log", env)
        self.processes[name] = process.start()
        return process

    def hasp_keys(self, *arguments: str) -> str:
        """Run ``hasp-keys`` against this stack and return its stdout."""
        result = subprocess.run(
            [str(BIN_DIR / "hasp-keys"), *arguments],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise ProcessFailed(
                f"hasp-keys {' '.join(arguments)} failed with exit code "
                f"{result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout

    def exited_process(self) -> ManagedProcess | None:
        """Return a child that is no longer running, if any."""
        for process in self.processes.values():
            if not process.running:
                return process
        return None

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes.pop(name).stop()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Parse the lines of ``path`` that contain a JSON object, skipping the others."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


DEMO_ORGS = (
    ("demo-baa", "Demo org with a BAA", True),
    ("demo-no-baa", "Demo org without a BAA", False),
)
DEMO_KEYS = (
    ("demo-baa", "demo-chat", ("ai:chat",)),
    ("demo-baa", "demo-all-scopes", ("ai:chat", "ai:documents", "ai:embeddings",
                                     "ai:summarize", "control:read",
                                     "control:webhooks")),
    ("demo-no-baa", "demo-no-baa", ("ai:chat",)),
)  # fmt: skip


def seed_demo_data(stack: LocalStack) -> list[tuple[str, str, str]]:
    """Create the demo orgs and fresh demo keys, and return (name, org, token) rows.

    Earlier demo keys are revoked, because their tokens were shown only once.
    """
    for org_id, name, baa in DEMO_ORGS:
        existing = {org["org_id"] for org in _list_json(stack, "orgs", "list")}
        if org_id not in existing:
            stack.hasp_keys("orgs", "create", org_id, "--name", name)
        stack.hasp_keys("orgs", "baa", org_id, "on" if baa else "off")
    for org_id in {org_id for org_id, _, _ in DEMO_KEYS}:
        for key in _list_json(stack, "list", "--org", org_id):
            if key["name"].startswith("demo-") and not key.get("revoked_at"):
                stack.hasp_keys("revoke", key["key_id"])
    rows = []
    for org_id, name, scopes in DEMO_KEYS:
        arguments = ["create", "--org", org_id, "--name", name]
        for scope in scopes:
            arguments += ["--scope", scope]
        rows.append((name, org_id, stack.hasp_keys(*arguments).strip()))
    return rows


def _list_json(stack: LocalStack, *arguments: str) -> list[dict]:
    return json.loads(stack.hasp_keys(*arguments, "--json"))


def print_banner(stack: LocalStack, keys: list[tuple[str, str, str]]) -> None:
    base = f"http://127.0.0.1:{stack.ports.envoy}"
    print(f"\nhasp-authz local stack is up (logs in {stack.workdir}/)")
    print(f"  Envoy          {base}")
    print(f"  hasp-authz     127.0.0.1:{stack.ports.authz} (gRPC)")
    print(f"  metrics        {stack.metrics_url}/metrics  (also /healthz, /readyz)")
    print(f"  demo upstream  http://127.0.0.1:{stack.ports.upstream}")
    print(f"  Redis          {stack.redis_url}")
    print(f"  key store      {stack.keystore_url}\n")
    print("Demo keys (shown once; a new set is made on every start):")
    for name, org_id, token in keys:
        print(f"  {name:<16} org {org_id:<12} {token}")
    chat, all_scopes, no_baa = (token for _, _, token in keys)
    print("\nTry:")
    print(f"  curl -i -X POST {base}/v1/ai/chat -H 'Authorization: Bearer {chat}'")
    print(f"  curl -i {base}/v1/usage -H 'Authorization: Bearer {chat}'   # 403")
    print(f"  curl -i {base}/v1/usage -H 'Authorization: Bearer {all_scopes}'")
    print(f"  curl -i -X POST {base}/v1/ai/chat -H 'Authorization: Bearer {no_baa}'")
    print(f"  curl -i {base}/v1/ai/chat   # 401, no key")
    print(f"  curl -i {base}/v1/status    # 200, a public route: no key needed")
    authz = stack.processes["hasp-authz"].process
    routes_file = stack.authz_env.get("HASP_ROUTES_FILE", str(DEFAULT_ROUTES_FILE))
    print(f"\nTo reload the route table, edit {routes_file} and run:")
    print(f"  kill -HUP {authz.pid if authz else '<hasp-authz pid>'}")
    print("\nPress Ctrl-C to stop.\n", flush=True)


def main() -> int:
    workdir = REPO_ROOT / ".run"
    stack = LocalStack(
        workdir=workdir,
        keystore_url=os.environ.get("HASP_KEYSTORE_URL", DEFAULT_KEYSTORE_URL),
        redis_url=os.environ.get("HASP_REDIS_URL"),
        redis_prefix=os.environ.get("HASP_REDIS_PREFIX", DEFAULT_PREFIX),
    )
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # `make` does not pass a SIGTERM on to its children, so a supervisor whose
    # parent went away stops too instead of leaving the stack running.
    parent = os.getppid()
    try:
        stack.start()
        print_banner(stack, seed_demo_data(stack))
        while not stopping and os.getppid() == parent:
            exited = stack.exited_process()
            if exited is not None:
                print(
                    f"{exited.name} exited with code {exited.exit_code}:\n"
                    f"{exited.log_tail()}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
    except ProcessFailed as error:
        print(f"make run: error: {error}", file=sys.stderr)
        return 1
    finally:
        print("stopping the local stack", file=sys.stderr)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
