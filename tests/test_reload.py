"""Unit tests of the route reload; the SIGHUP test runs the real server."""

from __future__ import annotations

import asyncio
import logging
import threading

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


def test_reload_rejects_any_error(tmp_path, caplog):
    path = tmp_path / "routes.yaml"
    path.write_text("routes: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    results: list[str] = []
    reloader = RouteReloader(path, lambda table: None, on_result=results.append)

    with caplog.at_level(logging.ERROR, logger="hasp_authz.reload"):
        assert not reloader.reload()
    assert results == ["rejected"]
    assert "nested too deeply" in caplog.text


def test_reload_in_thread_applies_on_loop(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(ONE_ROUTE, encoding="utf-8")
    applied: list[int] = []
    loop_threads: list[int] = []

    async def main() -> bool:
        loop_threads.append(threading.get_ident())
        # Only the loop's own thread may replace the table.
        reloader = RouteReloader(
            path, lambda table: applied.append(threading.get_ident())
        )
        return await reloader.reload_in_thread()

    assert asyncio.run(main())
    assert applied == loop_threads


def test_reload_in_thread_rejects_missing_file(tmp_path):
    results: list[str] = []
    reloader = RouteReloader(
        tmp_path / "absent.yaml", lambda table: None, on_result=results.append
    )

    assert not asyncio.run(reloader.reload_in_thread())
    assert results == ["rejected"]
