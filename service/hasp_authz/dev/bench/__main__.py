"""``python -m hasp_authz.dev.bench``: run the Check-path benchmark and record it.

Durations and sizes come from HASP_BENCH_* variables (see ``load_config``).
The result replaces the "Check path" section of docs/benchmarks.md, or goes
to stdout alone with ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import grpc

from hasp_authz.dev.bench import report
from hasp_authz.dev.bench.config import load_config
from hasp_authz.dev.bench.run import BenchConfig, run_bench
from hasp_authz.dev.envoy_config import find_envoy
from hasp_authz.dev.redis_server import find_redis_server

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"


def header(config: BenchConfig, wall_seconds: float, note: str) -> list[str]:
    """Return the section's opening paragraphs: command, machine and setup."""
    load = config.load
    threads = "thread" if config.envoy_concurrency == 1 else "threads"
    versions = (
        f"Envoy {_envoy_version()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, redis-server {_redis_version()}, "
        f"wrk {_wrk_version()}, uvloop {_package_version('uvloop')}, "
        f"py-spy {_package_version('py-spy')}, hiredis {_hiredis_version(config)}"
    )
    lines = [
        "Command: `make bench` (`python -m hasp_authz.dev.bench`), on "
        f"{date.today().isoformat()}. The whole run took {wall_seconds / 60:.1f} "
        "minutes.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu_model()}), "
        f"Linux {platform.release()}. {versions}.",
    ]
    if note:
        lines += ["", note]
    lines += [
        "",
        "Every case runs on this one machine: a front Envoy (envoy.yaml rendered "
        f"for free ports, {config.envoy_concurrency} worker {threads}), an upstream "
        "Envoy that responds with 200 itself, a redis-server of its own and the "
        "ext_authz server of the case. Every request is `POST /v1/ai/chat` with a "
        "JSON body and the same headers (http_request.py). hasp-authz runs with "
        "default settings unless the case says otherwise. Redis contains "
        f"{config.small_keys:,} keys of one org. The cache-hit case cycles through "
        f"{config.cached_keys:,} of them and the Redis-hit case through all.",
        "",
        f"A case runs {load.seconds:g} s after a {load.warmup_seconds:g} s warm-up. "
        f"wrk uses {load.wrk_threads} thread and {load.connections} connections. "
        "The open-loop loads offer fixed fractions of (b)'s closed-loop "
        "throughput, and open_loop.py explains why it is used instead of a "
        "closed-loop tool. Ratios are to (b), the allow-all server on the same "
        "gRPC stack, and to (a), Envoy without ext_authz.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    config = load_config()
    started = time.monotonic()

    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        results = run_bench(config, options.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="hasp-bench-") as directory:
            results = run_bench(config, Path(directory))

    wall_seconds = time.monotonic() - started
    section = report.render(results, config, header(config, wall_seconds, options.note))
    print(section)
    if not options.no_write:
        document = options.output.read_text()
        options.output.write_text(report.replace_section(document, section))
        print(f"wrote the Check path section of {options.output}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hasp_authz.dev.bench")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="Markdown file whose Check path section is replaced "
        "(default: docs/benchmarks.md)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave the file"
    )
    parser.add_argument(
        "--note",
        default=os.environ.get("HASP_BENCH_NOTE", ""),
        help="a sentence about the machine's state, printed under its description",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep configs and server logs in this folder (default: a temporary one)",
    )
    return parser


def _command_output(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (result.stdout + result.stderr).strip()


def _envoy_version() -> str:
    # "envoy  version: <sha>/1.40.0/Distribution/RELEASE/BoringSSL"
    text = _command_output([find_envoy(), "--version"])
    for word in text.replace("/", " ").split():
        if word[:1].isdigit() and word.count(".") == 2:
            return word
    return "unknown"


def _redis_version() -> str:
    text = _command_output([find_redis_server(), "--version"])
    for word in text.split():
        if word.startswith("v="):
            return word[2:]
    return "unknown"


def _wrk_version() -> str:
    text = _command_output(["wrk", "--version"])
    words = text.split()
    return words[1] if len(words) > 1 else "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _hiredis_version(config: BenchConfig) -> str:
    if config.hiredis_site is None:
        return "not installed (its case is skipped)"
    for info in config.hiredis_site.glob("hiredis-*.dist-info"):
        return info.name.removeprefix("hiredis-").removesuffix(".dist-info")
    return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
