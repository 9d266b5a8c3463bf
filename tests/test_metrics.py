"""Unit tests of the Prometheus metrics, each in a registry of its own."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hasp_authz import __version__
from hasp_authz.metrics import CACHE_RESULTS, Metrics


class FakeClock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name}{labels or ''}"
    return value


def test_registries_are_independent():
    first = Metrics(CollectorRegistry())
    second = Metrics(CollectorRegistry())
    first.observe_check("ALLOW", "/v1/ai/chat", 0.001)
    labels = {"code": "ALLOW", "route": "/v1/ai/chat"}
    assert sample(first, "hasp_authz_decisions_total", labels) == 1
    assert (
        second.registry.get_sample_value("hasp_authz_decisions_total", labels) is None
    )


def test_decision_without_route_is_labelled_none():
    metrics = Metrics()
    metrics.observe_check("NOT_FOUND", None, 0.002)
    metrics.observe_check("NOT_FOUND", None, 0.002)
    labels = {"code": "NOT_FOUND", "route": "none"}
    assert sample(metrics, "hasp_authz_decisions_total", labels) == 2


def test_check_duration_bucket_bounds():
    metrics = Metrics()
    metrics.observe_check("ALLOW", "/v1/ai/chat", 0.0002)
    metrics.observe_check("ALLOW", "/v1/ai/chat", 0.4)
    name = "hasp_authz_check_duration_seconds_bucket"
    assert sample(metrics, name, {"le": "0.00025"}) == 1
    assert sample(metrics, name, {"le": "0.25"}) == 1
    assert sample(metrics, name, {"le": "0.5"}) == 2
    assert sample(metrics, "hasp_authz_check_duration_seconds_count") == 2


def test_every_outcome_and_cache_result_starts_at_zero():
    metrics = Metrics()
    for result in CACHE_RESULTS:
        labels = {"result": result}
        assert sample(metrics, "hasp_authz_cache_lookups_total", labels) == 0
    labels = {"code": "AUTH_UNAVAILABLE", "route": "none"}
    assert sample(metrics, "hasp_authz_decisions_total", labels) == 0


def test_cache_lookup_counts_by_result():
    metrics = Metrics()
    metrics.observe_cache("hit")
    metrics.observe_cache("hit")
    metrics.observe_cache("negative_hit")
    assert sample(metrics, "hasp_authz_cache_lookups_total", {"result": "hit"}) == 2
    labels = {"result": "negative_hit"}
    assert sample(metrics, "hasp_authz_cache_lookups_total", labels) == 1


def test_cache_lookup_rejects_unknown_result():
    with pytest.raises(ValueError, match="unknown cache result"):
        Metrics().observe_cache("client-chosen")


def test_redis_errors_count():
    metrics = Metrics()
    metrics.observe_redis_error()
    assert sample(metrics, "hasp_authz_redis_errors_total") == 1


def test_shadow_denials_count_by_code_and_route():
    metrics = Metrics()
    metrics.observe_shadow_denial("MISSING_SCOPE", "/v1/ai/chat")
    labels = {"code": "MISSING_SCOPE", "route": "/v1/ai/chat"}
    assert sample(metrics, "hasp_authz_shadow_denials_total", labels) == 1


def test_newest_change_age_is_nan_before_any_change():
    metrics = Metrics()
    assert math.isnan(sample(metrics, "hasp_authz_newest_change_age_seconds"))


def test_change_lag_and_newest_change_age():
    clock = FakeClock(1_000.0)
    metrics = Metrics(clock=clock)
    metrics.observe_change(999.7)
    metrics.observe_change(999.5)
    clock.now = 1_002.0
    assert sample(metrics, "hasp_authz_newest_change_age_seconds") == pytest.approx(2.3)
    assert sample(metrics, "hasp_authz_change_lag_seconds_count") == 2
    lag_sum = sample(metrics, "hasp_authz_change_lag_seconds_sum")
    assert lag_sum == pytest.approx(0.8)


def test_change_lag_clamps_clock_skew():
    clock = FakeClock(1_000.0)
    metrics = Metrics(clock=clock)
    metrics.observe_change(1_005.0)
    metrics.observe_change(None)
    metrics.observe_change(math.inf)
    assert sample(metrics, "hasp_authz_change_lag_seconds_count") == 1
    assert sample(metrics, "hasp_authz_change_lag_seconds_sum") == 0
    assert sample(metrics, "hasp_authz_newest_change_age_seconds") == 0


def test_build_info_names_version_and_python():
    metrics = Metrics()
    text = generate_latest(metrics.registry).decode()
    assert "hasp_authz_build_info{" in text
    assert f'version="{__version__}"' in text
    assert 'python="3.' in text
