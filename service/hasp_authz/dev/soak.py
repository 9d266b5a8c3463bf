"""Soak test: steady load through the real Envoy stack, with one Redis restart.

``make soak`` runs ``python -m hasp_authz.dev.soak``. It starts the local stack
(hasp_authz.dev.stack: its own redis-server, hasp-authz, ``hasp-keys sync
--watch``, the demo upstream and Envoy) on free ports of 127.0.0.1, creates a
set of keys, then:

1. measures capacity: a closed loop for ``--capacity-seconds``;
2. sends ``--load`` times that rate, paced, for ``--seconds``, and restarts
   Redis, empty, at the midpoint. The watcher then notices the missing
   completeness marker and reloads the copy;
3. reports replies by HTTP status and error code, socket errors, latency, the
   time from the restart until Envoy allows a key again, and the resident
   memory (RSS) of hasp-authz at the start, the middle and the end.

The load comes from wrk when it is on PATH, else from the Python generator
(see loadgen.py). Every loop is bounded by the run's duration.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import redis

from hasp_authz.dev.loadgen import (
    CHAT_PATH,
    LoadResult,
    PythonLoad,
    finish_wrk,
    start_wrk,
    wrk_available,
)
from hasp_authz.dev.soak_report import RESTART_WINDOW_SECONDS, render_report
from hasp_authz.dev.stack import REPO_ROOT, LocalStack, StackPorts
from hasp_authz.records import RedisLayout

# Seconds between RSS samples of hasp-authz during the paced run.
RSS_SAMPLE_SECONDS = 5.0


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 600.0
    capacity_seconds: float = 10.0
    load: float = 0.7
    connections: int = 64
    threads: int = 2
    # Keys that the load cycles through, each created with hasp-keys.
    keys: int = 20
    # "auto" picks wrk when it is on PATH, else "python".
    generator: str = "auto"
    workdir: Path = REPO_ROOT / ".run" / "soak"

    @property
    def chosen_generator(self) -> str:
        if self.generator == "auto":
            return "wrk" if wrk_available() else "python"
        return self.generator


@dataclass
class SoakResult:
    config: SoakConfig
    capacity: LoadResult
    target_rate: float
    run: LoadResult
    restart_at_seconds: float = 0.0
    # Wall-clock time of the restart, to find its replies in Envoy's access log.
    restart_epoch: float = 0.0
    # Seconds from the restart until the completeness marker was back, and
    # until Envoy allowed a key again.
    reload_seconds: float | None = None
    recovery_seconds: float | None = None
    rss_kib: dict[str, int] = field(default_factory=dict)
    rss_max_kib: int = 0
    # Highest 1-minute load average sampled: other work on the machine shows here.
    load_average_max: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)
    # Non-200 replies in Envoy's access log, by (status, response code details,
    # whether they began within RESTART_WINDOW_SECONDS of the restart).
    envoy_outcomes: Counter[tuple[str, str, bool]] = field(default_factory=Counter)


def run_soak(config: SoakConfig) -> SoakResult:
    """Start the stack, run both phases and stop everything again."""
    if config.workdir.exists():
        shutil.rmtree(config.workdir)
    stack = LocalStack(
        workdir=config.workdir,
        keystore_url=f"sqlite:///{config.workdir}/keystore.db",
        ports=StackPorts.free(),
        log_level="INFO",
    )
    stack.start()
    try:
        tokens = _create_keys(stack, config.keys)
        return _run_phases(stack, tokens, config)
    finally:
        stack.stop()


def _create_keys(stack: LocalStack, count: int) -> list[str]:
    stack.hasp_keys("orgs", "create", "soak", "--name", "Soak test", "--baa")
    tokens = []
    for index in range(count):
        created = stack.hasp_keys(
            "create", "--org", "soak", "--name", f"soak-{index}",
            "--scope", "ai:chat", "--json",
        )  # fmt: skip
        tokens.append(json.loads(created)["token"])
    for token in tokens:
        if _wait_for_allow(stack.ports.envoy, token, within=10.0) is None:
            raise RuntimeError("a new soak key was not allowed within 10 s")
    return tokens


def _run_phases(stack: LocalStack, tokens: list[str], config: SoakConfig):
    generator = config.chosen_generator
    capacity = _load(stack, tokens, config, generator, config.capacity_seconds, 0.0)
    target = capacity.rate * config.load
    result = SoakResult(
        config=config,
        capacity=capacity,
        target_rate=target,
        run=LoadResult(generator=generator, seconds=0.0),
        machine=_machine(generator),
    )
    monitor = _Monitor(stack, tokens[0], config.seconds / 2, result)
    run_started = time.time()
    monitor.start()
    try:
        result.run = _load(stack, tokens, config, generator, config.seconds, target)
    finally:
        monitor.stop()
    result.rss_kib["end"] = _rss_kib(stack)
    result.rss_max_kib = max(result.rss_max_kib, result.rss_kib["end"])
    result.envoy_outcomes = read_envoy_outcomes(
        config.workdir / "envoy.log", result.restart_epoch, since=run_started
    )
    return result


def _load(
    stack: LocalStack,
    tokens: list[str],
    config: SoakConfig,
    generator: str,
    seconds: float,
    rate: float,
) -> LoadResult:
    if generator == "python":
        return PythonLoad(stack.ports.envoy, tokens).run(
            seconds=seconds, connections=config.connections, rate=rate
        )
    process = start_wrk(
        stack.ports.envoy,
        tokens,
        seconds=seconds,
        threads=config.threads,
        connections=config.connections,
        rate=rate,
        script_path=config.workdir / "soak.lua",
    )
    return finish_wrk(process, timeout=seconds + 60)


class _Monitor:
    """Samples hasp-authz's RSS and restarts Redis once, in a thread of its own."""

    def __init__(
        self, stack: LocalStack, token: str, restart_after: float, result: SoakResult
    ):
        self.stack = stack
        self.token = token
        self.restart_after = restart_after
        self.result = result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.result.rss_kib["start"] = _rss_kib(self.stack)
        self.result.rss_max_kib = self.result.rss_kib["start"]
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        started = time.monotonic()
        restarted = False
        interval = min(RSS_SAMPLE_SECONDS, max(0.5, self.restart_after / 4))
        while not self._stop.wait(interval):
            rss = _rss_kib(self.stack)
            self.result.rss_max_kib = max(self.result.rss_max_kib, rss)
            self.result.load_average_max = max(
                self.result.load_average_max, os.getloadavg()[0]
            )
            if not restarted and time.monotonic() - started >= self.restart_after:
                restarted = True
                self.result.rss_kib["middle"] = rss
                self.result.restart_at_seconds = time.monotonic() - started
                self._restart_redis()

    def _restart_redis(self) -> None:
        self.result.restart_epoch = time.time()
        restarted_at = time.monotonic()
        self.stack.restart_redis()
        self.result.reload_seconds = _wait_for_marker(self.stack, within=30.0)
        allowed = _wait_for_allow(self.stack.ports.envoy, self.token, within=30.0)
        if allowed is not None:
            self.result.recovery_seconds = time.monotonic() - restarted_at


