"""A bug below the servicer still gives Envoy a documented 503, never an error.

These run the servicer in-process with a broken collaborator, which no real
component can be made to be: an authorizer that returns an allow without a
key, and metrics whose update raises.
"""

from __future__ import annotations

import asyncio
import json

from hasp_authz.decision import Decision
from hasp_authz.metrics import Metrics
from hasp_authz.outcomes import Outcome
from hasp_authz.servicer import AuthorizationServicer
from test_servicer import check_request


class Context:
    """The one ServicerContext method that the servicer calls."""

    def time_remaining(self) -> float:
        return 0.5


class AllowWithoutKey:
    """An authorizer with a bug: it allows but names no key."""

    routes = None

    def decide_now(self, request) -> Decision:
        return Decision(Outcome.ALLOW)


class BrokenMetrics(Metrics):
    def observe_check(self, code, route, seconds) -> None:
        raise RuntimeError("metrics bug")


def run_check(servicer: AuthorizationServicer):
    return asyncio.run(servicer.Check(check_request(), Context()))


def test_response_bug_becomes_503() -> None:
    servicer = AuthorizationServicer(AllowWithoutKey(), budget_seconds=0.2)

    response = run_check(servicer)

    assert response.denied_response.status.code == 503
    body = json.loads(response.denied_response.body)
    assert body["error"]["code"] == "AUTH_UNAVAILABLE"


def test_metrics_bug_keeps_response(caplog) -> None:
    servicer = AuthorizationServicer(
        AllowWithoutKey(), budget_seconds=0.2, metrics=BrokenMetrics()
    )

    response = run_check(servicer)

    assert response.denied_response.status.code == 503
    assert "recording a Check's metrics and log line failed" in caplog.text
