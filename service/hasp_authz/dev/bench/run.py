"""Run every case of the Check-path benchmark once and collect the results.

The order matters: the allow-all floor (b) runs first, because the open-loop
rates are fractions of its closed-loop throughput and because Envoy's first
CheckRequest, captured there, is the template of every direct gRPC load. The
fill up to the large key set (a million keys by default) runs last, so every
other case reads the small one.
"""

from __future__ import annotations

import contextlib
import http.client
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from hasp_authz.dev.bench import envoy_setup, http_request, keys, measure, profile
from hasp_authz.dev.bench.http_request import bearer
from hasp_authz.dev.bench.servers import ServerGroup, start_allow_all, start_hasp_authz
from hasp_authz.dev.bench.wrk import RANDOM_KEYS
from hasp_authz.dev.redis_server import RedisServer, free_port

CASES = {
    "a": "Envoy alone, no ext_authz filter",
    "b": "allow-all server (grpc.aio floor)",
    "c": "hasp-authz, key in the in-process cache",
    "d": "hasp-authz, key only in Redis (HASP_CACHE_SIZE=0)",
    "e": "hasp-authz, malformed key",
    "f": "hasp-authz, one unknown well-formed key, repeated",
    "f2": "hasp-authz, a new unknown well-formed key per request",
}
CACHE_OFF = {"HASP_CACHE_SIZE": "0"}


@dataclass(frozen=True)
class BenchConfig:
    load: measure.LoadConfig
    envoy_concurrency: int
    # Keys that the cache-hit case cycles through: few enough that the first
    # second of warm-up caches them all and the 30 s TTL rarely expires one.
    cached_keys: int
    # Keys in Redis for every case, and the count that the last case fills up to.
    small_keys: int
    large_keys: int
    sample_keys: int
    open_loop_fractions: tuple[float, ...]
    profile_seconds: float
    # Alternating rounds of (b) and (c) for the targets that compare them.
    target_rounds: int = 3
    # A folder with the hiredis package, put on the PYTHONPATH of the server
    # in the hiredis case; None skips that case.
    hiredis_site: Path | None = None


@dataclass
class Results:
    closed: dict[str, measure.ClosedResult] = field(default_factory=dict)
    # (case, fraction of the floor's throughput) -> result
    open: dict[tuple[str, float], measure.OpenResult] = field(default_factory=dict)
    direct: dict[str, measure.DirectResult] = field(default_factory=dict)
    # Case -> one result per alternating round of (b) and (c).
    paired_closed: dict[str, list[measure.ClosedResult]] = field(default_factory=dict)
    paired_direct: dict[str, list[measure.DirectResult]] = field(default_factory=dict)
    paired_open: dict[str, list[measure.OpenResult]] = field(default_factory=dict)
    fill_seconds: float = 0.0
    profile: profile.Profile | None = None
    profile_error: str | None = None
    wall_seconds: float = 0.0


