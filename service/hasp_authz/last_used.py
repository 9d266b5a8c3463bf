"""Record when each key was last used, and write the times to Redis in batches.

The Check path calls ``record``, which only updates a dict (key id to the
latest epoch time), so it never waits on Redis and cannot fail a Check. A
background task calls ``flush`` every HASP_LAST_USED_FLUSH_SECONDS. A flush
writes the keys used since the previous flush into the sorted set
``{prefix}last_used`` with ``ZADD ... GT``, so the latest time from any process
wins. ``ZADD GT`` needs Redis 6.2 or newer. The sync copies that sorted set into
the key store's last-used times.

A failed flush keeps its times and merges them into the next one. The pending
dict holds at most one entry per key that resolved, so it is bounded by the
number of keys in the copy.
"""

from __future__ import annotations

import asyncio
import logging

from hasp_authz.records import RedisLayout
from hasp_authz.redis_clients import REDIS_ERRORS, AsyncClient

log = logging.getLogger(__name__)

# Members per ZADD command. All commands of one flush go in one pipeline.
ZADD_BATCH_SIZE = 1000


class LastUsedRecorder:
    """Coalesces key last-used times in memory and flushes them to Redis."""

    def __init__(self, client: AsyncClient, layout: RedisLayout):
        self.client = client
        self.layout = layout
        self.pending: dict[str, float] = {}
        self._failure_logged = False

    def record(self, key_id: str, used_at: float) -> None:
        """Note that ``key_id`` was used at ``used_at`` (epoch seconds)."""
        if used_at > self.pending.get(key_id, 0.0):
            self.pending[key_id] = used_at

    async def flush(self) -> bool:
        """Write the pending times to Redis. Returns False when Redis failed.

        On failure the times stay pending, and a later record of the same key
        keeps whichever time is later.
        """
        if not self.pending:
            return True
        batch, self.pending = self.pending, {}
        try:
            await self._write(batch)
        except REDIS_ERRORS as error:
            self._restore(batch)
            self._log_failure(len(batch), error)
            return False
        except BaseException:
            # A flush cancelled at shutdown keeps its times for the final flush.
            self._restore(batch)
            raise
        if self._failure_logged:
            log.info("last-used times written to Redis again (%d keys)", len(batch))
            self._failure_logged = False
        return True

    async def run(self, interval_seconds: float) -> None:
        """Flush every ``interval_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.flush()
            except Exception:
                # A bug here must not end the task, so later flushes still run.
                log.exception("last-used flush failed unexpectedly")

    async def _write(self, batch: dict[str, float]) -> None:
        items = list(batch.items())
        async with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(items), ZADD_BATCH_SIZE):
                chunk = dict(items[start : start + ZADD_BATCH_SIZE])
                pipe.zadd(self.layout.last_used, chunk, gt=True)
            await pipe.execute()

    def _restore(self, batch: dict[str, float]) -> None:
        for key_id, used_at in batch.items():
            self.record(key_id, used_at)

    def _log_failure(self, count: int, error: Exception) -> None:
        if self._failure_logged:
            log.debug(
                "last-used flush failed again: %s: %s", type(error).__name__, error
            )
            return
        self._failure_logged = True
        log.warning(
            "writing last-used times of %d keys to Redis failed (%s: %s); keeping "
            "them for the next flush",
            count,
            type(error).__name__,
            error,
        )
