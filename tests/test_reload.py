"""Unit tests of the route reload; the SIGHUP test runs the real server."""

from __future__ import annotations

import logging

from hasp_authz.reload import RouteReloader
from hasp_authz.routes import DEFAULT_ROUTES_FILE, RouteTable

ONE_ROUTE = "routes:\n  - path: /v1/ai/chat\n    methods: [POST]\n    scope: ai:chat\n"


def test_reload_applies_valid_file(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(ONE_ROUTE, encoding="utf-8")
    applied: list[RouteTable] = []
    reloader = RouteReloader(path, applied.append)
    assert reloader.reload()
    assert len(applied) == 1
    assert [route.template for route in applied[0].routes] == ["/v1/ai/chat"]


def test_reload_rejects_bad_file_and_keeps_table(tmp_path, caplog):
    path = tmp_path / "routes.yaml"
    path.write_text(ONE_ROUTE.replace("ai:chat", "ai:unknown"), encoding="utf-8")
    applied: list[RouteTable] = []
    reloader = RouteReloader(path, applied.append)
    with caplog.at_level(logging.ERROR, logger="hasp_authz.reload"):
        assert not reloader.reload()
    assert applied == []
    assert reloader.rejected == 1
    assert "route file reload rejected; keeping the current table" in caplog.text


def test_reload_of_default_file_succeeds():
    applied: list[RouteTable] = []
    assert RouteReloader(DEFAULT_ROUTES_FILE, applied.append).reload()
    assert len(applied[0].routes) > 0
