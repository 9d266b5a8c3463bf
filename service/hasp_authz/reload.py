"""Reload the route file on SIGHUP without dropping a request.

The new table is loaded and validated in full before it replaces the old one,
by one attribute assignment on the event loop. A Check reads the table once
per decision, so Checks in flight finish with the table they started with. A
file that fails to load or validate is rejected with an error line and the
old table stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from hasp_authz.routes import RouteFileError, RouteTable, load_route_table

log = logging.getLogger(__name__)


class RouteReloader:
    """Loads ``routes_file`` again and hands a valid table to ``apply``."""

    def __init__(
        self,
        routes_file: Path,
        apply: Callable[[RouteTable], None],
        on_result: Callable[[str], None] | None = None,
    ):
        self.routes_file = routes_file
        self.apply = apply
        # Called with "applied" or "rejected" after each reload.
        self.on_result = on_result
        self.reloads = 0
        self.rejected = 0

    def reload(self) -> bool:
        """Load the route file and apply it. Returns False if it was rejected."""
        try:
            table = load_route_table(self.routes_file)
        except RouteFileError as error:
            self.rejected += 1
            self._report("rejected")
            log.error(
                "route file reload rejected; keeping the current table: %s",
                error,
                extra={"event": "routes_reload_rejected"},
            )
            return False
        self.apply(table)
        self.reloads += 1
        self._report("applied")
        log.info(
            "route file %s reloaded with %d routes",
            self.routes_file,
            len(table.routes),
            extra={"event": "routes_reloaded", "routes": len(table.routes)},
        )
        return True

    def _report(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on every SIGHUP that reaches this process."""
        loop.add_signal_handler(signal.SIGHUP, self.reload)
