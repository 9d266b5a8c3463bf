"""The three measurements, each against servers and an Envoy that are running.

- ``direct_grpc``: N Checks from grpc_load.py straight to a server, with the
  server's CPU time read from /proc before and after.
- ``closed_loop``: wrk through Envoy for a fixed time, after a short warm-up,
  with the server's CPU time per request when there is a server.
- ``open_loop``: open_loop.py through Envoy at a fixed offered rate.

``warm`` fills the caches of a server before a cache-hit measurement.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hasp_authz.dev.bench.servers import ServerGroup
from hasp_authz.dev.bench.wrk import WrkResult, run_wrk


@dataclass(frozen=True)
class LoadConfig:
    """Sizes and durations of every load, from HASP_BENCH_* variables."""

    seconds: float
    warmup_seconds: float
    grpc_checks: int
    # Upper bound of one direct gRPC load, in seconds, whatever the count.
    grpc_max_seconds: float
    grpc_concurrency: int
    connections: int
    wrk_threads: int
    uvloop_clients: bool


@dataclass(frozen=True)
class DirectResult:
    checks: int
    seconds: float
    server_cpu_seconds: float
    # The part of server_cpu_seconds spent on the server's main thread.
    main_thread_cpu_seconds: float
    failures: int
    p50_ms: float
    p99_ms: float
    outcomes: dict[str, int] = field(default_factory=dict)
    redis_commands: int = 0

    @property
    def rate(self) -> float:
        return self.checks / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.server_cpu_seconds / self.checks * 1e6

    @property
    def main_thread_cpu_us(self) -> float:
        return self.main_thread_cpu_seconds / self.checks * 1e6

    @property
    def redis_per_check(self) -> float:
        return self.redis_commands / self.checks


@dataclass(frozen=True)
class ClosedResult:
    wrk: WrkResult
    # Server CPU microseconds per request; None without a server (case a).
    cpu_us: float | None
    redis_per_request: float


@dataclass(frozen=True)
class OpenResult:
    rate: float
    sent: int
    completed: int
    p50_ms: float
    p99_ms: float
    lag_p99_ms: float
    statuses: dict[str, int]


def direct_grpc(
    group: ServerGroup,
    template: bytes,
    authorization: list[str],
    config: LoadConfig,
    workdir: Path,
    redis_commands: Callable[[], int],
    *,
    target: str | None = None,
) -> DirectResult:
    """Send ``config.grpc_checks`` Checks to the group's first address.

    ``redis_commands`` returns Redis' count of commands processed so far.
    """
    input_path = workdir / "grpc-load.json"
    input_path.write_text(
        json.dumps(
            {
                "template": base64.b64encode(template).decode(),
                "authorization": authorization,
            }
        )
    )
    command = [
        sys.executable, "-m", "hasp_authz.dev.bench.grpc_load",
        "--target", target or group.addresses[0],
        "--input", str(input_path),
        "--count", str(config.grpc_checks),
        "--concurrency", str(config.grpc_concurrency),
        "--max-seconds", str(config.grpc_max_seconds),
    ]  # fmt: skip
    if config.uvloop_clients:
        command.append("--uvloop")
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as load:
        assert load.stdin is not None and load.stdout is not None
        if load.stdout.readline().strip() != "ready":
            raise RuntimeError("grpc_load did not become ready; see its stderr above")
        before = group.cpu_seconds()
        main_before = group.main_thread_cpu_seconds()
        redis_before = redis_commands()
        load.stdin.write("go\n")
        load.stdin.flush()
        line = load.stdout.readline()
        after = group.cpu_seconds()
        main_after = group.main_thread_cpu_seconds()
        redis_after = redis_commands()
    if not line:
        raise RuntimeError("grpc_load exited without a result; see its stderr above")
    data = json.loads(line)
    return DirectResult(
        checks=data["count"],
        seconds=data["seconds"],
        server_cpu_seconds=after - before,
        main_thread_cpu_seconds=main_after - main_before,
        failures=data["failures"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        outcomes=data["outcomes"],
        redis_commands=redis_after - redis_before,
    )


def warm(target: str, template: bytes, authorization: list[str], workdir: Path):
    """Send every Authorization value once to ``target``, untimed.

    Envoy spreads requests over the processes of a group, so a warm-up through
    Envoy may leave a key uncached in one of them. This reaches each directly.
    """
    input_path = workdir / "grpc-warm.json"
    input_path.write_text(
        json.dumps(
            {
                "template": base64.b64encode(template).decode(),
                "authorization": authorization,
            }
        )
    )
    command = [
        sys.executable, "-m", "hasp_authz.dev.bench.grpc_load",
        "--target", target,
        "--input", str(input_path),
        "--count", "0",
        "--warmup", str(len(authorization)),
    ]  # fmt: skip
    subprocess.run(command, input="go\n", capture_output=True, text=True, check=True)


def closed_loop(
    port: int,
    authorization: list[str] | str,
    group: ServerGroup | None,
    config: LoadConfig,
    workdir: Path,
    redis_commands: Callable[[], int],
) -> ClosedResult:
    """Warm up, then run wrk through Envoy on ``port`` for ``config.seconds``."""
    url = f"http://127.0.0.1:{port}"
    script = workdir / "wrk.lua"
    options = {
        "connections": config.connections,
        "threads": config.wrk_threads,
        "script_path": script,
    }
    if config.warmup_seconds > 0:
        run_wrk(url, authorization, seconds=config.warmup_seconds, **options)
    before = group.cpu_seconds() if group else 0.0
    redis_before = redis_commands()
    result = run_wrk(url, authorization, seconds=config.seconds, **options)
    requests = max(1, result.requests)
    redis_per_request = (redis_commands() - redis_before) / requests
    cpu_us = None
    if group is not None:
        cpu_us = (group.cpu_seconds() - before) / requests * 1e6
    return ClosedResult(result, cpu_us, redis_per_request)


def open_loop(
    port: int,
    authorization: list[str],
    rate: float,
    config: LoadConfig,
    workdir: Path,
) -> OpenResult:
    """Offer ``rate`` requests per second through Envoy for ``config.seconds``."""
    input_path = workdir / "open-loop.json"
    input_path.write_text(json.dumps({"authorization": authorization}))
    command = [
        sys.executable, "-m", "hasp_authz.dev.bench.open_loop",
        "--port", str(port),
        "--input", str(input_path),
        "--rate", f"{rate:.1f}",
        "--seconds", str(config.seconds),
        "--warmup-seconds", str(config.warmup_seconds),
        "--max-connections", str(max(config.connections, 256)),
    ]  # fmt: skip
    if config.uvloop_clients:
        command.append("--uvloop")
    timeout = config.seconds + config.warmup_seconds + 30
    output = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    data = json.loads(output.splitlines()[-1])
    return OpenResult(
        rate=data["rate"],
        sent=data["sent"],
        completed=data["completed"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        lag_p99_ms=data["lag_p99_ms"],
        statuses=data["statuses"],
    )