class CheckPathBench:
    """Runs the cases against one Redis and one upstream and keeps the results."""

    def __init__(self, config: BenchConfig, workdir: Path, redis_url: str):
        self.config = config
        self.load = config.load
        self.workdir = workdir
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.results = Results()
        self.template_path = workdir / "check-request.bin"
        # Envoy's CheckRequest when allowed_headers is unset: every header.
        self.all_headers_template_path = workdir / "check-request-all-headers.bin"
        self.upstream_port = free_port()
        self.known = [bearer(keys.token(i)) for i in range(config.small_keys)]
        self.cached = self.known[: config.cached_keys]
        fresh_count = self.load.grpc_checks + 1000
        self.unknown_fresh = [
            bearer(keys.token(i, keys.UNKNOWN)) for i in range(1, fresh_count + 1)
        ]
        self.authorization = {
            "a": self.cached,
            "b": self.cached,
            "c": self.cached,
            "d": self.known,
            "e": [bearer(keys.MALFORMED_TOKEN)],
            "f": [bearer(keys.token(0, keys.UNKNOWN))],
            "f2": self.unknown_fresh,
        }

    def redis_commands(self) -> int:
        """Return Redis' count of commands processed since it started."""
        return self.redis.info("stats")["total_commands_processed"]

    @property
    def template(self) -> bytes:
        return self.template_path.read_bytes()

    def rates(self) -> list[tuple[float, float]]:
        """Return (fraction, requests per second) of each open-loop load."""
        floor_rate = self.results.closed["b"].wrk.rate
        return [(f, f * floor_rate) for f in self.config.open_loop_fractions]

    @contextlib.contextmanager
    def front_envoy(
        self, authz: ServerGroup | None, *, all_headers: bool = False
    ) -> Iterator[int]:
        """Run the front Envoy for one case and yield its listener port."""
        port = free_port()
        name = f"front-{port}"
        text = envoy_setup.front_config(
            listen_port=port,
            admin_port=free_port(),
            upstream_port=self.upstream_port,
            authz_addresses=authz.addresses if authz else None,
            all_headers=all_headers,
        )
        envoy = envoy_setup.start_envoy(
            text, self.workdir, name, concurrency=self.config.envoy_concurrency
        )
        try:
            yield port
        finally:
            envoy.stop()

    @contextlib.contextmanager
    def server(self, group: ServerGroup) -> Iterator[ServerGroup]:
        """Stop ``group`` when the block ends, however it ends."""
        try:
            yield group
        finally:
            group.stop()

    def hasp_authz(self, name: str, **options) -> ServerGroup:
        return start_hasp_authz(self.workdir, name, self.redis_url, **options)

    def warm(self, group: ServerGroup) -> None:
        """Put every cache-hit key into the cache of each process of ``group``."""
        for address in group.addresses:
            measure.warm(address, self.template, self.cached, self.workdir)

    def closed(self, port, case, group, *, label=None) -> measure.ClosedResult:
        authorization = RANDOM_KEYS if case == "f2" else self.authorization[case]
        result = measure.closed_loop(
            port, authorization, group, self.load, self.workdir, self.redis_commands
        )
        self.results.closed[label or case] = result
        _progress(f"closed loop {label or case}: {result.wrk.rate:,.0f} requests/s")
        return result

    def direct(
        self, group, case, *, label=None, target=None, all_headers=False
    ) -> measure.DirectResult:
        template_path = self.all_headers_template_path if all_headers else None
        result = measure.direct_grpc(
            group,
            (template_path or self.template_path).read_bytes(),
            self.authorization[case],
            self.load,
            self.workdir,
            self.redis_commands,
            target=target,
        )
        self.results.direct[label or case] = result
        _progress(
            f"direct gRPC {label or case}: {result.rate:,.0f} checks/s, "
            f"{result.cpu_us:.0f} us CPU per check"
        )
        return result

    def open(self, port, case, fractions=None, *, label=None) -> None:
        for fraction, rate in self.rates():
            if fractions is not None and fraction not in fractions:
                continue
            result = measure.open_loop(
                port, self.authorization[case], rate, self.load, self.workdir
            )
            self.results.open[(label or case, fraction)] = result
            _progress(
                f"open loop {label or case} at {rate:,.0f}/s: p50 "
                f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
            )

    def run(self) -> Results:
        started = time.monotonic()
        self.run_floor()
        self.run_ceiling()
        self.run_cached()
        self.run_redis_only()
        self.run_paired()
        self.run_options()
        self.run_key_scaling()
        self.results.wall_seconds = time.monotonic() - started
        return self.results

    def run_floor(self) -> None:
        """Case (b): the allow-all server, which also captures Envoy's request."""
        group = start_allow_all(self.workdir, capture=self.template_path)
        with self.server(group), self.front_envoy(group) as port:
            self.closed(port, "b", group)
            self.direct(group, "b")
            self.open(port, "b")
        with self.server(start_allow_all(self.workdir, uvloop=True)) as group:
            self.direct(group, "b", label="b uvloop")
        self.capture_template(self.all_headers_template_path, all_headers=True)

    def capture_template(self, path: Path, *, all_headers: bool = False) -> None:
        """Save the CheckRequest that Envoy sends for one request through it."""
        group = start_allow_all(self.workdir, capture=path)
        with (
            self.server(group),
            self.front_envoy(group, all_headers=all_headers) as port,
        ):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request(
                    http_request.METHOD,
                    http_request.PATH,
                    body=http_request.BODY,
                    headers={
                        "Authorization": self.cached[0],
                        **dict(http_request.HEADERS),
                    },
                )
                connection.getresponse().read()
            finally:
                connection.close()
        if not path.exists():
            raise RuntimeError(f"Envoy sent no CheckRequest to capture into {path}")

    def run_ceiling(self) -> None:
        """Case (a): the same Envoy and upstream without the ext_authz filter."""
        with self.front_envoy(None) as port:
            self.closed(port, "a", None)
            self.open(port, "a")

    def run_cached(self) -> None:
        """Cases (c), (e), (f) and (f2) on hasp-authz with default settings."""
        with self.server(self.hasp_authz("authz")) as group:
            for case in ("c", "e", "f", "f2"):
                self.direct(group, case)
            with self.front_envoy(group) as port:
                for case in ("c", "e", "f", "f2"):
                    self.closed(port, case, group)
                self.open(port, "c")
                self.profile(port, group)
            self.direct(group, "c", label="c all headers", all_headers=True)
            with self.front_envoy(group, all_headers=True) as port:
                self.closed(port, "c", group, label="c all headers")

    def run_redis_only(self) -> None:
        """Case (d): the cache off, so every Check reads Redis."""
        with self.server(self.hasp_authz("authz-nocache", env=CACHE_OFF)) as group:
            self.direct(group, "d")
            with self.front_envoy(group) as port:
                self.closed(port, "d", group)
                self.open(port, "d")

    def run_paired(self) -> None:
        """Measure (b) and (c) in alternating rounds, both running all along.

        Load from other processes on a shared machine comes and goes within
        minutes, so the targets that compare (c) with (b) use the medians of
        these rounds rather than the single runs above.
        """
        half = max(self.config.open_loop_fractions)
        rate = half * self.results.closed["b"].wrk.rate
        floor = start_allow_all(self.workdir)
        authz = self.hasp_authz("authz-paired")
        with (
            self.server(floor),
            self.server(authz),
            self.front_envoy(floor) as floor_port,
            self.front_envoy(authz) as authz_port,
        ):
            self.warm(authz)
            sides = [("b", floor, floor_port), ("c", authz, authz_port)]
            for round_number in range(self.config.target_rounds):
                for case, group, port in sides[:: 1 if round_number % 2 else -1]:
                    self._paired_round(case, group, port, rate)

    def _paired_round(self, case: str, group: ServerGroup, port: int, rate: float):
        results = self.results
        closed = measure.closed_loop(
            port, self.cached, group, self.load, self.workdir, self.redis_commands
        )
        direct = measure.direct_grpc(
            group,
            self.template,
            self.cached,
            self.load,
            self.workdir,
            self.redis_commands,
        )
        open_ = measure.open_loop(port, self.cached, rate, self.load, self.workdir)
        results.paired_closed.setdefault(case, []).append(closed)
        results.paired_direct.setdefault(case, []).append(direct)
        results.paired_open.setdefault(case, []).append(open_)
        _progress(
            f"paired round {case}: {closed.wrk.rate:,.0f} requests/s, "
            f"{direct.cpu_us:.0f} us CPU per check, open-loop p99 {open_.p99_ms:.2f} ms"
        )

    def run_options(self) -> None:
        """uvloop, a Unix socket, two Redis round trips, hiredis and two workers."""
        self.run_variant("c", "uvloop", uvloop=True)
        self.run_variant("d", "uvloop", env=CACHE_OFF, uvloop=True)
        self.run_variant("c", "unix socket", unix_socket=True)
        self.run_variant("d", "two round trips", env=CACHE_OFF, two_round_trips=True)
        if self.config.hiredis_site is not None:
            # redis-py parses replies with hiredis whenever it can import it.
            hiredis_env = {**CACHE_OFF, "PYTHONPATH": str(self.config.hiredis_site)}
            self.run_variant("d", "hiredis", env=hiredis_env)
        half = max(self.config.open_loop_fractions)
        self.run_variant("c", "2 workers", workers=2, open_fraction=half)
        self.run_variant("d", "2 workers", env=CACHE_OFF, workers=2)

    def run_variant(
        self, case: str, variant: str, *, open_fraction: float | None = None, **options
    ) -> None:
        """Measure ``case`` on hasp-authz started with ``options``.

        A single process also gets the direct gRPC load; workers do not,
        because that load reaches one of them only.
        """
        label = f"{case} {variant}"
        group = self.hasp_authz("authz-" + variant.replace(" ", "-"), **options)
        with self.server(group):
            if len(group.addresses) == 1:
                self.direct(group, case, label=label)
            if case == "c":
                self.warm(group)
            with self.front_envoy(group) as port:
                self.closed(port, case, group, label=label)
                if open_fraction is not None:
                    self.open(port, case, fractions=[open_fraction], label=label)

    def run_key_scaling(self) -> None:
        """Case (d) with the small key set, then after a fill up to the large one."""
        with self.server(self.hasp_authz("authz-keys", env=CACHE_OFF)) as group:
            self.direct(group, "d", label="d small key set")
            _progress(f"filling Redis up to {self.config.large_keys:,} keys")
            self.results.fill_seconds = keys.fill_redis(
                self.redis_url, self.config.large_keys, start=self.config.small_keys
            )
            sample = keys.sample_tokens(self.config.large_keys, self.config.sample_keys)
            self.authorization["d large"] = [bearer(token) for token in sample]
            self.direct(group, "d large", label="d large key set")

    def profile(self, port: int, group: ServerGroup) -> None:
        """Sample hasp-authz with py-spy during a cache-hit load through Envoy."""
        output = self.workdir / "py-spy.txt"
        seconds = self.config.profile_seconds
        try:
            sampler = profile.start_py_spy(group.pids[0], seconds, output)
        except FileNotFoundError as error:
            self.results.profile_error = str(error)
            return
        # Not stored: the sampler pauses the server, so the rate is lower.
        profile_load = measure.LoadConfig(
            **{**self.load.__dict__, "seconds": seconds + 1, "warmup_seconds": 0}
        )
        measure.closed_loop(
            port, self.cached, None, profile_load, self.workdir, self.redis_commands
        )
        _, stderr = sampler.communicate(timeout=30)
        if sampler.returncode != 0 or not output.exists():
            self.results.profile_error = f"py-spy failed: {stderr.strip()[-500:]}"
            return
        self.results.profile = profile.summarize(output.read_text())


@contextlib.contextmanager
def bench_environment(config: BenchConfig, workdir: Path) -> Iterator[CheckPathBench]:
    """Start Redis with the small key set and the upstream; yield the bench."""
    with RedisServer(workdir=workdir) as redis_server:
        keys.fill_redis(redis_server.url, config.small_keys)
        bench = CheckPathBench(config, workdir, redis_server.url)
        upstream = envoy_setup.start_envoy(
            envoy_setup.upstream_config(
                listen_port=bench.upstream_port, admin_port=free_port()
            ),
            workdir,
            "upstream",
            concurrency=1,
        )
        try:
            yield bench
        finally:
            upstream.stop()
            bench.redis.close()


def run_bench(config: BenchConfig, workdir: Path) -> Results:
    """Run every case once in a fresh environment."""
    with bench_environment(config, workdir) as bench:
        return bench.run()


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
