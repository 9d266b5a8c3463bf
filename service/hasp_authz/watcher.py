"""``hasp-keys sync --watch``: keep the Redis copy complete and fresh.

The watcher does a full load at start, then follows the key store's change log
(``key_changes``, filled by database triggers, so plain SQL writes by another
program count too). On PostgreSQL a NOTIFY wakes it at once; on SQLite it polls.
Each change is re-read from the store and written to Redis with a change
message, so the servers drop their cached entry.

It also repairs drift. When the completeness marker disappears (Redis restarted
empty or was flushed) it reloads everything, and a periodic full sync removes
records for keys that are gone from the store. Last-used times that the servers
collect in Redis are copied into the store.

A new primary also gets a full reload: the watcher compares the ``run_id`` of
the primary (every primary, on a cluster) at each marker check. Redis
replicates asynchronously, so a Sentinel or cluster failover can lose the
last writes before it, and a cluster node that restarts empty loses its share
of the records while the marker, stored on another node, stays. The reload
restores both cases.

Staleness bounds while Redis and the store are up: a change reaches Redis one
poll interval (SQLite) or one round trip (PostgreSQL) after its commit. A lost
copy, or a new primary, is reloaded within ``marker_check`` seconds plus the
time of a full load.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from hasp_authz.keystore import (
    Change,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    OrgNotFound,
    open_keystore,
)
from hasp_authz.publisher import Publisher, PublishError, connect, full_sync
from hasp_authz.records import RedisLayout
from hasp_authz.redis_clients import (
    REDIS_ERRORS,
    SyncClient,
    close_sync_client,
    primary_run_ids,
    refresh_sentinel_primary_sync,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WatchIntervals:
    """How often the watcher does each job, in seconds."""

    # Maximum wait for a change notification before polling the log anyway.
    wait: float = 0.2
    marker_check: float = 1.0
    full_sync: float = 300.0
    last_used: float = 60.0
    # Wait after a failed round before the next; doubles up to retry_max.
    retry_min: float = 0.2
    retry_max: float = 5.0


class SyncWatcher:
    """Follows the store's change log and keeps the Redis copy in step."""

    def __init__(
        self,
        store: KeyStore,
        client: SyncClient,
        layout: RedisLayout,
        intervals: WatchIntervals = WatchIntervals(),
    ):
        self.store = store
        self.client = client
        self.layout = layout
        self.intervals = intervals
        self.publisher = Publisher(client, layout)
        self.cursor = 0
        # Run ids of the primaries that the last full sync wrote to.
        self.primaries: frozenset[str] = frozenset()
        self.last_used_since = 0.0
        self._next_full_sync = 0.0
        self._next_marker_check = 0.0
        self._next_last_used = 0.0

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set. Errors are logged and retried, never raised."""
        delay = self.intervals.retry_min
        failing = False
        while not stop.is_set():
            try:
                self.run_once()
            except (*REDIS_ERRORS, PublishError, KeyStoreError) as error:
                if not failing:
                    log.error("sync round failed, retrying: %s", error)
                failing = True
                stop.wait(delay)
                delay = min(delay * 2, self.intervals.retry_max)
                continue
            if failing:
                log.info("sync recovered")
                failing = False
            delay = self.intervals.retry_min
            self.store.wait_for_changes(self.intervals.wait)
        self._copy_last_used()

    def run_once(self) -> None:
        """Do whatever is due: full sync, marker check, changes, last-used copy."""
        now = time.monotonic()
        if now >= self._next_full_sync:
            self.full_sync("scheduled")
        elif now >= self._next_marker_check:
            self._next_marker_check = now + self.intervals.marker_check
            # A demoted primary that returns still replies until the
            # Sentinels reconfigure it, so the watcher queries them itself and
            # drops its connections to the old one before it reads or writes.
            primary = refresh_sentinel_primary_sync(self.client)
            if primary is not None:
                log.warning("Redis primary changed to %s:%d", *primary)
            if not self.client.exists(self.layout.complete_marker):
                self.full_sync("the completeness marker is missing")
            elif primary_run_ids(self.client) != self.primaries:
                self.full_sync("a new Redis primary (failover or restart)")
        self.apply_changes()
        if time.monotonic() >= self._next_last_used:
            self._copy_last_used()
            self._next_last_used = time.monotonic() + self.intervals.last_used

    def full_sync(self, reason: str) -> None:
        """Reload everything. Changes logged from now on are applied after it."""
        cursor = self.store.latest_change_seq()
        started = time.monotonic()
        # Read before the load: a failover during the load then shows up as
        # a change at the next marker check, and the copy is loaded again.
        primaries = primary_run_ids(self.client)
        result = full_sync(self.store, self.client, self.layout)
        self.primaries = primaries
        self.cursor = max(self.cursor, cursor)
        now = time.monotonic()
        self._next_full_sync = now + self.intervals.full_sync
        self._next_marker_check = now + self.intervals.marker_check
        log.info(
            "full sync (%s): %d keys, %d orgs, %d stale records removed in %.2f s",
            reason, result.keys, result.orgs, result.removed, now - started,
        )  # fmt: skip

    def apply_changes(self) -> int:
        """Publish every logged change after the cursor; return how many."""
        applied = 0
        while True:
            changes = self.store.changes_since(self.cursor)
            if not changes:
                return applied
            for change in changes:
                self._apply(change)
                self.cursor = change.seq
                applied += 1

    def _apply(self, change: Change) -> None:
        if change.kind == "key" and change.key_hash:
            try:
                self.publisher.publish_key(self.store.get_key_by_hash(change.key_hash))
            except KeyNotFound:
                self.publisher.remove_key(change.key_hash)
        elif change.kind == "org" and change.org_id:
            try:
                self.publisher.publish_org(self.store.get_org(change.org_id))
            except OrgNotFound:
                self.publisher.remove_org(change.org_id)
        else:
            log.warning(
                "skipping malformed change seq=%d kind=%s", change.seq, change.kind
            )

    def _copy_last_used(self) -> None:
        """Copy last-used times newer than the previous copy into the store."""
        try:
            entries = self.client.zrangebyscore(
                self.layout.last_used, self.last_used_since, "+inf", withscores=True
            )
            if not entries:
                return
            times = {
                _text(key_id): datetime.fromtimestamp(score, UTC)
                for key_id, score in entries
            }
            self.store.record_last_used(times)
            self.last_used_since = max(score for _, score in entries)
        except (*REDIS_ERRORS, KeyStoreError) as error:
            log.warning("copying last-used times failed, will retry: %s", error)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Settings(Protocol):
    keystore_url: str
    redis_url: str
    redis_prefix: str


def add_watch_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--watch`` and its interval options to the ``sync`` command."""
    defaults = WatchIntervals()
    parser.add_argument(
        "--watch",
        action="store_true",
        help="after the full sync, keep following the key store until stopped",
    )
    options = (
        ("--poll-seconds", "wait", "longest wait for a change before polling"),
        ("--marker-check-seconds", "marker_check", "interval of the marker check"),
        ("--full-sync-seconds", "full_sync", "interval of the full sync"),
        ("--last-used-seconds", "last_used", "interval of the last-used copy"),
    )
    for flag, field_name, text in options:
        default = getattr(defaults, field_name)
        parser.add_argument(
            flag,
            dest=f"watch_{field_name}",
            type=_positive_seconds,
            default=default,
            metavar="SECONDS",
            help=f"with --watch: {text}, in seconds (default {default:g})",
        )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < 86400):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected seconds above 0 and below 86400"
        )
    return value


