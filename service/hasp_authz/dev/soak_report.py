"""Render a soak run (soak.py) as the Markdown page docs/soak.md."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hasp_authz.dev.soak import SoakResult

# Replies that began from 1 s before the Redis restart to this long after it
# count as near the restart.
RESTART_WINDOW_SECONDS = 10.0

# Replies that the soak expects: allows, and the documented 503 while the
# Redis copy is being restarted and reloaded.
EXPECTED_STATUSES = {"200", "503"}
EXPECTED_CODES = {"AUTH_UNAVAILABLE"}

_METHOD = """\
# Soak test

`make soak` sends steady load through the real Envoy stack and restarts Redis
once in the middle. It shows whether every reply stays one of the documented
ones across the restart, how long the restart costs, and whether the memory of
hasp-authz grows. The code is in service/hasp_authz/dev/soak.py, and each run
rewrites this page.

## How it runs

- The stack of `make run` (Envoy, hasp-authz, `hasp-keys sync --watch`, the
  demo upstream and a redis-server of its own) starts on free ports of
  127.0.0.1, with default settings and a new SQLite key store.
- Every request is `POST /v1/ai/chat` with one of {keys} keys that have the
  `ai:chat` scope, so every reply should be 200, except while Redis restarts,
  when the documented reply is 503 `AUTH_UNAVAILABLE`.
- Capacity is measured first, in a closed loop: each connection sends its next
  request as soon as the previous reply arrives.
- The paced run then sends {load:.0%} of that rate. wrk is closed-loop, and
  fewer connections would lower its rate only as long as replies stay fast,
  so the Lua script paces each wrk thread to a fixed schedule instead (wrk's
  `delay()` hook, read from the monotonic clock). A request whose time has
  come goes out at once even when earlier ones were late, which keeps the
  offered rate near the target while replies slow down. Latency is measured
  from the actual send.
- At the midpoint Redis is restarted empty. hasp-authz denies with 503 until the
  watcher has noticed the missing completeness marker and reloaded the copy.
- hasp-authz's resident memory (VmRSS) is read at the start of the paced run,
  just before the restart and at the end. The machine's load average is
  sampled too, because other work on the same cores slows every process of
  the stack and shows as latency and as `ext_authz_error` replies.
"""


_ENVOY_OUTCOMES_INTRO = """\
`ext_authz_denied` is hasp-authz's own deny. `ext_authz_error` is Envoy's
reply when hasp-authz did not respond within 0.5 s or could not be reached,
with the same JSON body. Status 0 means that the client closed the connection
first, as wrk does with requests in flight when its run ends. Replies that
began from 1 s before the Redis restart to {window:g} s after it count as near
the restart. The closed-loop capacity run is left out.
"""


def render_report(result: SoakResult, *, command: str) -> str:
    """Return the whole docs/soak.md page for one run."""
    lines = [_METHOD.format(keys=result.config.keys, load=result.config.load)]
    lines += _summary(result, command)
    lines += _replies(result)
    lines += _envoy_outcomes(result)
    lines += _memory(result)
    return "\n".join(lines) + "\n"


def _summary(result: SoakResult, command: str) -> list[str]:
    config = result.config
    run = result.run
    machine = result.machine
    generator = run.generator
    if generator == "wrk":
        generator = f"{machine.get('wrk', 'wrk')}, {config.threads} threads"
    latency = run.latency_ms
    return [
        "## Last run",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| date | {time.strftime('%Y-%m-%d')} |",
        f"| machine | {machine.get('cores')} cores, {machine.get('system')}, "
        f"Python {machine.get('python')} |",
        f"| 1-minute load average, max sampled | {result.load_average_max:.1f} |",
        f"| load generator | {generator}, {config.connections} connections |",
        f"| capacity (closed loop, {result.capacity.seconds:.0f} s) | "
        f"{result.capacity.rate:.0f} replies/s |",
        f"| target ({config.load:.0%} of capacity) | {result.target_rate:.0f} "
        "requests/s |",
        f"| achieved | {run.rate:.0f} replies/s over {run.seconds:.0f} s, "
        f"{run.replies} replies |",
        f"| latency p50 / p99 / max | {latency.get('p50', 0):.1f} / "
        f"{latency.get('p99', 0):.1f} / {latency.get('max', 0):.1f} ms |",
        f"| Redis restarted | {result.restart_at_seconds:.0f} s into the paced run |",
        f"| completeness marker back | {_seconds(result.reload_seconds)} after "
        "the restart |",
        f"| first allow through Envoy | {_seconds(result.recovery_seconds)} after "
        "the restart |",
        "",
    ]


def _replies(result: SoakResult) -> list[str]:
    run = result.run
    lines = ["## Replies", "", "| HTTP status | replies |", "|---|---|"]
    for status, count in sorted(run.statuses.items()):
        lines.append(f"| {status} | {count} |")
    lines += ["", "| error code in the body | replies |", "|---|---|"]
    for code, count in sorted(run.codes.items()):
        lines.append(f"| {code} | {count} |")
    if not run.codes:
        lines.append("| (none) | 0 |")
    errors = run.socket_errors
    lines += [
        "",
        f"Socket errors: connect {errors['connect']}, read {errors['read']}, "
        f"write {errors['write']}, timeout {errors['timeout']}.",
        "",
        f"Unexpected replies: {_unexpected(result)}.",
        "",
    ]
    return lines


def _unexpected(result: SoakResult) -> str:
    run = result.run
    statuses = {
        status: count
        for status, count in run.statuses.items()
        if status not in EXPECTED_STATUSES
    }
    codes = {
        code: count for code, count in run.codes.items() if code not in EXPECTED_CODES
    }
    if not statuses and not codes and not sum(run.socket_errors.values()):
        return "none (every reply was 200 or the documented 503)"
    return (
        f"statuses {statuses}, codes {codes}, socket errors {dict(run.socket_errors)}"
    )


def _envoy_outcomes(result: SoakResult) -> list[str]:
    lines = [
        "## Non-200 replies in Envoy's access log",
        "",
        _ENVOY_OUTCOMES_INTRO.format(window=RESTART_WINDOW_SECONDS),
        "| status | response code details | near the restart | elsewhere |",
        "|---|---|---|---|",
    ]
    kinds = sorted({(status, details) for status, details, _ in result.envoy_outcomes})
    for status, details in kinds:
        near = result.envoy_outcomes[(status, details, True)]
        elsewhere = result.envoy_outcomes[(status, details, False)]
        lines.append(f"| {status} | `{details}` | {near} | {elsewhere} |")
    if not kinds:
        lines.append("| (none) | | 0 | 0 |")
    return [*lines, ""]


def _memory(result: SoakResult) -> list[str]:
    rss = result.rss_kib
    start, end = rss.get("start", 0), rss.get("end", 0)
    growth = end - start
    share = f"{growth / start:+.1%}" if start else "n/a"
    return [
        "## hasp-authz memory (RSS)",
        "",
        "| start | before the restart | end | max sampled | growth, end - start |",
        "|---|---|---|---|---|",
        f"| {_mib(start)} | {_mib(rss.get('middle', 0))} | {_mib(end)} | "
        f"{_mib(result.rss_max_kib)} | {growth / 1024:+.1f} MiB ({share}) |",
    ]


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _seconds(value: float | None) -> str:
    return "not within 30 s" if value is None else f"{value:.2f} s"
