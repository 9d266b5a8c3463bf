"""Reload the route file on SIGHUP without dropping a request.

The new table is loaded and validated in full in a worker thread, so a large
file never stalls the event loop that serves Checks. It then replaces the old
table by one attribute assignment on the event loop. A Check reads the table
once per decision, so Checks in flight finish with the table they started
with. A file that fails to load or validate, for any reason, is rejected with
an error line and the old table stays in use. SIGHUPs that arrive during a
reload are applied one after another, so the last file read is the newest.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from hasp_authz.routes import RouteTable, load_route_table

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
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()

    def reload(self) -> bool:
        """Load the route file and apply it. Returns False if it was rejected."""
        try:
            table = load_route_table(self.routes_file)
        except Exception as error:
            return self._reject(error)
        return self._apply(table)

    async def reload_in_thread(self) -> bool:
        """Load the route file in a worker thread, then apply it on the loop."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                table = await asyncio.to_thread(load_route_table, self.routes_file)
            except Exception as error:
                return self._reject(error)
            return self._apply(table)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on every SIGHUP that reaches this process."""
        loop.add_signal_handler(signal.SIGHUP, self._on_signal)

    def _on_signal(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload_in_thread())
        # The loop keeps only weak references to tasks, so keep one until done.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _apply(self, table: RouteTable) -> bool:
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

    def _reject(self, error: Exception) -> bool:
        self.rejected += 1
        self._report("rejected")
        log.error(
            "route file reload rejected; keeping the current table: %s",
            error,
            extra={"event": "routes_reload_rejected"},
        )
        return False

    def _report(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)
