"""Closed-loop throughput with wrk (Debian's wrk 4.1): each connection sends its
next request as soon as the previous response arrives.

The Lua script sets the method, path, body and headers of http_request.py. It
cycles through a list of Authorization values, or makes a new random
well-formed key for every request (``RANDOM_KEYS``), and prints one JSON line
from wrk's ``done`` callback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hasp_authz.dev.bench import http_request
from hasp_authz.tokens import CROCKFORD_ALPHABET, TOKEN_PREFIX

RANDOM_KEYS = "random"
_RESULT_PREFIX = "WRK_RESULT "

_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"non_2xx":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    "WRK_RESULT ", summary.requests, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def find_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise FileNotFoundError(
            "wrk not found on PATH; install it with `apt-get install -y wrk` "
            "(make bench tries that itself when it runs as root)"
        )
    return path


def lua_script(authorization: list[str] | str) -> str:
    """Return the wrk script for a list of Authorization values or RANDOM_KEYS."""
    headers = [*http_request.HEADERS]
    header_lines = "".join(f'  h["{name}"] = "{value}"\n' for name, value in headers)
    lines = [
        f'wrk.method = "{http_request.METHOD}"',
        f'wrk.path = "{http_request.PATH}"',
        f"wrk.body = '{http_request.BODY}'",
        "local function format(authorization)",
        "  local h = {}",
        header_lines.rstrip("\n"),
        '  h["Authorization"] = authorization',
        "  return wrk.format(nil, nil, h)",
        "end",
    ]
    if authorization == RANDOM_KEYS:
        lines += [
            f'local alphabet = "{CROCKFORD_ALPHABET}"',
            # Each thread gets its own seed, so threads do not repeat keys.
            "local threads = 0",
            "function setup(thread)",
            "  threads = threads + 1",
            "  thread:set('seed', threads)",
            "end",
            "function init(args) math.randomseed(os.time() * 1000 + seed) end",
            "function request()",
            "  local chars = {}",
            "  for i = 1, 32 do",
            "    local k = math.random(1, 32)",
            "    chars[i] = alphabet:sub(k, k)",
            "  end",
            f'  return format("Bearer {TOKEN_PREFIX}" .. table.concat(chars))',
            "end",
        ]
    else:
        values = ",\n".join(f'  "{value}"' for value in authorization)
        lines += [
            f"local values = {{\n{values}\n}}",
            "local prepared = {}",
            "local next_index = 0",
            "function init(args)",
            "  for i, value in ipairs(values) do prepared[i] = format(value) end",
            "end",
            "function request()",
            "  next_index = next_index % #prepared + 1",
            "  return prepared[next_index]",
            "end",
        ]
    return "\n".join(lines) + "\n" + _DONE


def run_wrk(
    url: str,
    authorization: list[str] | str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    script_path: Path,
) -> WrkResult:
    """Run wrk against ``url`` for ``seconds`` and return its summary."""
    script_path.write_text(lua_script(authorization))
    command = [
        find_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout", "2s",
        "-s", str(script_path),
        url,
    ]  # fmt: skip
    output = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    line = next(
        (item for item in output.splitlines() if item.startswith(_RESULT_PREFIX)), None
    )
    if line is None:
        raise RuntimeError(f"wrk printed no result line; its output was:\n{output}")
    data = json.loads(line[len(_RESULT_PREFIX) :])
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non_2xx=data["non_2xx"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )
