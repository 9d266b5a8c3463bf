"""Compare hasp-authz's defaults with one change at a time, over several rounds.

``make bench`` measures each option once, some minutes after the default it
is compared with, so load from other processes on a shared machine can favour
either side. This module starts the default server and the changed one
alternately, for several rounds, and reports the median of each side and the
change in every round. Each side gets a direct gRPC load (CPU per Check) and
a closed-loop load through Envoy (throughput and CPU per request). Several
workers get no direct load, because it would reach only one of them.

Usage: python -m hasp_authz.dev.bench.compare [--rounds N] [--option NAME ...]
It takes the HASP_BENCH_* variables of ``python -m hasp_authz.dev.bench`` and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hasp_authz.dev.bench.config import DEFAULT_HIREDIS_SITE, load_config
from hasp_authz.dev.bench.run import CACHE_OFF, CheckPathBench, bench_environment


@dataclass(frozen=True)
class Option:
    case: str
    baseline: dict = field(default_factory=dict)
    variant: dict = field(default_factory=dict)
    # Envoy sends every header to the changed side (allowed_headers unset).
    all_headers: bool = False


OPTIONS = {
    "uvloop, cache hit": Option("c", variant={"uvloop": True}),
    "uvloop, Redis hit": Option(
        "d", baseline={"env": CACHE_OFF}, variant={"env": CACHE_OFF, "uvloop": True}
    ),
    "Unix socket, cache hit": Option("c", variant={"unix_socket": True}),
    "every header sent, cache hit": Option("c", all_headers=True),
    "two Redis round trips, Redis hit": Option(
        "d",
        baseline={"env": CACHE_OFF},
        variant={"env": CACHE_OFF, "two_round_trips": True},
    ),
    "hiredis parser, Redis hit": Option(
        "d",
        baseline={"env": CACHE_OFF},
        variant={"env": {**CACHE_OFF, "PYTHONPATH": str(DEFAULT_HIREDIS_SITE)}},
    ),
    "metrics server off, cache hit": Option(
        "c", variant={"env": {"HASP_METRICS_LISTEN": "off"}}
    ),
    "2 workers, cache hit": Option("c", variant={"workers": 2}),
    "2 workers, Redis hit": Option(
        "d", baseline={"env": CACHE_OFF}, variant={"env": CACHE_OFF, "workers": 2}
    ),
}
METRICS = (
    ("direct", "cpu_us", "direct CPU µs per Check"),
    ("closed", "cpu_us", "server CPU µs per request through Envoy"),
    ("closed", "rate", "requests/s through Envoy"),
)


def measure_side(
    bench: CheckPathBench, option: Option, variant: bool, label: str
) -> dict[str, float]:
    """Measure one side on a server of its own, and return its metrics by name."""
    options = option.variant if variant else option.baseline
    all_headers = variant and option.all_headers
    values: dict[str, float] = {}
    with bench.server(bench.hasp_authz("compare", **options)) as group:
        if len(group.addresses) == 1:
            result = bench.direct(
                group, option.case, label=label, all_headers=all_headers
            )
            values["direct cpu_us"] = result.cpu_us
        if option.case == "c":
            bench.warm(group)
        with bench.front_envoy(group, all_headers=all_headers) as port:
            closed = bench.closed(port, option.case, group, label=label)
        values["closed cpu_us"] = closed.cpu_us or 0.0
        values["closed rate"] = closed.wrk.rate
    return values


def compare(bench: CheckPathBench, names: list[str], rounds: int) -> str:
    bench.capture_template(bench.template_path)
    bench.capture_template(bench.all_headers_template_path, all_headers=True)
    lines = [
        "| option | measure | default (median) | with the option (median) "
        "| change of medians | change in each round |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name in names:
        option = OPTIONS[name]
        sides: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for round_number in range(rounds):
            # Alternate which side goes first, so a trend favours neither.
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for variant in order:
                label = f"{name} {'option' if variant else 'default'} {round_number}"
                sides[variant].append(measure_side(bench, option, variant, label))
        lines += _rows(name, sides)
    return "\n".join(lines)


def _rows(name: str, sides: dict[bool, list[dict[str, float]]]) -> list[str]:
    rows = []
    for kind, attribute, title in METRICS:
        key = f"{kind} {attribute}"
        if key not in sides[True][0] or key not in sides[False][0]:
            continue
        baseline = [values[key] for values in sides[False]]
        variant = [values[key] for values in sides[True]]
        base_median = statistics.median(baseline)
        variant_median = statistics.median(variant)
        change = (variant_median - base_median) / base_median * 100
        each = ", ".join(
            f"{(v - b) / b * 100:+.0f} %"
            for b, v in zip(baseline, variant, strict=True)
        )
        rows.append(
            f"| {name} | {title} | {base_median:,.0f} | {variant_median:,.0f} "
            f"| {change:+.0f} % | {each} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hasp_authz.dev.bench.compare")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per option")
    parser.add_argument(
        "--option",
        action="append",
        choices=sorted(OPTIONS),
        help="option to compare (repeatable; default: all)",
    )
    options = parser.parse_args(argv)
    config = load_config()
    names = options.option or list(OPTIONS)
    with (
        tempfile.TemporaryDirectory(prefix="hasp-bench-compare-") as directory,
        bench_environment(config, Path(directory)) as bench,
    ):
        table = compare(bench, names, options.rounds)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
