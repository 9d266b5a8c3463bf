"""The key store: the source of truth for organizations and API keys.

A backend implements ``KeyStore`` and is chosen by URL scheme in ``open_keystore``:
SQLite (``sqlite.py``) or PostgreSQL (``postgres.py``). Both share their queries
through ``sql.SqlKeyStore``. A backend stores the SHA-256 hash of each token, never
the token. It validates every input before writing, so a failed call changes
nothing.

Other programs may write the tables directly in SQL (docs/keystore.md is that
contract). Database triggers record every change that the Redis copy depends on
in the ``key_changes`` table, which ``changes_since`` reads.

Timestamps cross this interface as timezone-aware ``datetime`` values in UTC, and
each backend chooses its own column type.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from hasp_authz.scopes import SCOPES, unknown_scopes
from hasp_authz.tokens import CROCKFORD_ALPHABET

KEY_ID_PREFIX = "key_"
KEY_ID_SUFFIX_LENGTH = 20
MAX_NAME_LENGTH = 128

# Org ids travel in the x-hasp-org-id header and in Redis key names, so they are
# restricted to characters that are safe in both.
_ORG_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_KEY_ID_ALPHABET = CROCKFORD_ALPHABET.lower()
_KEY_ID_RE = re.compile(
    rf"{KEY_ID_PREFIX}[{_KEY_ID_ALPHABET}]{{{KEY_ID_SUFFIX_LENGTH}}}", re.ASCII
)
_KEY_HASH_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


class KeyStoreError(Exception):
    """Base class of key store errors. The message is one line that names the fix."""


class InvalidInput(KeyStoreError):
    """An org id, key id, name, scope or URL is malformed."""


class OrgNotFound(KeyStoreError):
    pass


class OrgExists(KeyStoreError):
    pass


class KeyNotFound(KeyStoreError):
    pass


class KeyStoreUnavailable(KeyStoreError):
    """The store cannot be opened, read or written."""


@dataclass(frozen=True, slots=True)
class Org:
    org_id: str
    name: str
    baa_active: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key. ``key_hash`` is the hex SHA-256 of the token."""

    key_id: str
    org_id: str
    name: str
    key_hash: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Whether the key is not revoked. Expiry is checked by the Check path."""
        return self.revoked_at is None

    def __repr__(self) -> str:
        # NOTE: the hash is left out so that logs and tracebacks never carry it.
        return (
            f"ApiKey(key_id={self.key_id!r}, org_id={self.org_id!r}, "
            f"name={self.name!r}, scopes={self.scopes!r}, "
            f"revoked_at={self.revoked_at!r})"
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change log, written by a trigger in the same transaction.

    ``kind`` is "key" for a change to an api_keys row, with the key's id, hash and
    org as they were written (the old values for a deletion). It is "org" for a
    change to an orgs row, with ``key_id`` and ``key_hash`` None.
    """

    seq: int
    kind: Literal["key", "org"]
    key_id: str | None
    key_hash: str | None
    org_id: str
    changed_at: datetime

    def __repr__(self) -> str:
        # NOTE: the hash is left out, as in ApiKey.
        return (
            f"Change(seq={self.seq!r}, kind={self.kind!r}, key_id={self.key_id!r}, "
            f"org_id={self.org_id!r}, changed_at={self.changed_at!r})"
        )


class KeyStore(Protocol):
    """Operations every backend provides. Each raises KeyStoreError subclasses."""

    def create_org(
        self, org_id: str, name: str | None = None, baa_active: bool = False
    ) -> Org:
        """Insert an org, named after its id when ``name`` is None.

        Raises InvalidInput or OrgExists.
        """
        ...

    def get_org(self, org_id: str) -> Org:
        """Return one org. Raises InvalidInput or OrgNotFound."""
        ...

    def list_orgs(self) -> list[Org]:
        """Return every org, ordered by id."""
        ...

    def set_baa(self, org_id: str, active: bool) -> tuple[Org, bool]:
        """Set an org's BAA status and return the org and whether it changed.

        Setting the status it already has succeeds and changes nothing.
        Raises InvalidInput or OrgNotFound.
        """
        ...

    def create_key(
        self,
        org_id: str,
        name: str,
        key_hash: str,
        scopes: Sequence[str],
        expires_at: datetime | None = None,
    ) -> ApiKey:
        """Insert a key under a new key id. Raises InvalidInput or OrgNotFound."""
        ...

    def get_key(self, key_id: str) -> ApiKey:
        """Return one key, revoked or not. Raises InvalidInput or KeyNotFound."""
        ...

    def get_key_by_hash(self, key_hash: str) -> ApiKey:
        """Return the key with this token hash. Raises InvalidInput or KeyNotFound."""
        ...

    def list_keys(
        self, org_id: str | None = None, include_revoked: bool = True
    ) -> list[ApiKey]:
        """Return keys ordered by creation time, of one org when ``org_id`` is set.

        Raises OrgNotFound for an unknown ``org_id``.
        """
        ...

    def revoke_key(self, key_id: str) -> tuple[ApiKey, bool]:
        """Revoke a key and return it and whether this call revoked it.

        Revoking a revoked key succeeds, changes nothing and keeps the first
        revocation time. Raises InvalidInput or KeyNotFound.
        """
        ...

    def record_last_used(self, times: dict[str, datetime]) -> int:
        """Set each key's last_used_at to the later of the stored and given time.

        ``times`` maps key ids to aware datetimes. Unknown key ids are ignored.
        Returns the number of keys updated. Writes no change-log row, because
        the Redis copy does not hold this column. Raises InvalidInput.
        """
        ...

    def latest_change_seq(self) -> int:
        """Return the highest seq in the change log, 0 when the log is empty."""
        ...

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        """Return up to ``limit`` change-log rows with a seq above ``seq``, ascending.

        Seq order is commit order, so a reader that remembers the last seq it
        handled misses no committed change. Raises InvalidInput for a negative
        ``seq`` or a ``limit`` below 1.
        """
        ...

    def prune_changes(self, before_seq: int) -> int:
        """Delete change-log rows with a seq below ``before_seq``; return how many.

        Seq values are never reused, so pruning does not disturb a reader whose
        position is at or above ``before_seq``.
        """
        ...

    def wait_for_changes(self, timeout: float) -> None:
        """Block until the change log may have new rows, or ``timeout`` seconds pass.

        It may return early and without a change, so call ``changes_since`` after
        every return. PostgreSQL waits for a notification from the triggers, and
        the first call on a store starts listening and returns at once. SQLite
        sleeps for ``timeout`` or the poll interval, whichever is shorter.
        """
        ...

    def schema_version(self) -> int:
        """Return the newest schema migration applied, 0 for an empty database."""
        ...

    def migrate(self) -> int:
        """Apply the pending schema migrations in one transaction; return the version.

        Raises KeyStoreUnavailable when the database has a newer schema than this
        code knows.
        """
        ...

    def close(self) -> None: ...


