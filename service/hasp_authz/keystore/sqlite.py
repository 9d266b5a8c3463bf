"""The SQLite key store, on the standard library's sqlite3.

Timestamps are stored as ISO-8601 text in UTC with microseconds and a ``+00:00``
offset, for example ``2025-01-31T12:00:00.000000+00:00``. Every value has the same
width, so text order is time order. Scopes are stored as a JSON array.

The connection runs in autocommit mode, and each write opens its own
``BEGIN IMMEDIATE`` transaction. The checks and the write of one call therefore see
the same rows, and a call that raises leaves the file unchanged. The database runs
in WAL mode with foreign keys on and a busy timeout, so several ``hasp-keys``
processes can share one file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from hasp_authz.keystore import (
    ApiKey,
    InvalidInput,
    KeyNotFound,
    KeyStoreError,
    KeyStoreUnavailable,
    Org,
    OrgExists,
    OrgNotFound,
    new_key_id,
    validate_key_hash,
    validate_key_id,
    validate_name,
    validate_org_id,
    validate_scopes,
)

# Each entry upgrades the schema by one version. Append new entries and never edit
# old ones. open() applies the entries newer than schema_version in one transaction.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE orgs (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                baa_active INTEGER NOT NULL DEFAULT 0 CHECK (baa_active IN (0, 1)),
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                org_id TEXT NOT NULL REFERENCES orgs (id),
                name TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE,
                scopes TEXT NOT NULL,
                created_at TEXT NOT NULL,
                revoked_at TEXT,
                expires_at TEXT,
                last_used_at TEXT
            )""",
            "CREATE INDEX api_keys_org_id ON api_keys (org_id)",
        ),
    ),
)

_SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
)"""


class SqliteKeyStore:
    """A KeyStore on one SQLite file. Use ``SqliteKeyStore.open`` to create one."""

    def __init__(self, connection: sqlite3.Connection, path: str):
        self._connection = connection
        self.path = path

    @classmethod
    def open(cls, path: str, busy_timeout: float = 5.0) -> SqliteKeyStore:
        """Open or create the database at ``path`` and bring its schema up to date.

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
            store._configure()
            store._migrate()
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

    def create_org(
        self, org_id: str, name: str | None = None, baa_active: bool = False
    ) -> Org:
        validate_org_id(org_id)
        name = org_id if name is None else name
        validate_name(name, "org name")
        now = _utcnow()
        org = Org(org_id, name, baa_active, created_at=now, updated_at=now)
        with self._transaction() as db:
            if self._org_row(org_id) is not None:
                raise OrgExists(
                    f"org {org_id!r} already exists: choose another id, or use "
                    f"'hasp-keys orgs baa {org_id} on|off' to change it"
                )
            db.execute(
                "INSERT INTO orgs (id, name, baa_active, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (org_id, name, int(baa_active), _to_text(now), _to_text(now)),
            )
        return org

    def get_org(self, org_id: str) -> Org:
        validate_org_id(org_id)
        with self._errors():
            row = self._org_row(org_id)
        if row is None:
            raise _org_not_found(org_id)
        return _org_from_row(row)

    def list_orgs(self) -> list[Org]:
        with self._errors():
            rows = self._connection.execute("SELECT * FROM orgs ORDER BY id")
            return [_org_from_row(row) for row in rows]

    def set_baa(self, org_id: str, active: bool) -> tuple[Org, bool]:
        validate_org_id(org_id)
        with self._transaction() as db:
            row = self._org_row(org_id)
            if row is None:
                raise _org_not_found(org_id)
            org = _org_from_row(row)
            if org.baa_active == active:
                return org, False
            now = _utcnow()
            db.execute(
                "UPDATE orgs SET baa_active = ?, updated_at = ? WHERE id = ?",
                (int(active), _to_text(now), org_id),
            )
        return replace(org, baa_active=active, updated_at=now), True

    def create_key(
        self,
        org_id: str,
        name: str,
        key_hash: str,
        scopes: Sequence[str],
        expires_at: datetime | None = None,
    ) -> ApiKey:
        validate_org_id(org_id)
        validate_name(name, "key name")
        validate_key_hash(key_hash)
        key = ApiKey(
            key_id=new_key_id(),
            org_id=org_id,
            name=name,
            key_hash=key_hash,
            scopes=validate_scopes(scopes),
            created_at=_utcnow(),
            expires_at=None if expires_at is None else _as_utc(expires_at),
        )
        with self._transaction():
            if self._org_row(org_id) is None:
                raise _org_not_found(org_id)
            self._insert_key(key)
        return key

    def get_key(self, key_id: str) -> ApiKey:
        validate_key_id(key_id)
        with self._errors():
            row = self._key_row(key_id)
        if row is None:
            raise _key_not_found(key_id)
        return _key_from_row(row)

    def list_keys(
        self, org_id: str | None = None, include_revoked: bool = True
    ) -> list[ApiKey]:
        if org_id is not None:
            self.get_org(org_id)
        query = "SELECT * FROM api_keys WHERE (? IS NULL OR org_id = ?)"
        if not include_revoked:
            query += " AND revoked_at IS NULL"
        with self._errors():
            rows = self._connection.execute(
                query + " ORDER BY created_at, id", (org_id, org_id)
            )
            return [_key_from_row(row) for row in rows]

    def revoke_key(self, key_id: str) -> tuple[ApiKey, bool]:
        validate_key_id(key_id)
        with self._transaction() as db:
            row = self._key_row(key_id)
            if row is None:
                raise _key_not_found(key_id)
            key = _key_from_row(row)
            if not key.active:
                return key, False
            now = _utcnow()
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ?",
                (_to_text(now), key_id),
            )
        return replace(key, revoked_at=now), True

    def schema_version(self) -> int:
        """Return the newest migration applied to the file, 0 for a new file."""
        with self._errors():
            exists = self._connection.execute(
                "SELECT 1 FROM sqlite_master"
                " WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                return 0
            row = self._connection.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version"
            ).fetchone()
        return row[0]

    def _insert_key(self, key: ApiKey) -> None:
        try:
            self._connection.execute(
                "INSERT INTO api_keys (id, org_id, name, key_hash, scopes,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key.key_id,
                    key.org_id,
                    key.name,
                    key.key_hash,
                    json.dumps(list(key.scopes)),
                    _to_text(key.created_at),
                    _to_text(key.expires_at),
                ),
            )
        except sqlite3.IntegrityError as exc:
            # The id has 100 random bits, so a clash almost surely means that the
            # same token hash was inserted twice.
            raise InvalidInput(
                "a key with this hash already exists: generate a new token"
            ) from exc

    def _org_row(self, org_id: str) -> sqlite3.Row | None:
        return self._connection.execute(
            "SELECT * FROM orgs WHERE id = ?", (org_id,)
        ).fetchone()

    def _key_row(self, key_id: str) -> sqlite3.Row | None:
        return self._connection.execute(
            "SELECT * FROM api_keys WHERE id = ?", (key_id,)
        ).fetchone()

    def _configure(self) -> None:
        db = self._connection
        db.execute("PRAGMA foreign_keys = ON")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() not in ("wal", "memory"):
            raise KeyStoreUnavailable(
                f"cannot open key store {self.path}: SQLite could not switch to WAL "
                f"mode (journal mode is {mode}), use a local file system"
            )

    def _migrate(self) -> None:
        latest = MIGRATIONS[-1][0]
        if self.schema_version() == latest:
            return
        # Re-read the version under the write lock, because another process may
        # have migrated the file in between.
        with self._transaction() as db:
            db.execute(_SCHEMA_VERSION_TABLE)
            current = self.schema_version()
            if current > latest:
                raise KeyStoreUnavailable(
                    f"key store {self.path} has schema version {current}, newer "
                    f"than version {latest} that this hasp-keys knows: upgrade it"
                )
            for version, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        db.execute(statement)
                    db.execute(
                        "INSERT INTO schema_version (version, applied_at)"
                        " VALUES (?, ?)",
                        (version, _to_text(_utcnow())),
                    )

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Convert sqlite3 errors into KeyStoreUnavailable."""
        try:
            yield
        except sqlite3.Error as exc:
            raise KeyStoreUnavailable(
                f"key store {self.path} failed ({exc}), check that the file is a "
                "hasp-keys database and that its directory is writable"
            ) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one write transaction, rolled back if it raises."""
        with self._errors():
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.rollback()
                raise
            self._connection.execute("COMMIT")


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


def _org_not_found(org_id: str) -> OrgNotFound:
    return OrgNotFound(
        f"org {org_id!r} not found: create it with 'hasp-keys orgs create {org_id}'"
    )


def _key_not_found(key_id: str) -> KeyNotFound:
    return KeyNotFound(
        f"key {key_id!r} not found: 'hasp-keys list' shows the existing key ids"
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise InvalidInput(
            f"expiry time {moment.isoformat()} has no time zone: pass an aware "
            "datetime, for example in UTC"
        )
    return moment.astimezone(UTC)


def _to_text(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _from_text(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _org_from_row(row: sqlite3.Row) -> Org:
    return Org(
        org_id=row["id"],
        name=row["name"],
        baa_active=bool(row["baa_active"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _key_from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        key_id=row["id"],
        org_id=row["org_id"],
        name=row["name"],
        key_hash=row["key_hash"],
        scopes=tuple(json.loads(row["scopes"])),
        created_at=datetime.fromisoformat(row["created_at"]),
        revoked_at=_from_text(row["revoked_at"]),
        expires_at=_from_text(row["expires_at"]),
        last_used_at=_from_text(row["last_used_at"]),
    )
