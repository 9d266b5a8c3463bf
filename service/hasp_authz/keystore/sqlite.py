"""The SQLite key store, on the standard library's sqlite3.

The schema and its timestamp format are in ``sqlite_schema``; the queries are
shared with PostgreSQL in ``sql``.

The connection runs in autocommit mode, and each write opens its own
``BEGIN IMMEDIATE`` transaction. The checks and the write of one call therefore see
the same rows, and a call that raises leaves the file unchanged. SQLite allows one
writer at a time, so change-log seq values are assigned in commit order. The
database runs in WAL mode with foreign keys on and a busy timeout, so several
``hasp-keys`` processes can share one file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hasp_authz.keystore import KeyStoreError, KeyStoreUnavailable
from hasp_authz.keystore.sql import SqlKeyStore
from hasp_authz.keystore.sqlite_schema import MIGRATIONS, VERSION_TABLE

# How often wait_for_changes polls, in seconds. SQLite has no notifications.
POLL_INTERVAL = 0.2


class SqliteKeyStore(SqlKeyStore):
    """A KeyStore on one SQLite file. Use ``SqliteKeyStore.open`` to create one."""

    migrations = MIGRATIONS
    version_table = VERSION_TABLE
    database_error = sqlite3.Error
    unique_violation = sqlite3.IntegrityError

    def __init__(self, connection: sqlite3.Connection, path: str):
        self._connection = connection
        self.path = path
        self.location = path

    @classmethod
    def open(
        cls, path: str, busy_timeout: float = 5.0, migrate: bool = True
    ) -> SqliteKeyStore:
        """Open or create the database at ``path`` and, by default, migrate it.

        A missing parent directory is created. ``busy_timeout`` is the time in
        seconds that a call waits for another process's write lock.
        Raises KeyStoreUnavailable when the file cannot be opened or migrated.
        """
        if path != ":memory:":
            _create_parent(path)
        try:
            connection = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise _open_failed(path, exc) from exc
        connection.row_factory = sqlite3.Row
        store = cls(connection, path)
        try:
            store._configure(busy_timeout)
            if migrate:
                store.migrate()
        except sqlite3.Error as exc:
            connection.close()
            raise _open_failed(path, exc) from exc
        except KeyStoreError:
            connection.close()
            raise
        return store

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> SqliteKeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_for_changes(self, timeout: float) -> None:
        time.sleep(min(max(timeout, 0.0), POLL_INTERVAL))

    def _execute(self, query: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._connection.execute(query, params)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._errors():
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._connection.rollback()
                raise
            self._connection.execute("COMMIT")

    def _unavailable(self, exc: Exception) -> KeyStoreUnavailable:
        return KeyStoreUnavailable(
            f"key store {self.path} failed ({exc}), check that the file is a "
            "hasp-keys database and that its directory is writable"
        )

    def _time_param(self, moment: datetime | None) -> str | None:
        if moment is None:
            return None
        return moment.astimezone(UTC).isoformat(timespec="microseconds")

    def _time_value(self, value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    def _version_table_exists(self) -> bool:
        row = self._connection.execute(
            "SELECT 1 FROM sqlite_master"
            " WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        return row is not None

    def _configure(self, busy_timeout: float) -> None:
        db = self._connection
        db.execute("PRAGMA foreign_keys = ON")
        mode = self._enable_wal(busy_timeout)
        if mode.lower() not in ("wal", "memory"):
            raise KeyStoreUnavailable(
                f"cannot open key store {self.path}: SQLite could not switch to WAL "
                f"mode (journal mode is {mode}), use a local file system"
            )

    def _enable_wal(self, busy_timeout: float) -> str:
        """Switch to WAL mode and return the journal mode now in force.

        NOTE: while another connection creates or migrates a new database file,
        SQLite can answer this pragma with "database is locked" at once instead
        of waiting for the busy timeout, so it is retried here until that timeout.
        """
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                return self._connection.execute("PRAGMA journal_mode = WAL").fetchone()[
                    0
                ]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)


def _create_parent(path: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyStoreUnavailable(
            f"cannot create the directory of key store {path} ({exc.strerror}), "
            "create it or choose another path in HASP_KEYSTORE_URL"
        ) from exc


def _open_failed(path: str, exc: sqlite3.Error) -> KeyStoreUnavailable:
    return KeyStoreUnavailable(
        f"cannot open key store {path} ({exc}), check that the path is a "
        "hasp-keys SQLite database that this user can read and write"
    )