def open_keystore(url: str, migrate: bool = True) -> KeyStore:
    """Open the store that ``url`` names, and migrate its schema unless told not to.

    ``sqlite:///relative/path.db`` is relative to the current directory and
    ``sqlite:////absolute/path.db`` is absolute. ``postgresql://`` and
    ``postgres://`` URLs are libpq connection URIs, and the tables live in the
    first schema of the search_path that exists (set it with
    ``?options=-csearch_path%3Dmyschema``).
    Raises InvalidInput for an unsupported URL and KeyStoreUnavailable when the
    store cannot be opened.
    """
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite":
        from hasp_authz.keystore.sqlite import SqliteKeyStore

        return SqliteKeyStore.open(_sqlite_path(rest), migrate=migrate)
    if scheme in ("postgresql", "postgres"):
        from hasp_authz.keystore.postgres import PostgresKeyStore

        return PostgresKeyStore.open(url, migrate=migrate)
    # NOTE: only the scheme is shown, because the URL may contain a password.
    raise InvalidInput(
        f"unsupported key store URL scheme {scheme!r}: use sqlite:///path/to/file.db "
        "or postgresql://user@host:port/database"
    )


def _sqlite_path(rest: str) -> str:
    if not rest.startswith("/") or len(rest) < 2:
        raise InvalidInput(
            "invalid SQLite URL: expected sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    if "?" in rest or "#" in rest:
        raise InvalidInput(
            "invalid SQLite URL: query strings and fragments are not supported, "
            "remove the part after '?' or '#'"
        )
    return rest[1:]


def new_key_id() -> str:
    """Return a random key id: ``key_`` and 20 lower-case Crockford base32 chars."""
    suffix = "".join(
        secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_SUFFIX_LENGTH)
    )
    return KEY_ID_PREFIX + suffix


def looks_like_token(value: str) -> bool:
    return "hasp_key_" in value.lower()


def shown(value: str) -> str:
    """Quote a user-supplied value for a message, hiding anything like a token."""
    if looks_like_token(value):
        return "<a value that looks like an API key token, not shown>"
    if len(value) > 80:
        value = value[:77] + "..."
    return repr(value)


def validate_org_id(org_id: str) -> None:
    # A token is a well-formed org id, but must never reach headers or logs.
    if _ORG_ID_RE.fullmatch(org_id) is None or looks_like_token(org_id):
        raise InvalidInput(
            f"invalid org id {shown(org_id)}: use 1-64 characters of letters, "
            "digits, '_', '.' and '-', starting with a letter or digit"
        )


def validate_key_id(key_id: str) -> None:
    if _KEY_ID_RE.fullmatch(key_id) is None:
        raise InvalidInput(
            f"invalid key id {shown(key_id)}: expected {KEY_ID_PREFIX} and "
            f"{KEY_ID_SUFFIX_LENGTH} lower-case characters, as shown by "
            "'hasp-keys list'"
        )


def validate_name(name: str, what: str = "name") -> None:
    if looks_like_token(name):
        raise InvalidInput(f"invalid {what}: it must not contain an API key token")
    if not name.strip() or not name.isprintable() or len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"invalid {what} {shown(name)}: use 1-{MAX_NAME_LENGTH} printable "
            "characters that are not all spaces"
        )


def validate_key_hash(key_hash: str) -> None:
    if _KEY_HASH_RE.fullmatch(key_hash) is None:
        # The value is not shown: a caller may have passed the token by mistake.
        raise InvalidInput(
            "invalid key hash: expected 64 lower-case hex characters, "
            "the SHA-256 of the token (tokens.hash_token)"
        )


def validate_time(moment: datetime, what: str) -> datetime:
    """Return ``moment`` in UTC. Raises InvalidInput for a naive datetime."""
    if moment.tzinfo is None:
        raise InvalidInput(
            f"{what} {moment.isoformat()} has no time zone: pass an aware "
            "datetime, for example in UTC"
        )
    return moment.astimezone(UTC)


def validate_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    """Return the scopes without duplicates, in order. Raises InvalidInput."""
    known = ", ".join(sorted(SCOPES))
    if not scopes:
        raise InvalidInput("a key needs at least one scope: name one of " + known)
    unknown = unknown_scopes(list(scopes))
    if unknown:
        listed = ", ".join(shown(scope) for scope in unknown)
        raise InvalidInput(f"unknown scope {listed}: use one of {known}")
    return tuple(dict.fromkeys(scopes))
