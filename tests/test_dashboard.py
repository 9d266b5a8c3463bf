"""The Grafana dashboard in deploy/grafana queries only metrics that exist.

Every metric name in a panel query must be one that a hasp-authz server
exports, so a renamed metric fails here instead of showing an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hasp_authz.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/hasp-authz.json"
METRIC_NAME_RE = re.compile(r"\bhasp_authz_[a-z_]+")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def queries(dashboard: dict) -> list[str]:
    return [
        target["expr"]
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def exported_sample_names() -> set[str]:
    """Return every sample name of a server's registry, histograms included."""
    metrics = Metrics()
    metrics.observe_check("ALLOW", "/v1/ai/chat", 0.001)
    metrics.observe_change(metrics.clock())
    metrics.observe_shadow_denial("MISSING_SCOPE", "/v1/ai/chat")
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_dashboard_has_queries() -> None:
    assert len(queries(load_dashboard())) >= 10


@pytest.mark.parametrize("expr", queries(load_dashboard()))
def test_dashboard_query_names_exported_metrics(expr: str) -> None:
    names = set(METRIC_NAME_RE.findall(expr))

    assert names, f"no hasp_authz metric in {expr!r}"
    assert names <= exported_sample_names()


@pytest.mark.parametrize("expr", queries(load_dashboard()))
def test_dashboard_query_brackets_balanced(expr: str) -> None:
    for opening, closing in ("()", "{}", "[]"):
        assert expr.count(opening) == expr.count(closing), expr


def test_dashboard_queries_filter_instance() -> None:
    for expr in queries(load_dashboard()):
        assert 'instance=~"$instance"' in expr, expr


def test_dashboard_panel_ids_unique() -> None:
    ids = [panel["id"] for panel in all_panels(load_dashboard())]

    assert len(ids) == len(set(ids))


def test_dashboard_panels_do_not_overlap() -> None:
    occupied: set[tuple[int, int]] = set()
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        occupied |= cells


def test_dashboard_variables() -> None:
    variables = {
        variable["name"]: variable
        for variable in load_dashboard()["templating"]["list"]
    }

    assert variables["datasource"]["query"] == "prometheus"
    assert "hasp_authz_build_info" in variables["instance"]["definition"]
