"""Measure a full sync of N keys from a SQLite key store into a fresh Redis.

``make bench-sync`` runs it for 1,000 and 1,000,000 keys. It fills the store
with direct SQL (inserting a million keys one ``hasp-keys create`` at a time
would take hours), then times ``hasp-keys sync`` as a child process and reads
that child's peak resident memory and Redis' own memory use.

Usage: python -m hasp_authz.dev.bench_sync [--keys N ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis

from hasp_authz.dev.redis_server import RedisServer
from hasp_authz.keystore.sqlite import SqliteKeyStore

BIN_DIR = Path(sys.executable).parent
ORG_ID = "bench-org"
INSERT_BATCH = 50_000


@dataclass(frozen=True)
class SyncMeasurement:
    keys: int
    seconds: float
    peak_rss_mib: float
    redis_used_mib: float


def fill_store(path: Path, count: int) -> None:
    """Create one org and ``count`` active keys with random hashes."""
    store = SqliteKeyStore.open(str(path))
    try:
        store.create_org(ORG_ID, baa_active=True)
        connection = store._connection
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
        alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
        for start in range(0, count, INSERT_BATCH):
            rows = []
            for _ in range(min(INSERT_BATCH, count - start)):
                key_id = "key_" + "".join(secrets.choice(alphabet) for _ in range(20))
                key_hash = hashlib.sha256(secrets.token_bytes(20)).hexdigest()
                rows.append((key_id, ORG_ID, "bench", key_hash, "ai:chat", now))
            connection.execute("BEGIN")
            connection.executemany(
                "INSERT INTO api_keys (id, org_id, name, key_hash, scopes, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            connection.execute("COMMIT")
    finally:
        store.close()


def measure_sync(store_path: Path, workdir: Path, count: int) -> SyncMeasurement:
    """Run ``hasp-keys sync`` against an empty Redis and measure it."""
    with RedisServer(workdir=workdir) as server:
        env = {
            **os.environ,
            "HASP_KEYSTORE_URL": f"sqlite:///{store_path}",
            "HASP_REDIS_URL": server.url,
        }
        started = time.perf_counter()
        child = subprocess.Popen(
            [str(BIN_DIR / "hasp-keys"), "sync"], env=env, stdout=subprocess.DEVNULL
        )
        # wait4 returns the resource usage of this one child, peak RSS included.
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"hasp-keys sync exited with code {child.returncode}")
        client = redis.Redis.from_url(server.url)
        try:
            synced = client.dbsize()
            used = client.info("memory")["used_memory"]
        finally:
            client.close()
    if synced < count:
        raise RuntimeError(
            f"Redis contains only {synced} records after syncing {count} keys"
        )
    # Linux reports ru_maxrss in KiB.
    return SyncMeasurement(count, seconds, usage.ru_maxrss / 1024, used / 2**20)


def render(measurements: list[SyncMeasurement]) -> str:
    """Return the results as a Markdown table."""
    lines = [
        "| keys | sync time (s) | keys per second | peak RSS of hasp-keys (MiB) "
        "| Redis used_memory (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for item in measurements:
        rate = item.keys / item.seconds
        lines.append(
            f"| {item.keys:,} | {item.seconds:.2f} | {rate:,.0f} "
            f"| {item.peak_rss_mib:,.0f} | {item.redis_used_mib:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure hasp-keys sync.")
    parser.add_argument(
        "--keys", type=int, nargs="+", default=[1_000, 1_000_000],
        help="store sizes to measure (default: 1000 1000000)",
    )  # fmt: skip
    arguments = parser.parse_args(argv)
    measurements = []
    with tempfile.TemporaryDirectory(prefix="hasp-bench-sync-") as directory:
        workdir = Path(directory)
        for count in arguments.keys:
            store_path = workdir / f"keys-{count}.db"
            fill_store(store_path, count)
            measurements.append(measure_sync(store_path, workdir, count))
            store_path.unlink()
            print(f"synced {count:,} keys", file=sys.stderr)
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Linux {platform.release()}\n"
    )
    print(render(measurements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
