"""Render the results as the "Check path" section of docs/benchmarks.md.

The section is replaced whole on every run, except a ``### Notes`` part at its
end, which is written by hand and kept as it is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hasp_authz.dev.bench.run import CASES, BenchConfig, Results

SECTION_TITLE = "## Check path"
NOTES_TITLE = "### Notes"


@dataclass(frozen=True)
class Target:
    name: str
    ratio: float
    limit: float
    # True when the ratio must stay at or above the limit, False for at or below.
    at_least: bool

    @property
    def met(self) -> bool:
        if math.isnan(self.ratio):
            return False
        return self.ratio >= self.limit if self.at_least else self.ratio <= self.limit


def targets(results: Results, config: BenchConfig) -> list[Target]:
    """Evaluate the five targets of the Check path against the measured ratios.

    The three that compare (c) with (b) use the medians of the alternating
    rounds; the others use the single runs.
    """
    half = max(config.open_loop_fractions)
    direct = results.direct
    small = direct.get("d small key set")
    large = direct.get("d large key set")
    rounds = f"median of {config.target_rounds} alternating rounds"
    return [
        Target(
            f"cache-hit throughput through Envoy, (c) / (b), {rounds}",
            _paired_ratio(results.paired_closed, lambda r: r.wrk.rate),
            0.9,
            at_least=True,
        ),
        Target(
            f"server CPU per cache-hit Check (direct gRPC), (c) / (b), {rounds}",
            _paired_ratio(results.paired_direct, lambda r: r.cpu_us),
            1.15,
            at_least=False,
        ),
        Target(
            "server CPU per Redis-hit Check, (d) / (b)",
            direct["d"].cpu_us / direct["b"].cpu_us,
            1.5,
            at_least=False,
        ),
        Target(
            f"open-loop p99 at {half:g} of (b)'s throughput, (c) / (b), {rounds}",
            _paired_ratio(results.paired_open, lambda r: r.p99_ms),
            1.2,
            at_least=False,
        ),
        Target(
            f"time per Redis-hit Check, {config.large_keys:,} keys / "
            f"{config.small_keys:,} keys (direct gRPC)",
            small.rate / large.rate if small and large else math.nan,
            1.05,
            at_least=False,
        ),
    ]


def _paired_ratio(rounds: dict[str, list], value: Callable[[Any], float]) -> float:
    if not rounds.get("b") or not rounds.get("c"):
        return math.nan
    floor = statistics.median(value(result) for result in rounds["b"])
    return statistics.median(value(result) for result in rounds["c"]) / floor


def render(results: Results, config: BenchConfig, header: list[str]) -> str:
    """Return the whole section, title included, without the Notes part."""
    parts = [
        SECTION_TITLE,
        "\n".join(header),
        _closed_table(results),
        _open_table(results),
        _direct_table(results, config),
        _paired_table(results, config),
        _targets_table(results, config),
        _options_table(results),
        _profile_table(results),
    ]
    return "\n\n".join(parts) + "\n"


def replace_section(document: str, section: str) -> str:
    """Put ``section`` in place of the document's Check path section, or append it.

    A ``### Notes`` part at the end of the old section is kept.
    """
    start = document.find(f"\n{SECTION_TITLE}\n")
    if start < 0:
        return document.rstrip("\n") + "\n\n" + section
    end = document.find("\n## ", start + 1)
    old = document[start + 1 : end + 1 if end >= 0 else len(document)]
    notes_at = old.find(f"\n{NOTES_TITLE}\n")
    notes = old[notes_at + 1 :].rstrip("\n") + "\n" if notes_at >= 0 else ""
    rest = document[end + 1 :] if end >= 0 else ""
    new = section + ("\n" + notes if notes else "")
    return document[: start + 1] + new + ("\n" + rest if rest else "")


def _closed_table(results: Results) -> str:
    a, b = results.closed["a"].wrk.rate, results.closed["b"].wrk.rate
    lines = [
        "### Through Envoy, closed loop (wrk)",
        "",
        "| case | requests/s | / (b) | / (a) | p50 ms | p99 ms "
        "| server CPU µs per request | Redis commands per request | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, result in results.closed.items():
        wrk = result.wrk
        cpu = "" if result.cpu_us is None else f"{result.cpu_us:.0f}"
        lines.append(
            f"| {_case(label)} | {wrk.rate:,.0f} | {wrk.rate / b:.2f} "
            f"| {wrk.rate / a:.2f} | {wrk.p50_ms:.2f} | {wrk.p99_ms:.2f} | {cpu} "
            f"| {result.redis_per_request:.2f} "
            f"| {wrk.non_2xx:,}{_errors(wrk.socket_errors)} |"
        )
    return "\n".join(lines)


def _open_table(results: Results) -> str:
    lines = [
        "### Through Envoy, open loop (open_loop.py)",
        "",
        "| case | offered/s | p50 ms | p99 ms | p50 / (b) | p99 / (b) | p50 / (a) "
        "| p99 / (a) | dispatch lag p99 ms | completed / sent |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, fraction), result in sorted(
        results.open.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        b = results.open[("b", fraction)]
        a = results.open.get(("a", fraction))
        p50_a = f"{result.p50_ms / a.p50_ms:.2f}" if a else ""
        p99_a = f"{result.p99_ms / a.p99_ms:.2f}" if a else ""
        lines.append(
            f"| {_case(label)} | {result.rate:,.0f} ({fraction:g} of (b)) "
            f"| {result.p50_ms:.2f} | {result.p99_ms:.2f} "
            f"| {result.p50_ms / b.p50_ms:.2f} | {result.p99_ms / b.p99_ms:.2f} "
            f"| {p50_a} | {p99_a} | {result.lag_p99_ms:.2f} "
            f"| {result.completed:,} / {result.sent:,} |"
        )
    return "\n".join(lines)


def _direct_table(results: Results, config: BenchConfig) -> str:
    b = results.direct["b"].cpu_us
    lines = [
        "### Direct gRPC, no Envoy (grpc_load.py)",
        "",
        f"Up to {config.load.grpc_checks:,} Checks or "
        f"{config.load.grpc_max_seconds:g} s per case, whichever ends first, "
        f"{config.load.grpc_concurrency} in flight, after 500 untimed ones. "
        "Server CPU is user plus system time of the server process from "
        "/proc/PID/stat, all threads; the main thread runs the event loop, the "
        "others are grpc's poller and I/O threads. Redis commands are Redis' own "
        "count (INFO stats), which includes the calls a Lua script makes.",
        "",
        "| case | checks/s | server CPU µs per Check | main thread µs | CPU / (b) "
        "| p50 ms | p99 ms | Redis commands per Check | responses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, result in results.direct.items():
        outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(result.outcomes.items()))
        if result.failures:
            outcomes += f", failed RPCs: {result.failures:,}"
        lines.append(
            f"| {_case(label)} | {result.rate:,.0f} | {result.cpu_us:.0f} "
            f"| {result.main_thread_cpu_us:.0f} | {result.cpu_us / b:.2f} "
            f"| {result.p50_ms:.2f} | {result.p99_ms:.2f} "
            f"| {result.redis_per_check:.2f} | {outcomes} |"
        )
    return "\n".join(lines)


def _paired_table(results: Results, config: BenchConfig) -> str:
    half = max(config.open_loop_fractions)
    rate = half * results.closed["b"].wrk.rate
    lines = [
        "### (b) and (c) in alternating rounds",
        "",
        "Both servers and their Envoys run all along; each round measures one, "
        "then the other, and the order alternates. Each round is a closed loop "
        f"through Envoy, a direct gRPC load and an open loop at {rate:,.0f} "
        f"requests/s ({half:g} of (b)'s closed-loop throughput above).",
        "",
        "| round | case | requests/s | direct CPU µs per Check | open-loop p50 ms "
        "| open-loop p99 ms | dispatch lag p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    count = min(len(results.paired_closed.get(case, [])) for case in ("b", "c"))
    for index in range(count):
        for case in ("b", "c"):
            closed = results.paired_closed[case][index]
            direct = results.paired_direct[case][index]
            open_ = results.paired_open[case][index]
            lines.append(
                f"| {index + 1} | ({case}) | {closed.wrk.rate:,.0f} "
                f"| {direct.cpu_us:.0f} | {open_.p50_ms:.2f} | {open_.p99_ms:.2f} "
                f"| {open_.lag_p99_ms:.2f} |"
            )
    return "\n".join(lines)


def _targets_table(results: Results, config: BenchConfig) -> str:
    lines = [
        "### Targets",
        "",
        "| target | measured ratio | limit | result | ratio minus limit |",
        "|---|---:|---:|---|---:|",
    ]
    for target in targets(results, config):
        sign = ">=" if target.at_least else "<="
        verdict = "met" if target.met else "missed"
        lines.append(
            f"| {target.name} | {target.ratio:.2f} | {sign} {target.limit:g} "
            f"| {verdict} | {target.ratio - target.limit:+.2f} |"
        )
    lines += [
        "",
        f"For the last target Redis was filled from {config.small_keys:,} to "
        f"{config.large_keys:,} keys with pipelined MSET commands "
        f"({results.fill_seconds:.0f} s), and the load then cycled through "
        f"{min(config.sample_keys, config.large_keys):,} keys drawn at random "
        "from them.",
    ]
    return "\n".join(lines)


def _options_table(results: Results) -> str:
    closed, direct, open_ = results.closed, results.direct, results.open
    rows = [
        ("uvloop, floor", "direct CPU µs per Check", direct["b"].cpu_us,
         _get(direct, "b uvloop", "cpu_us")),
        ("uvloop, cache hit", "direct CPU µs per Check", direct["c"].cpu_us,
         _get(direct, "c uvloop", "cpu_us")),
        ("uvloop, cache hit", "requests/s through Envoy", closed["c"].wrk.rate,
         _get_wrk(closed, "c uvloop")),
        ("uvloop, Redis hit", "direct CPU µs per Check", direct["d"].cpu_us,
         _get(direct, "d uvloop", "cpu_us")),
        ("uvloop, Redis hit", "requests/s through Envoy", closed["d"].wrk.rate,
         _get_wrk(closed, "d uvloop")),
        ("Unix socket, cache hit", "direct CPU µs per Check", direct["c"].cpu_us,
         _get(direct, "c unix socket", "cpu_us")),
        ("Unix socket, cache hit", "requests/s through Envoy", closed["c"].wrk.rate,
         _get_wrk(closed, "c unix socket")),
        ("Unix socket, cache hit", "server CPU µs per request through Envoy",
         closed["c"].cpu_us, _get(closed, "c unix socket", "cpu_us")),
        ("every header sent, cache hit", "direct CPU µs per Check",
         direct["c"].cpu_us, _get(direct, "c all headers", "cpu_us")),
        ("every header sent, cache hit", "requests/s through Envoy",
         closed["c"].wrk.rate, _get_wrk(closed, "c all headers")),
        ("every header sent, cache hit", "server CPU µs per request through Envoy",
         closed["c"].cpu_us, _get(closed, "c all headers", "cpu_us")),
        ("two Redis round trips, Redis hit", "direct CPU µs per Check",
         direct["d"].cpu_us, _get(direct, "d two round trips", "cpu_us")),
        ("two Redis round trips, Redis hit", "direct p50 ms", direct["d"].p50_ms,
         _get(direct, "d two round trips", "p50_ms")),
        ("two Redis round trips, Redis hit", "requests/s through Envoy",
         closed["d"].wrk.rate, _get_wrk(closed, "d two round trips")),
        ("hiredis parser, Redis hit", "direct CPU µs per Check", direct["d"].cpu_us,
         _get(direct, "d hiredis", "cpu_us")),
        ("hiredis parser, Redis hit", "requests/s through Envoy", closed["d"].wrk.rate,
         _get_wrk(closed, "d hiredis")),
        ("2 workers, cache hit", "requests/s through Envoy", closed["c"].wrk.rate,
         _get_wrk(closed, "c 2 workers")),
        ("2 workers, Redis hit", "requests/s through Envoy", closed["d"].wrk.rate,
         _get_wrk(closed, "d 2 workers")),
    ]  # fmt: skip
    half = max(key[1] for key in open_)
    if ("c 2 workers", half) in open_:
        rows.append(
            ("2 workers, cache hit", f"open-loop p99 ms at {half:g} of (b)",
             open_[("c", half)].p99_ms, open_[("c 2 workers", half)].p99_ms)
        )  # fmt: skip
    lines = [
        "### Options",
        "",
        "Each row compares hasp-authz as configured by default (the baseline, "
        "from the tables above) with one change.",
        "",
        "| option | measure | baseline | with the option | change |",
        "|---|---|---:|---:|---:|",
    ]
    for option, measure_name, baseline, variant in rows:
        if baseline is None or variant is None:
            continue
        change = (variant - baseline) / baseline * 100
        lines.append(
            f"| {option} | {measure_name} | {_number(baseline)} | {_number(variant)} "
            f"| {change:+.0f} % |"
        )
    return "\n".join(lines)


def _profile_table(results: Results) -> str:
    title = "### Profile of the cache-hit path"
    if results.profile is None:
        return f"{title}\n\nNot taken: {results.profile_error}"
    profile = results.profile
    threads = ", ".join(f"{name} {share:.0%}" for name, share in profile.thread_share)
    lines = [
        title,
        "",
        f"py-spy, {profile.samples:,} samples of the hasp-authz process at 250 Hz "
        "during a cache-hit load through Envoy (a separate run; the sampler slows "
        f"the server). Samples by thread: {threads}. Self: samples where the "
        "function was innermost; total: samples where it was anywhere on the "
        "stack. py-spy reads Python frames only, so time in grpc's Cython and C "
        "code counts as `Handle._run` (callbacks and task steps that the event "
        "loop runs) on the main thread and as `Thread.run` on grpc's poller "
        "thread.",
        "",
        "| function (self) | share | hasp_authz function (total) | share |",
        "|---|---:|---|---:|",
    ]
    for (self_name, self_share), (total_name, total_share) in zip(
        profile.self_share, profile.product_share, strict=False
    ):
        lines.append(
            f"| `{self_name}` | {self_share:.1%} | `{total_name}` | {total_share:.1%} |"
        )
    return "\n".join(lines)


def _case(label: str) -> str:
    case, _, variant = label.partition(" ")
    text = f"({case}) {CASES.get(case, '')}"
    return f"{text}, {variant}" if variant else text


def _errors(count: int) -> str:
    return f" (+{count:,} socket errors)" if count else ""


def _get(table: dict, label: str, attribute: str) -> float | None:
    item = table.get(label)
    return None if item is None else getattr(item, attribute)


def _get_wrk(table: dict, label: str) -> float | None:
    item = table.get(label)
    return None if item is None else item.wrk.rate


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