def read_envoy_outcomes(
    log_path: Path, restart_epoch: float, *, since: float
) -> Counter[tuple[str, str, bool]]:
    """Count the non-200 replies in Envoy's JSON access log from ``since`` on.

    Each is keyed by status, response code details (``ext_authz_denied`` is
    hasp-authz's own deny, ``ext_authz_error`` Envoy's reply when hasp-authz
    did not respond) and whether it began near the restart.
    """
    outcomes: Counter[tuple[str, str, bool]] = Counter()
    with log_path.open(encoding="utf-8", errors="replace") as log:
        for line in log:
            if '"status":200,' in line or not line.startswith("{"):
                continue
            entry = json.loads(line)
            began = datetime.fromisoformat(entry["start_time"]).timestamp()
            if began < since:
                continue
            near = 0 <= began - restart_epoch + 1 <= RESTART_WINDOW_SECONDS + 1
            key = (str(entry["status"]), entry["response_code_details"], near)
            outcomes[key] += 1
    return outcomes


def _wait_for_marker(stack: LocalStack, within: float) -> float | None:
    assert stack.redis_url is not None
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=1)
    marker = RedisLayout(stack.redis_prefix).complete_marker
    started = time.monotonic()
    try:
        while time.monotonic() - started < within:
            try:
                if client.exists(marker):
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    return None


def _wait_for_allow(port: int, token: str, within: float) -> float | None:
    """Send one request every 50 ms until Envoy allows ``token``; return seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request(
                "POST", CHAT_PATH, body=b"{}",
                headers={"Authorization": f"Bearer {token}"},
            )  # fmt: skip
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    return None


def _rss_kib(stack: LocalStack) -> int:
    """Return hasp-authz's resident set size in KiB, from /proc (Linux)."""
    process = stack.processes["hasp-authz"].process
    assert process is not None
    status = Path(f"/proc/{process.pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line in /proc/{process.pid}/status")


def _machine(generator: str) -> dict[str, str]:
    machine = {
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
    if generator == "wrk":
        version = subprocess.run(
            ["wrk", "--version"], capture_output=True, text=True, check=False
        )
        machine["wrk"] = (version.stdout or version.stderr).split(" [")[0].strip()
    return machine


def build_parser() -> argparse.ArgumentParser:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(
        prog="python -m hasp_authz.dev.soak",
        description="Soak the local Envoy stack with a Redis restart midway.",
    )
    parser.add_argument(
        "--seconds", type=float, default=defaults.seconds,
        help="length of the paced run, seconds (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--capacity-seconds", type=float, default=defaults.capacity_seconds,
        help="length of the closed-loop capacity run, seconds (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--load", type=float, default=defaults.load,
        help="paced rate as a fraction of the capacity (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--connections", type=int, default=defaults.connections,
        help="HTTP connections to Envoy (default %(default)d)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=defaults.threads,
        help="wrk threads (default %(default)d)",
    )  # fmt: skip
    parser.add_argument(
        "--generator", choices=("auto", "wrk", "python"), default="auto",
        help="load generator; auto uses wrk when it is on PATH",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path,
        help="Markdown file to write the report to (default: print it only)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.generator == "wrk" and not wrk_available():
        print("soak: error: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    config = SoakConfig(
        seconds=arguments.seconds,
        capacity_seconds=arguments.capacity_seconds,
        load=arguments.load,
        connections=arguments.connections,
        threads=arguments.threads,
        generator=arguments.generator,
    )
    print(
        f"soak: {config.chosen_generator}, {config.capacity_seconds:g} s capacity "
        f"run, then {config.seconds:g} s at {config.load:.0%} with a Redis restart "
        "midway",
        flush=True,
    )
    command = " ".join(["python -m hasp_authz.dev.soak", *(argv or sys.argv[1:])])
    report = render_report(run_soak(config), command=command)
    print(report)
    if arguments.output is not None:
        arguments.output.write_text(report)
        print(f"soak: wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
