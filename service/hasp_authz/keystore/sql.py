"""Key store operations written once in SQL that both SQLite and PostgreSQL run.

``SqlKeyStore`` implements the KeyStore protocol on a DB-API connection. A backend
subclass supplies the connection, transactions, the conversion of timestamps and
database errors, and its list of schema migrations. Queries here use ``?``
placeholders, which the PostgreSQL backend rewrites to ``%s``.

Scopes are stored as one text value of scope names separated by single spaces,
for example ``ai:chat control:read``, the same form as the x-hasp-scopes header.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

from hasp_authz.keystore import (
    ApiKey,
    Change,
    InvalidInput,
    KeyNotFound,
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
    validate_time,
)

# A migration is a schema version and the statements that upgrade the previous
# version to it. Append new entries and never edit old ones.
Migration = tuple[int, tuple[str, ...]]

_CHANGE_COLUMNS = "seq, kind, key_id, key_hash, org_id, changed_at"


class SqlKeyStore:
    """The KeyStore operations. Subclasses implement the hooks below."""

    migrations: ClassVar[tuple[Migration, ...]]
    # DDL of the table that records applied migrations, run before migrating.
    version_table: ClassVar[str]
    # Appended to a SELECT that reads a row the same transaction then updates.
    lock_clause: ClassVar[str] = ""
    database_error: ClassVar[type[Exception]]
    unique_violation: ClassVar[type[Exception]]
    # The file path or server address shown in messages, without any password.
    location: str

    def _execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement and return the DB-API cursor."""
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[None]:
        """Run the block in one write transaction, rolled back if it raises."""
        raise NotImplementedError

    def _unavailable(self, exc: Exception) -> KeyStoreUnavailable:
        raise NotImplementedError

    def _time_param(self, moment: datetime | None) -> Any:
        raise NotImplementedError

    def _time_value(self, value: Any) -> datetime | None:
        raise NotImplementedError

    def _version_table_exists(self) -> bool:
        raise NotImplementedError

    def _lock_migrations(self) -> None:
        """Block other migrators until the current transaction ends."""

    def create_org(
        self, org_id: str, name: str | None = None, baa_active: bool = False
    ) -> Org:
        validate_org_id(org_id)
        name = org_id if name is None else name
        validate_name(name, "org name")
        now = datetime.now(UTC)
        org = Org(org_id, name, baa_active, created_at=now, updated_at=now)
        stamp = self._time_param(now)
        with self._transaction():
            if self._org_row(org_id) is not None:
                raise _org_exists(org_id)
            try:
                self._execute(
                    "INSERT INTO orgs (id, name, baa_active, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (org_id, name, baa_active, stamp, stamp),
                )
            except self.unique_violation as exc:
                # Another writer inserted the same id after the check above.
                raise _org_exists(org_id) from exc
        return org

    def get_org(self, org_id: str) -> Org:
        validate_org_id(org_id)
        with self._errors():
            row = self._org_row(org_id)
        if row is None:
            raise _org_not_found(org_id)
        return self._org_from_row(row)

    def list_orgs(self) -> list[Org]:
        with self._errors():
            rows = self._execute("SELECT * FROM orgs ORDER BY id").fetchall()
        return [self._org_from_row(row) for row in rows]

    def set_baa(self, org_id: str, active: bool) -> tuple[Org, bool]:
        validate_org_id(org_id)
        with self._transaction():
            row = self._org_row(org_id, lock=True)
            if row is None:
                raise _org_not_found(org_id)
            org = self._org_from_row(row)
            if org.baa_active == active:
                return org, False
            now = datetime.now(UTC)
            self._execute(
                "UPDATE orgs SET baa_active = ?, updated_at = ? WHERE id = ?",
                (active, self._time_param(now), org_id),
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
            created_at=datetime.now(UTC),
            expires_at=None
            if expires_at is None
            else validate_time(expires_at, "expiry time"),
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
        return self._key_from_row(row)

    def get_key_by_hash(self, key_hash: str) -> ApiKey:
        validate_key_hash(key_hash)
        with self._errors():
            row = self._execute(
                "SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
        if row is None:
            # The hash is not shown, as everywhere else.
            raise KeyNotFound("no key with this hash: it was deleted or never existed")
        return self._key_from_row(row)

    def list_keys(
        self, org_id: str | None = None, include_revoked: bool = True
    ) -> list[ApiKey]:
        conditions, params = [], []
        if org_id is not None:
            self.get_org(org_id)
            conditions.append("org_id = ?")
            params.append(org_id)
        if not include_revoked:
            conditions.append("revoked_at IS NULL")
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        with self._errors():
            rows = self._execute(
                f"SELECT * FROM api_keys{where} ORDER BY created_at, id", params
            ).fetchall()
        return [self._key_from_row(row) for row in rows]

    def revoke_key(self, key_id: str) -> tuple[ApiKey, bool]:
        validate_key_id(key_id)
        with self._transaction():
            row = self._key_row(key_id, lock=True)
            if row is None:
                raise _key_not_found(key_id)
            key = self._key_from_row(row)
            if not key.active:
                return key, False
            now = datetime.now(UTC)
            self._execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ?",
                (self._time_param(now), key_id),
            )
        return replace(key, revoked_at=now), True

    def record_last_used(self, times: dict[str, datetime]) -> int:
        if not times:
            return 0
        updates = []
        for key_id, moment in times.items():
            validate_key_id(key_id)
            updates.append((key_id, self._time_param(validate_time(moment, "time"))))
        changed = 0
        with self._transaction():
            for key_id, moment in updates:
                cursor = self._execute(
                    "UPDATE api_keys SET last_used_at = ? WHERE id = ?"
                    " AND (last_used_at IS NULL OR last_used_at < ?)",
                    (moment, key_id, moment),
                )
                changed += cursor.rowcount
        return changed

    def latest_change_seq(self) -> int:
        with self._errors():
            row = self._execute(
                "SELECT COALESCE(MAX(seq), 0) AS seq FROM key_changes"
            ).fetchone()
        return int(row["seq"])

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        if seq < 0:
            raise InvalidInput(f"invalid change seq {seq}: expected 0 or more")
        if limit < 1:
            raise InvalidInput(f"invalid change limit {limit}: expected 1 or more")
        with self._errors():
            rows = self._execute(
                f"SELECT {_CHANGE_COLUMNS} FROM key_changes WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [self._change_from_row(row) for row in rows]

    def prune_changes(self, before_seq: int) -> int:
        with self._transaction():
            cursor = self._execute(
                "DELETE FROM key_changes WHERE seq < ?", (before_seq,)
            )
        return cursor.rowcount

    def schema_version(self) -> int:
        with self._errors():
            if not self._version_table_exists():
                return 0
            row = self._execute(
                "SELECT COALESCE(MAX(version), 0) AS version FROM schema_version"
            ).fetchone()
        return int(row["version"])

    def migrate(self) -> int:
        latest = self.migrations[-1][0]
        current = self.schema_version()
        self._check_known(current, latest)
        if current == latest:
            return current
        # Re-read the version under the migration lock, because another process
        # may have migrated the database in between.
        with self._transaction():
            self._lock_migrations()
            self._execute(self.version_table)
            current = self.schema_version()
            self._check_known(current, latest)
            for version, statements in self.migrations:
                if version <= current:
                    continue
                for statement in statements:
                    self._execute(statement)
                self._execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, self._time_param(datetime.now(UTC))),
                )
        return latest

    def _check_known(self, current: int, latest: int) -> None:
        if current > latest:
            raise KeyStoreUnavailable(
                f"key store {self.location} has schema version {current}, newer "
                f"than version {latest} that this hasp-keys knows: upgrade it"
            )

    def _insert_key(self, key: ApiKey) -> None:
        try:
            self._execute(
                "INSERT INTO api_keys (id, org_id, name, key_hash, scopes,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key.key_id,
                    key.org_id,
                    key.name,
                    key.key_hash,
                    " ".join(key.scopes),
                    self._time_param(key.created_at),
                    self._time_param(key.expires_at),
                ),
            )
        except self.unique_violation as exc:
            # The id has 100 random bits, so a clash almost surely means that the
            # same token hash was inserted twice.
            raise InvalidInput(
                "a key with this hash already exists: generate a new token"
            ) from exc

    def _org_row(self, org_id: str, lock: bool = False) -> Any:
        query = "SELECT * FROM orgs WHERE id = ?"
        if lock:
            query += self.lock_clause
        return self._execute(query, (org_id,)).fetchone()

    def _key_row(self, key_id: str, lock: bool = False) -> Any:
        query = "SELECT * FROM api_keys WHERE id = ?"
        if lock:
            query += self.lock_clause
        return self._execute(query, (key_id,)).fetchone()

    def _org_from_row(self, row: Any) -> Org:
        return Org(
            org_id=row["id"],
            name=row["name"],
            baa_active=bool(row["baa_active"]),
            created_at=self._time_value(row["created_at"]),
            updated_at=self._time_value(row["updated_at"]),
        )

    def _key_from_row(self, row: Any) -> ApiKey:
        return ApiKey(
            key_id=row["id"],
            org_id=row["org_id"],
            name=row["name"],
            key_hash=row["key_hash"],
            scopes=tuple(row["scopes"].split()),
            created_at=self._time_value(row["created_at"]),
            revoked_at=self._time_value(row["revoked_at"]),
            expires_at=self._time_value(row["expires_at"]),
            last_used_at=self._time_value(row["last_used_at"]),
        )

    def _change_from_row(self, row: Any) -> Change:
        return Change(
            seq=int(row["seq"]),
            kind=row["kind"],
            key_id=row["key_id"],
            key_hash=row["key_hash"],
            org_id=row["org_id"],
            changed_at=self._time_value(row["changed_at"]),
        )

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Convert the driver's errors into KeyStoreUnavailable."""
        try:
            yield
        except self.database_error as exc:
            raise self._unavailable(exc) from exc


def _org_exists(org_id: str) -> OrgExists:
    return OrgExists(
        f"org {org_id!r} already exists: choose another id, or use "
        f"'hasp-keys orgs baa {org_id} on|off' to change it"
    )


def _org_not_found(org_id: str) -> OrgNotFound:
    return OrgNotFound(
        f"org {org_id!r} not found: create it with 'hasp-keys orgs create {org_id}'"
    )


def _key_not_found(key_id: str) -> KeyNotFound:
    return KeyNotFound(
        f"key {key_id!r} not found: 'hasp-keys list' shows the existing key ids"
    )
