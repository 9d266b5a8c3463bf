"""Sizes and durations of the benchmark, from HASP_BENCH_* environment variables.

Each variable has a default that keeps ``make bench`` under 10 minutes on two
cores; the defaults are chosen for run time, not for precision.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from hasp_authz.dev.bench.measure import LoadConfig
from hasp_authz.dev.bench.run import BenchConfig

# `make bench` installs hiredis here, apart from the virtualenv's own packages,
# so that only the hiredis case's server loads it.
DEFAULT_HIREDIS_SITE = Path(sys.prefix) / "bench-hiredis"


def load_config(environ: Mapping[str, str] = os.environ) -> BenchConfig:
    """Read the HASP_BENCH_* variables into a BenchConfig."""

    def number(name: str, default: float) -> float:
        value = environ.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            message = f"{name}={value!r} is invalid; expected a number"
            raise SystemExit(message) from None

    fractions = environ.get("HASP_BENCH_OPEN_LOOP_FRACTIONS", "0.25,0.5")
    try:
        open_loop_fractions = tuple(float(item) for item in fractions.split(","))
    except ValueError:
        raise SystemExit(
            f"HASP_BENCH_OPEN_LOOP_FRACTIONS={fractions!r} is invalid; expected "
            "comma-separated fractions such as 0.25,0.5"
        ) from None
    load = LoadConfig(
        seconds=number("HASP_BENCH_SECONDS", 5),
        warmup_seconds=number("HASP_BENCH_WARMUP_SECONDS", 1),
        grpc_checks=int(number("HASP_BENCH_GRPC_CHECKS", 5_000)),
        grpc_max_seconds=number("HASP_BENCH_GRPC_MAX_SECONDS", 8),
        grpc_concurrency=int(number("HASP_BENCH_GRPC_CONCURRENCY", 32)),
        connections=int(number("HASP_BENCH_CONNECTIONS", 32)),
        wrk_threads=int(number("HASP_BENCH_WRK_THREADS", 1)),
        uvloop_clients=_has_uvloop(),
    )
    return BenchConfig(
        load=load,
        envoy_concurrency=int(number("HASP_BENCH_ENVOY_CONCURRENCY", 1)),
        cached_keys=int(number("HASP_BENCH_CACHED_KEYS", 100)),
        small_keys=int(number("HASP_BENCH_SMALL_KEYS", 1_000)),
        large_keys=int(number("HASP_BENCH_LARGE_KEYS", 1_000_000)),
        sample_keys=int(number("HASP_BENCH_SAMPLE_KEYS", 20_000)),
        open_loop_fractions=open_loop_fractions,
        profile_seconds=number("HASP_BENCH_PROFILE_SECONDS", 5),
        target_rounds=int(number("HASP_BENCH_TARGET_ROUNDS", 3)),
        hiredis_site=_hiredis_site(environ),
    )


def _hiredis_site(environ: Mapping[str, str]) -> Path | None:
    """Return the folder with hiredis for the hiredis case, or None to skip it."""
    site = Path(environ.get("HASP_BENCH_HIREDIS_SITE", DEFAULT_HIREDIS_SITE))
    return site if (site / "hiredis").is_dir() else None


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
