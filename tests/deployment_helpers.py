"""Helpers for the Redis Sentinel and Redis Cluster tests.

Those tests run the real console scripts: ``hasp-keys`` to write the copy and
``hasp-authz serve`` to serve Checks, both given a ``redis+sentinel://`` or
``redis+cluster://`` URL, against redis-server processes that the tests start
(hasp_authz.dev.redis_server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hasp_authz.dev.processes import ManagedProcess
from hasp_authz.dev.redis_server import RedisServerNotFound, find_redis_server
from test_servicer import AuthzServer, check_request, http_status, launch_server

HASP_KEYS = str(Path(sys.executable).parent / "hasp-keys")


def require_redis_server() -> None:
    """Skip the test without a redis-server binary, or fail it under CI."""
    try:
        find_redis_server()
    except RedisServerNotFound as error:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(str(error))
        pytest.skip(str(error))


def wait_for(condition: Callable[[], bool], within: float, description: str) -> float:
    """Poll ``condition`` every 0.05 s; fail after ``within`` seconds.

    Returns the seconds it took.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"timed out after {within:g} s waiting for {description}")
        time.sleep(0.05)
    return time.monotonic() - started


@dataclass(frozen=True)
class KeysCli:
    """Runs ``hasp-keys`` against one key store, Redis URL and prefix."""

    keystore_url: str
    redis_url: str
    prefix: str
    workdir: Path

    @property
    def env(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if "HASP_" not in name}
        env["HASP_KEYSTORE_URL"] = self.keystore_url
        env["HASP_REDIS_URL"] = self.redis_url
        env["HASP_REDIS_PREFIX"] = self.prefix
        return env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [HASP_KEYS, *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str) -> str:
        """Run a command that must exit 0; return its stdout."""
        result = self.run(*args)
        assert result.returncode == 0, (
            f"hasp-keys {' '.join(args)} exited {result.returncode}: {result.stderr}"
        )
        return result.stdout

    def create_key(self, org_id: str, name: str, scope: str = "ai:chat") -> dict:
        """Create a key; return the JSON output, with ``token`` and ``key_id``."""
        output = self.ok(
            "create", "--org", org_id, "--name", name, "--scope", scope, "--json"
        )
        return json.loads(output)

    def start_watcher(self, *args: str) -> ManagedProcess:
        """Start ``hasp-keys sync --watch``; the caller stops it."""
        process = ManagedProcess(
            "hasp-keys sync --watch",
            [HASP_KEYS, "sync", "--watch", *args],
            self.workdir / "watcher.log",
            env={"HASP_KEYSTORE_URL": self.keystore_url,
                 "HASP_REDIS_URL": self.redis_url,
                 "HASP_REDIS_PREFIX": self.prefix},
        )  # fmt: skip
        return process.start()


def authz_server(
    tmp_path: Path, redis_url: str, prefix: str, *extra_args: str
) -> Iterator[AuthzServer]:
    """Run ``hasp-authz serve`` until the generator is closed, then print its log."""
    server = launch_server(tmp_path, redis_url, prefix, extra_args)
    try:
        server.wait_until_serving()
        yield server
    finally:
        server.close()
        print(f"--- hasp-authz log ({server.address}) ---\n{server.log()}")


def check_status(server: AuthzServer, token: str) -> int:
    """Send one POST /v1/ai/chat Check with ``token``; return the HTTP status."""
    headers = [("authorization", f"Bearer {token}")]
    return http_status(server.check(check_request("POST", "/v1/ai/chat", headers)))