def watch(args: argparse.Namespace, settings: _Settings) -> int:
    """Run the watcher until SIGTERM or SIGINT; return the exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    intervals = WatchIntervals(
        wait=args.watch_wait,
        marker_check=args.watch_marker_check,
        full_sync=args.watch_full_sync,
        last_used=args.watch_last_used,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    client = _connect_until_stopped(settings.redis_url, stop, intervals)
    if client is None:
        log.info("sync watcher stopped before a Redis Cluster node replied")
        return 0
    with closing(open_keystore(settings.keystore_url)) as store:
        watcher = SyncWatcher(
            store, client, RedisLayout(settings.redis_prefix), intervals
        )
        log.info("watching the key store for changes; %r", intervals)
        watcher.run(stop)
    close_sync_client(client)
    log.info("sync watcher stopped")
    return 0


def _connect_until_stopped(
    url: str, stop: threading.Event, intervals: WatchIntervals
) -> SyncClient | None:
    """Create the watcher's client, retrying while no cluster node replies.

    Only a cluster client connects when it is created; the others connect on
    their first command and are retried by the watcher's rounds. Returns None
    when ``stop`` is set first. Raises InvalidRedisUrl for a malformed URL.
    """
    delay = intervals.retry_min
    failing = False
    while not stop.is_set():
        try:
            return connect(url, timeout=2.0)
        except PublishError as error:
            if not failing:
                log.error("connecting to Redis failed, retrying: %s", error)
            failing = True
        stop.wait(delay)
        delay = min(delay * 2, intervals.retry_max)
    return None
