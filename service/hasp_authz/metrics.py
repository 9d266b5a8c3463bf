"""Prometheus metrics of one hasp-authz process, in a registry of its own.

Every metric lives in the CollectorRegistry that ``Metrics`` is given (or
creates), never in prometheus_client's global one, so tests can run several
servers in one process. Label values are bounded: ``code`` is an Outcome
value, ``route`` a template from the route file, ``public`` (a public Envoy
route) or ``none``, and ``result`` one of CACHE_RESULTS or applied/rejected.
No label ever takes a value from the client's request.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from hasp_authz import __version__
from hasp_authz.outcomes import Outcome

# Label value of a decision that matched no route.
NO_ROUTE = "none"
CACHE_RESULTS = ("hit", "miss", "negative_hit", "bypass")
# Check latency buckets in seconds, from 0.25 ms up to 0.5 s, Envoy's ext_authz
# timeout in envoy.yaml.
CHECK_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
)  # fmt: skip
# Publish-to-applied lag buckets in seconds. Revocation is promised within 1 s
# while Redis is up, so the buckets are finest below that.
CHANGE_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metrics one server updates, registered in ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        # Publish time (epoch seconds) of the newest change message applied.
        self.newest_change_at: float | None = None
        self._decision_counters: dict[tuple[str, str], Counter] = {}
        self._register()
        self._initialize_labels()

    def _register(self) -> None:
        registry = self.registry
        self.decisions = Counter(
            "hasp_authz_decisions",
            "Check decisions by outcome code (ALLOW included) and route template.",
            ["code", "route"],
            registry=registry,
        )
        self.shadow_denials = Counter(
            "hasp_authz_shadow_denials",
            "Checks on shadow-mode routes that would have been denied but were "
            "allowed, by outcome code and route template.",
            ["code", "route"],
            registry=registry,
        )
        self.check_duration = Histogram(
            "hasp_authz_check_duration_seconds",
            "Time from the start of a Check to its response, in seconds.",
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self.cache_lookups = Counter(
            "hasp_authz_cache_lookups",
            "In-process cache lookups by result: hit, miss, negative_hit (a cached "
            "unknown key) or bypass (cache suspended while the change subscription "
            "is down). Nothing is counted when HASP_CACHE_SIZE is 0.",
            ["result"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "hasp_authz_redis_errors",
            "Key lookups in Redis that failed or timed out, after the retry.",
            registry=registry,
        )
        self.route_reloads = Counter(
            "hasp_authz_route_reloads",
            "Route file reloads on SIGHUP, by result: applied or rejected.",
            ["result"],
            registry=registry,
        )
        self.change_lag = Histogram(
            "hasp_authz_change_lag_seconds",
            "Time from publishing a change message to applying it to the cache, "
            "in seconds. Messages without a publish time are not counted.",
            buckets=CHANGE_LAG_BUCKETS,
            registry=registry,
        )
        newest_change_age = Gauge(
            "hasp_authz_newest_change_age_seconds",
            "Seconds since the newest applied change message was published; NaN "
            "until one with a publish time arrives.",
            registry=registry,
        )
        newest_change_age.set_function(self._newest_change_age)
        build = Info(
            "hasp_authz_build",
            "Version of hasp-authz and of Python.",
            registry=registry,
        )
        build.info({"version": __version__, "python": platform.python_version()})

    def _initialize_labels(self) -> None:
        # Series that exist from the start show as 0 instead of being absent,
        # so rate() and alerts see the first event.
        self._cache_counters = {
            result: self.cache_lookups.labels(result) for result in CACHE_RESULTS
        }
        for result in ("applied", "rejected"):
            self.route_reloads.labels(result)
        for outcome in Outcome:
            self.decisions.labels(outcome.value, NO_ROUTE)

    def observe_check(self, code: str, route: str | None, seconds: float) -> None:
        """Count one Check's decision and its duration."""
        labels = (code, route or NO_ROUTE)
        counter = self._decision_counters.get(labels)
        if counter is None:
            # labels() takes a lock and builds a key each time, so the child
            # counters are kept here. Codes and routes are bounded sets.
            counter = self.decisions.labels(*labels)
            self._decision_counters[labels] = counter
        counter.inc()
        self.check_duration.observe(seconds)

    def observe_shadow_denial(self, code: str, route: str | None) -> None:
        self.shadow_denials.labels(code, route or NO_ROUTE).inc()

    def observe_cache(self, result: str) -> None:
        """Count one cache lookup. Raises ValueError for a result not in the list."""
        counter = self._cache_counters.get(result)
        if counter is None:
            raise ValueError(
                f"unknown cache result {result!r}; expected {CACHE_RESULTS}"
            )
        counter.inc()

    def observe_redis_error(self) -> None:
        self.redis_errors.inc()

    def observe_change(self, published_at: float | None) -> None:
        """Record that a change message published at ``published_at`` was applied.

        ``published_at`` is epoch seconds, or None for a message without one
        (from an older publisher), which is then not counted.
        """
        if published_at is None or not math.isfinite(published_at):
            return
        # NOTE: publisher and server clocks differ, so a lag below 0 is clamped.
        self.change_lag.observe(max(0.0, self.clock() - published_at))
        if self.newest_change_at is None or published_at > self.newest_change_at:
            self.newest_change_at = published_at

    def _newest_change_age(self) -> float:
        if self.newest_change_at is None:
            return math.nan
        return max(0.0, self.clock() - self.newest_change_at)
