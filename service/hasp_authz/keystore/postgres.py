"""The PostgreSQL key store, on psycopg 3's synchronous API.

The URL is a libpq connection URI, such as
``postgresql://hasp@db.internal:5432/hasp?options=-csearch_path%3Dauthz``. The tables
live in the current schema, the first schema of the search_path that exists. The
schema is in ``postgres_schema``; the queries are shared with SQLite in ``sql``.

The main connection runs in autocommit mode, and each write runs in its own
transaction that locks the rows it reads, so a call that raises changes nothing.
A broken connection is replaced on the next call. ``wait_for_changes`` listens on
a second connection, opened on its first call.

Messages name the server as ``postgresql://user@host:port/database`` and never
contain the password.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from hasp_authz.keystore import InvalidInput, KeyStoreError, KeyStoreUnavailable
from hasp_authz.keystore.postgres_schema import (
    MIGRATION_LOCK,
    MIGRATIONS,
    NOTIFY_CHANNEL,
    VERSION_TABLE,
)
from hasp_authz.keystore.sql import SqlKeyStore

# Seconds to wait for a connection, unless the URL sets connect_timeout.
CONNECT_TIMEOUT = 5


class PostgresKeyStore(SqlKeyStore):
    """A KeyStore in one PostgreSQL schema. Use ``PostgresKeyStore.open``."""

    migrations = MIGRATIONS
    version_table = VERSION_TABLE
    lock_clause = " FOR UPDATE"
    database_error = psycopg.Error
    unique_violation = psycopg.errors.UniqueViolation

    def __init__(self, url: str, location: str):
        self._url = url
        self.location = location
        self._connection: psycopg.Connection | None = None
        self._listener: psycopg.Connection | None = None

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> PostgresKeyStore:
        """Connect to the database that ``url`` names and, by default, migrate it.

        Raises InvalidInput for a malformed URL and KeyStoreUnavailable when the
        server cannot be reached, refuses the login, or has no usable schema.
        """
        store = cls(url, _location(url))
        try:
            store._live_connection()
            store._check_schema()
            if migrate:
                store.migrate()
        except KeyStoreError:
            store.close()
            raise
        return store

    def close(self) -> None:
        for connection in (self._connection, self._listener):
            if connection is not None:
                connection.close()
        self._connection = None
        self._listener = None

    def __enter__(self) -> PostgresKeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_for_changes(self, timeout: float) -> None:
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._connect()
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                # A change committed between the caller's last read and LISTEN
                # sent no notification that this connection could receive, so
                # return at once and let the caller read the log again.
                return
            for _ in self._listener.notifies(timeout=max(timeout, 0.0), stop_after=1):
                pass
            # Discard the notifications already queued. The caller's next read
            # covers them, and they would otherwise end the next call at once.
            for _ in self._listener.notifies(timeout=0):
                pass
        except psycopg.Error as exc:
            self._listener.close()
            raise self._unavailable(exc) from exc

    def _connect(self) -> psycopg.Connection:
        params: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if "connect_timeout" not in _conninfo(self._url):
            params["connect_timeout"] = CONNECT_TIMEOUT
        try:
            return psycopg.connect(self._url, **params)
        except psycopg.Error as exc:
            raise KeyStoreUnavailable(
                f"cannot connect to key store {self.location} "
                f"({_first_line(exc, self._url)}): check that PostgreSQL runs "
                "there and that HASP_KEYSTORE_URL names the right user and database"
            ) from exc

    def _live_connection(self) -> psycopg.Connection:
        if self._connection is None or self._connection.closed:
            self._connection = self._connect()
        return self._connection

    def _check_schema(self) -> None:
        with self._errors():
            row = self._execute("SELECT current_schema() AS schema").fetchone()
        if row["schema"] is None:
            raise KeyStoreUnavailable(
                f"key store {self.location} has no schema to use: no schema in the "
                "search_path exists, create one with CREATE SCHEMA or set "
                "options=-csearch_path%3Dschema in the URL"
            )

    def _execute(self, query: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        # NOTE: psycopg only accepts %s placeholders, and treats % as special
        # only when parameters are passed, so statements without any are sent
        # as written.
        if not params:
            return self._live_connection().execute(query)
        return self._live_connection().execute(query.replace("?", "%s"), params)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._errors(), self._live_connection().transaction():
            yield

    def _lock_migrations(self) -> None:
        self._execute(
            f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK},"
            " hashtext(current_schema()))"
        )

    def _unavailable(self, exc: Exception) -> KeyStoreUnavailable:
        return KeyStoreUnavailable(
            f"key store {self.location} failed ({_first_line(exc, self._url)}), "
            "check that the server is up and the schema is a hasp-keys key store"
        )

    def _time_param(self, moment: datetime | None) -> datetime | None:
        return moment

    def _time_value(self, value: datetime | None) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def _version_table_exists(self) -> bool:
        row = self._execute(
            "SELECT to_regclass(format('%I.schema_version', current_schema()))"
            " IS NOT NULL AS present"
        ).fetchone()
        return bool(row["present"])


def _conninfo(url: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise InvalidInput(
            f"invalid PostgreSQL URL ({_first_line(exc, url)}): expected "
            "postgresql://user:password@host:port/database, with optional "
            "parameters such as ?options=-csearch_path%3Dschema"
        ) from None


def _location(url: str) -> str:
    """Return ``postgresql://user@host:port/database`` for messages."""
    params = _conninfo(url)
    user = params.get("user", "")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or user
    return f"postgresql://{user}{'@' if user else ''}{host}:{port}/{dbname}"


def _first_line(exc: Exception, url: str) -> str:
    """Return the first line of a psycopg error, without the URL or password."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0].removeprefix("connection failed: ")
    # NOTE: a guard only. libpq's messages seen so far name the host, port and
    # user but not the password, except that a parse error quotes the URL.
    text = text.replace(url, "<the URL>")
    password = _url_password(url)
    if password:
        text = text.replace(password, "***")
    return text


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
