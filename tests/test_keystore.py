"""The key store on both backends: SQLite files under tmp_path and PostgreSQL schemas.

Most tests run once per backend through the ``keystore_url`` fixture. Tests of
one backend's own behaviour parametrize ``keystore_backend`` to that backend.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from conftest import RawDatabase, with_search_path
from hasp_authz.dev.redis_server import free_port
from hasp_authz.keystore import (
    ApiKey,
    InvalidInput,
    KeyNotFound,
    KeyStore,
    KeyStoreUnavailable,
    OrgExists,
    OrgNotFound,
    new_key_id,
    open_keystore,
    postgres_schema,
    sqlite_schema,
)
from hasp_authz.keystore.sqlite import POLL_INTERVAL, SqliteKeyStore
from hasp_authz.tokens import generate_token, hash_token

KEY_ID_RE = re.compile(r"key_[0-9abcdefghjkmnpqrstvwxyz]{20}")
STORED_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")
MIGRATIONS = {
    "sqlite": sqlite_schema.MIGRATIONS,
    "postgresql": postgres_schema.MIGRATIONS,
}
LATEST_VERSION = 2
# The key id and token of the examples in docs/keystore.md.
KEY_ID = "key_0123456789abcdefghjk"
DOCS_TOKEN = "hasp_key_live_0123456789ABCDEFGHJKMNPQRSTVWXYZ"
DOCS = Path(__file__).parent.parent / "docs" / "keystore.md"

sqlite_only = pytest.mark.parametrize("keystore_backend", ["sqlite"])
postgres_only = pytest.mark.parametrize("keystore_backend", ["postgresql"])


@pytest.fixture
def store(keystore_url: str) -> Iterator[KeyStore]:
    with closing(open_keystore(keystore_url)) as opened:
        yield opened


@pytest.fixture
def acme(store: KeyStore):
    return store.create_org("acme", "Acme Inc")


def add_key(store: KeyStore, org_id: str = "acme", **changes) -> ApiKey:
    fields = {"name": "ci", "key_hash": hash_token(generate_token())}
    fields["scopes"] = ["ai:chat"]
    fields.update(changes)
    return store.create_key(org_id, **fields)


def logged(store: KeyStore, after: int = 0) -> list[tuple]:
    """Return the change log after ``after`` as (kind, key_id, key_hash, org_id)."""
    return [
        (change.kind, change.key_id, change.key_hash, change.org_id)
        for change in store.changes_since(after)
    ]


def insert_key_sql(raw_db: RawDatabase, org_id: str = "acme") -> tuple[str, str]:
    """Insert a key with plain SQL and return its id and hash."""
    key_id, key_hash = new_key_id(), hash_token(generate_token())
    raw_db.execute(
        "INSERT INTO api_keys (id, org_id, name, key_hash, scopes)"
        " VALUES (?, ?, 'sql', ?, 'ai:chat control:read')",
        (key_id, org_id, key_hash),
    )
    return key_id, key_hash


def test_open_creates_parent_directory(tmp_path: Path):
    path = tmp_path / "a" / "b" / "keys.db"
    SqliteKeyStore.open(str(path)).close()
    assert path.is_file()


def test_open_applies_migrations_once(keystore_url, keystore_backend, raw_db):
    open_keystore(keystore_url).close()
    with closing(open_keystore(keystore_url)) as store:
        assert store.schema_version() == LATEST_VERSION
    versions = [row[0] for row in raw_db.rows("schema_version")]
    assert versions == [version for version, _ in MIGRATIONS[keystore_backend]]


def test_migrations_end_at_same_version():
    assert sqlite_schema.MIGRATIONS[-1][0] == LATEST_VERSION
    assert postgres_schema.MIGRATIONS[-1][0] == LATEST_VERSION


def test_migrate_is_idempotent(store: KeyStore, raw_db: RawDatabase):
    before = raw_db.rows("schema_version")
    assert store.migrate() == LATEST_VERSION
    assert store.migrate() == LATEST_VERSION
    assert raw_db.rows("schema_version") == before


def test_open_without_migrate(keystore_url: str):
    with closing(open_keystore(keystore_url, migrate=False)) as store:
        assert store.schema_version() == 0
        assert store.migrate() == LATEST_VERSION
        assert store.schema_version() == LATEST_VERSION


def test_open_rejects_newer_schema(keystore_url: str, raw_db: RawDatabase):
    open_keystore(keystore_url).close()
    raw_db.execute(
        f"INSERT INTO schema_version (version, applied_at) VALUES (999, {raw_db.now})"
    )
    with pytest.raises(KeyStoreUnavailable, match="schema version 999"):
        open_keystore(keystore_url)
    store = open_keystore(keystore_url, migrate=False)
    with closing(store), pytest.raises(KeyStoreUnavailable, match="newer than"):
        store.migrate()


def test_concurrent_migrators(keystore_url, keystore_backend, raw_db):
    start = threading.Barrier(4)

    def open_and_close(_: int) -> int:
        start.wait()
        with closing(open_keystore(keystore_url)) as store:
            return store.schema_version()

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(open_and_close, range(4)))
    assert versions == [LATEST_VERSION] * 4
    assert len(raw_db.rows("schema_version")) == len(MIGRATIONS[keystore_backend])


@sqlite_only
def test_sqlite_upgrades_version_1(raw_db: RawDatabase):
    Path(raw_db.sqlite_path).parent.mkdir(parents=True)
    moment = "2025-01-31T12:00:00.000000+00:00"
    with closing(sqlite3.connect(raw_db.sqlite_path)) as db, db:
        for statement in sqlite_schema.MIGRATIONS[0][1]:
            db.execute(statement)
        db.execute(sqlite_schema.VERSION_TABLE)
        db.execute("INSERT INTO schema_version VALUES (1, ?)", (moment,))
        db.execute("INSERT INTO orgs VALUES ('acme', 'Acme', 1, ?, ?)", (moment,) * 2)
        db.execute(
            "INSERT INTO api_keys VALUES (?, 'acme', 'ci', ?, ?, ?, NULL, NULL, NULL)",
            (KEY_ID, "a" * 64, json.dumps(["control:read", "ai:chat"]), moment),
        )
    with closing(open_keystore(raw_db.url)) as store:
        assert store.schema_version() == LATEST_VERSION
        assert store.get_key(KEY_ID).scopes == ("control:read", "ai:chat")
        assert store.get_org("acme").baa_active is True
        assert store.changes_since(0) == []
    assert raw_db.execute("SELECT scopes FROM api_keys") == [("control:read ai:chat",)]
    assert raw_db.execute("PRAGMA foreign_key_check") == []


@sqlite_only
def test_open_uses_wal_mode(store: KeyStore, raw_db: RawDatabase):
    assert raw_db.execute("PRAGMA journal_mode") == [("wal",)]


def test_open_keeps_data(keystore_url: str):
    with closing(open_keystore(keystore_url)) as store:
        store.create_org("acme")
    with closing(open_keystore(keystore_url)) as store:
        assert store.get_org("acme").name == "acme"


def _directory(tmp_path: Path) -> Path:
    return tmp_path


def _not_a_database(tmp_path: Path) -> Path:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    return path


def _parent_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "keys.db"


@pytest.mark.parametrize("make_path", [_directory, _not_a_database, _parent_is_a_file])
def test_open_unusable_path(tmp_path: Path, make_path):
    path = make_path(tmp_path)
    with pytest.raises(KeyStoreUnavailable) as caught:
        SqliteKeyStore.open(str(path))
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message


def test_open_keystore_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    open_keystore("sqlite:///data/keys.db").close()
    assert (tmp_path / "data" / "keys.db").is_file()


def test_open_keystore_absolute_url(tmp_path: Path):
    path = tmp_path / "abs" / "keys.db"
    open_keystore(f"sqlite:///{path}").close()
    assert path.is_file()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://user:s3cret@127.0.0.1/keys", "unsupported key store URL scheme"),
        ("keys.db", "unsupported key store URL scheme"),
        ("sqlite://", "invalid SQLite URL"),
        ("sqlite:///", "invalid SQLite URL"),
        ("sqlite://host/keys.db", "invalid SQLite URL"),
        ("sqlite:///keys.db?mode=ro", "not supported"),
        ("postgresql://user:s3cret@[::1/keys", "invalid PostgreSQL URL"),
        ("postgres://user:s3cret@127.0.0.1/keys?bogus=1", "invalid PostgreSQL URL"),
    ],
)
def test_open_keystore_rejects_url(url: str, expected: str):
    with pytest.raises(InvalidInput, match=expected) as caught:
        open_keystore(url)
    assert "s3cret" not in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_open_postgres_unreachable(scheme: str):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(KeyStoreUnavailable) as caught:
        open_keystore(f"{scheme}://hasp:s3cret@127.0.0.1:{port}/keys")
    message = str(caught.value)
    assert message.startswith(
        f"cannot connect to key store postgresql://hasp@127.0.0.1:{port}/keys ("
    )
    assert "s3cret" not in message
    assert "\n" not in message
    assert time.monotonic() - started < 5


def test_open_postgres_missing_schema(postgres_url: str):
    url = with_search_path(postgres_url, "hasp_test_no_such_schema")
    with pytest.raises(KeyStoreUnavailable, match="no schema in the search_path"):
        open_keystore(url)


@postgres_only
def test_postgres_tables_in_search_path_schema(store: KeyStore, raw_db: RawDatabase):
    schema = raw_db.execute("SELECT current_schema()")[0][0]
    rows = raw_db.execute(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = ? ORDER BY 1",
        (schema,),
    )
    assert [row[0] for row in rows] == [
        "api_keys", "key_changes", "orgs", "schema_version"
    ]  # fmt: skip


def test_create_org_defaults(store: KeyStore):
    org = store.create_org("acme")
    assert org.name == "acme"
    assert org.baa_active is False
    assert org.created_at.tzinfo == UTC
    assert store.get_org("acme") == org


def test_create_org_with_baa(store: KeyStore):
    store.create_org("acme", "Acme Inc", baa_active=True)
    assert store.get_org("acme").baa_active is True


def test_create_org_duplicate(store: KeyStore, acme, raw_db: RawDatabase):
    with pytest.raises(OrgExists, match="'acme' already exists"):
        store.create_org("acme", "Other")
    assert [row[1] for row in raw_db.rows("orgs")] == ["Acme Inc"]


@pytest.mark.parametrize(
    "org_id", ["a", "A1", "acme.prod_2-eu", "0rg", "x" * 64], ids=str.__len__
)
def test_org_id_valid(store: KeyStore, org_id: str):
    assert store.create_org(org_id).org_id == org_id


@pytest.mark.parametrize(
    "org_id",
    ["", " acme", "-acme", ".acme", "x" * 65, "ac me", "acme/x", "acme\n", "acmé"],
)
def test_org_id_invalid(store: KeyStore, org_id: str, raw_db: RawDatabase):
    with pytest.raises(InvalidInput, match="invalid org id"):
        store.create_org(org_id)
    assert raw_db.rows("orgs") == []


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "tab\there", "\x00", "n" * 129])
def test_key_name_invalid(store: KeyStore, acme, name: str):
    with pytest.raises(InvalidInput, match="invalid key name"):
        add_key(store, name=name)


def test_org_id_token_rejected(store: KeyStore):
    token = generate_token()
    with pytest.raises(InvalidInput) as caught:
        store.create_org(token)
    assert token not in str(caught.value)
    assert "looks like an API key token" in str(caught.value)


def test_key_name_token_rejected(store: KeyStore, acme):
    token = generate_token()
    with pytest.raises(InvalidInput, match="must not contain") as caught:
        add_key(store, name=f"copy of {token}")
    assert token not in str(caught.value)


@pytest.mark.parametrize(("start", "request_", "changed"), [(False, True, True),
    (True, False, True), (True, True, False), (False, False, False)])  # fmt: skip
def test_set_baa(store: KeyStore, start: bool, request_: bool, changed: bool):
    before = store.create_org("acme", baa_active=start)
    org, was_changed = store.set_baa("acme", request_)
    assert was_changed is changed
    assert org.baa_active is request_
    assert store.get_org("acme") == org
    assert (org.updated_at > before.updated_at) is changed


def test_set_baa_unknown_org(store: KeyStore):
    with pytest.raises(OrgNotFound, match="hasp-keys orgs create nope"):
        store.set_baa("nope", True)


def test_create_key_fields(store: KeyStore, acme):
    key_hash = hash_token(generate_token())
    key = store.create_key("acme", "ci", key_hash, ["ai:chat", "control:read"])
    assert KEY_ID_RE.fullmatch(key.key_id)
    assert key.key_hash == key_hash
    assert key.scopes == ("ai:chat", "control:read")
    assert key.revoked_at is None
    assert key.last_used_at is None
    assert key.active
    assert store.get_key(key.key_id) == key


def test_create_key_dedupes_scopes(store: KeyStore, acme):
    key = add_key(store, scopes=["ai:chat", "control:read", "ai:chat"])
    assert key.scopes == ("ai:chat", "control:read")


def test_scopes_stored_space_separated(store: KeyStore, acme, raw_db: RawDatabase):
    add_key(store, scopes=["ai:chat", "control:read"])
    assert raw_db.execute("SELECT scopes FROM api_keys") == [("ai:chat control:read",)]


def test_create_key_stores_expiry(store: KeyStore, acme):
    berlin = timezone(timedelta(hours=1))
    expires = datetime(2030, 1, 1, 13, 0, tzinfo=berlin)
    key = add_key(store, expires_at=expires)
    stored = store.get_key(key.key_id).expires_at
    assert stored == expires
    assert stored.tzinfo == UTC


def test_create_key_naive_expiry(store: KeyStore, acme):
    with pytest.raises(InvalidInput, match="no time zone"):
        add_key(store, expires_at=datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("changes", "error", "expected"),
    [
        ({"org_id": "nope"}, OrgNotFound, "'nope' not found"),
        ({"scopes": ["ai:chat", "ai:everything"]}, InvalidInput, "'ai:everything'"),
        ({"scopes": []}, InvalidInput, "at least one scope"),
        ({"key_hash": "ABC"}, InvalidInput, "invalid key hash"),
        ({"key_hash": "f" * 63 + "F"}, InvalidInput, "invalid key hash"),
        ({"name": ""}, InvalidInput, "invalid key name"),
    ],
    ids=[
        "unknown-org",
        "unknown-scope",
        "no-scope",
        "short-hash",
        "upper-hash",
        "name",
    ],
)
def test_create_key_rejects(store, acme, raw_db, changes, error, expected):
    with pytest.raises(error, match=expected):
        add_key(store, **changes)
    assert raw_db.rows("api_keys") == []


def test_create_key_duplicate_hash(store: KeyStore, acme, raw_db: RawDatabase):
    key = add_key(store)
    with pytest.raises(InvalidInput, match="already exists") as caught:
        add_key(store, key_hash=key.key_hash)
    assert key.key_hash not in str(caught.value)
    assert len(raw_db.rows("api_keys")) == 1


def test_store_keeps_only_hash(store: KeyStore, raw_db: RawDatabase):
    token = generate_token()
    store.create_org("acme")
    store.create_key("acme", "ci", hash_token(token), ["ai:chat"])
    content = repr(raw_db.dump())
    assert token not in content
    assert token.removeprefix("hasp_key_live_") not in content
    assert hash_token(token) in content


@sqlite_only
def test_sqlite_file_keeps_only_hash(store: KeyStore, raw_db: RawDatabase):
    token = generate_token()
    store.create_org("acme")
    store.create_key("acme", "ci", hash_token(token), ["ai:chat"])
    folder = Path(raw_db.sqlite_path).parent
    files = [path for path in folder.iterdir() if path.is_file()]
    content = b"".join(path.read_bytes() for path in files)
    assert token.encode() not in content
    assert token.removeprefix("hasp_key_live_").encode() not in content
    assert hash_token(token).encode() in content


@sqlite_only
def test_timestamps_stored_as_utc_text(store: KeyStore, acme, raw_db: RawDatabase):
    key = add_key(store)
    store.revoke_key(key.key_id)
    row = raw_db.execute("SELECT created_at, revoked_at FROM api_keys")[0]
    assert all(STORED_TIME_RE.fullmatch(text) for text in row)


def test_revoke_key(store: KeyStore, acme):
    key = add_key(store)
    revoked, changed = store.revoke_key(key.key_id)
    assert changed is True
    assert revoked.revoked_at is not None
    assert not revoked.active
    assert store.get_key(key.key_id) == revoked


def test_revoke_key_twice(store: KeyStore, acme):
    key = add_key(store)
    first, _ = store.revoke_key(key.key_id)
    second, changed = store.revoke_key(key.key_id)
    assert changed is False
    assert second.revoked_at == first.revoked_at


@pytest.mark.parametrize(
    ("key_id", "error"),
    [
        (new_key_id(), KeyNotFound),
        ("key_abc", InvalidInput),
        ("KEY_" + "a" * 20, InvalidInput),
        ("key_" + "i" * 20, InvalidInput),
        (generate_token(), InvalidInput),
    ],
    ids=["unknown", "short", "upper", "not-crockford", "token"],
)
def test_revoke_key_rejects(store: KeyStore, acme, key_id: str, error):
    key = add_key(store)
    with pytest.raises(error) as caught:
        store.revoke_key(key_id)
    assert "hasp_key_live_" not in str(caught.value)
    assert store.get_key(key.key_id).active


def test_list_keys_filters(store: KeyStore, acme):
    store.create_org("beta")
    first = add_key(store, name="first")
    second = add_key(store, "beta", name="second")
    revoked = add_key(store, name="revoked")
    store.revoke_key(revoked.key_id)
    assert [key.name for key in store.list_keys()] == ["first", "second", "revoked"]
    assert [key.key_id for key in store.list_keys("beta")] == [second.key_id]
    active = store.list_keys(include_revoked=False)
    assert [key.key_id for key in active] == [first.key_id, second.key_id]
    acme_active = store.list_keys("acme", include_revoked=False)
    assert [key.key_id for key in acme_active] == [first.key_id]


def test_list_keys_unknown_org(store: KeyStore):
    with pytest.raises(OrgNotFound):
        store.list_keys("nope")


def test_list_orgs_sorted(store: KeyStore):
    for org_id in ["zeta", "Acme", "beta"]:
        store.create_org(org_id)
    assert [org.org_id for org in store.list_orgs()] == ["Acme", "beta", "zeta"]


def test_two_stores_share_database(keystore_url: str):
    with (
        closing(open_keystore(keystore_url)) as one,
        closing(open_keystore(keystore_url)) as two,
    ):
        one.create_org("acme")
        add_key(two)
        assert len(one.list_keys()) == 1


def test_api_key_repr_hides_hash(store: KeyStore, acme):
    key = add_key(store)
    assert key.key_hash not in repr(key)
    assert key.key_id in repr(key)


def test_new_key_id_format():
    ids = {new_key_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(KEY_ID_RE.fullmatch(key_id) for key_id in ids)


def test_get_key_by_hash(store: KeyStore, acme):
    key = add_key(store)
    assert store.get_key_by_hash(key.key_hash) == key


def test_get_key_by_hash_unknown(store: KeyStore, acme):
    key_hash = hash_token(generate_token())
    with pytest.raises(KeyNotFound) as caught:
        store.get_key_by_hash(key_hash)
    assert key_hash not in str(caught.value)
    with pytest.raises(InvalidInput, match="invalid key hash"):
        store.get_key_by_hash(key_hash.upper())


def test_change_log_empty(store: KeyStore):
    assert store.latest_change_seq() == 0
    assert store.changes_since(0) == []


def test_store_writes_logged(store: KeyStore):
    org = store.create_org("acme")
    key = add_key(store)
    store.revoke_key(key.key_id)
    store.set_baa("acme", True)
    store.revoke_key(key.key_id)
    store.set_baa("acme", True)
    key_row = ("key", key.key_id, key.key_hash, "acme")
    org_row = ("org", None, None, org.org_id)
    assert logged(store) == [org_row, key_row, key_row, org_row]
    changes = store.changes_since(0)
    assert [change.seq for change in changes] == sorted(
        {change.seq for change in changes}
    )
    assert store.latest_change_seq() == changes[-1].seq
    assert all(change.changed_at.tzinfo == UTC for change in changes)


def test_sql_insert_logged(store: KeyStore, raw_db: RawDatabase):
    raw_db.execute("INSERT INTO orgs (id, name) VALUES ('acme', 'Acme')")
    key_id, key_hash = insert_key_sql(raw_db)
    assert logged(store) == [
        ("org", None, None, "acme"),
        ("key", key_id, key_hash, "acme"),
    ]
    key = store.get_key_by_hash(key_hash)
    assert key.scopes == ("ai:chat", "control:read")
    assert key.created_at.tzinfo == UTC
    assert store.get_org("acme").baa_active is False


def test_sql_revoke_logged(store: KeyStore, acme, raw_db: RawDatabase):
    key = add_key(store)
    seq = store.latest_change_seq()
    raw_db.execute(
        f"UPDATE api_keys SET revoked_at = {raw_db.now} WHERE id = ?", (key.key_id,)
    )
    assert logged(store, seq) == [("key", key.key_id, key.key_hash, "acme")]
    assert not store.get_key(key.key_id).active


def test_sql_baa_update_logged(store: KeyStore, acme, raw_db: RawDatabase):
    seq = store.latest_change_seq()
    raw_db.execute("UPDATE orgs SET baa_active = TRUE WHERE id = 'acme'")
    assert logged(store, seq) == [("org", None, None, "acme")]
    assert store.get_org("acme").baa_active is True


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE api_keys SET name = 'renamed'",
        "UPDATE api_keys SET last_used_at = {now}",
        "UPDATE api_keys SET scopes = scopes, revoked_at = revoked_at",
        "UPDATE orgs SET name = 'Renamed', updated_at = {now}",
        "UPDATE orgs SET baa_active = FALSE",
    ],
    ids=["key-name", "last-used", "same-values", "org-name", "same-baa"],
)
def test_sql_update_not_logged(store, acme, raw_db: RawDatabase, statement: str):
    add_key(store)
    seq = store.latest_change_seq()
    raw_db.execute(statement.format(now=raw_db.now))
    assert logged(store, seq) == []


def test_sql_delete_key_logs_hash(store: KeyStore, acme, raw_db: RawDatabase):
    key = add_key(store)
    seq = store.latest_change_seq()
    raw_db.execute("DELETE FROM api_keys WHERE id = ?", (key.key_id,))
    assert logged(store, seq) == [("key", key.key_id, key.key_hash, "acme")]
    with pytest.raises(KeyNotFound):
        store.get_key_by_hash(key.key_hash)


def test_sql_delete_org_logged(store: KeyStore, acme, raw_db: RawDatabase):
    seq = store.latest_change_seq()
    raw_db.execute("DELETE FROM orgs WHERE id = 'acme'")
    assert logged(store, seq) == [("org", None, None, "acme")]


def test_sql_hash_change_logs_both(store: KeyStore, acme, raw_db: RawDatabase):
    key = add_key(store)
    seq = store.latest_change_seq()
    new_hash = hash_token(generate_token())
    raw_db.execute(
        "UPDATE api_keys SET key_hash = ? WHERE id = ?", (new_hash, key.key_id)
    )
    assert logged(store, seq) == [
        ("key", key.key_id, key.key_hash, "acme"),
        ("key", key.key_id, new_hash, "acme"),
    ]


def test_sql_org_move_logged(store: KeyStore, acme, raw_db: RawDatabase):
    store.create_org("beta")
    key = add_key(store)
    seq = store.latest_change_seq()
    raw_db.execute("UPDATE api_keys SET org_id = 'beta'")
    assert logged(store, seq) == [("key", key.key_id, key.key_hash, "beta")]


BAD_ROWS = {
    "upper-hash": ("api_keys", {"key_hash": "A" * 64}),
    "short-hash": ("api_keys", {"key_hash": "a" * 63}),
    "key-id": ("api_keys", {"id": "key_" + "i" * 20}),
    "empty-scopes": ("api_keys", {"scopes": ""}),
    "json-scopes": ("api_keys", {"scopes": '["ai:chat"]'}),
    "double-space": ("api_keys", {"scopes": "ai:chat  control:read"}),
    "unknown-org": ("api_keys", {"org_id": "nope"}),
    "token-name": ("api_keys", {"name": "hasp_key_live_x"}),
    "org-id-space": ("orgs", {"id": "ac me"}),
    "org-id-long": ("orgs", {"id": "x" * 65}),
    "blank-org-name": ("orgs", {"name": "  "}),
}


@pytest.mark.parametrize(("table", "values"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_sql_rejects_malformed_row(store, acme, raw_db: RawDatabase, table, values):
    defaults = {
        "api_keys": {"id": new_key_id(), "org_id": "acme", "name": "sql",
                     "key_hash": "a" * 64, "scopes": "ai:chat"},
        "orgs": {"id": "beta", "name": "Beta"},
    }  # fmt: skip
    row = {**defaults[table], **values}
    placeholders = ", ".join("?" for _ in row)
    seq = store.latest_change_seq()
    with pytest.raises(raw_db.error):
        raw_db.execute(
            f"INSERT INTO {table} ({', '.join(row)}) VALUES ({placeholders})",
            list(row.values()),
        )
    assert logged(store, seq) == []


@sqlite_only
@pytest.mark.parametrize(
    "moment", ["2030-01-01", "2030-01-01 00:00:00", "2030-01-01T00:00:00.000Z"]
)
def test_sqlite_rejects_other_time_format(store, acme, raw_db, moment: str):
    key = add_key(store)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        raw_db.execute(
            "UPDATE api_keys SET expires_at = ? WHERE id = ?", (moment, key.key_id)
        )


def test_record_last_used(store: KeyStore, acme):
    first, second = add_key(store), add_key(store)
    seq = store.latest_change_seq()
    early = datetime(2030, 1, 1, tzinfo=UTC)
    late = early + timedelta(minutes=5)
    assert store.record_last_used({first.key_id: late}) == 1
    updated = store.record_last_used(
        {first.key_id: early, second.key_id: early, new_key_id(): late}
    )
    assert updated == 1
    assert store.get_key(first.key_id).last_used_at == late
    assert store.get_key(second.key_id).last_used_at == early
    assert store.record_last_used({}) == 0
    assert logged(store, seq) == []


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({"key_abc": datetime(2030, 1, 1, tzinfo=UTC)}, "invalid key id"),
        ({KEY_ID: datetime(2030, 1, 1)}, "no time zone"),
    ],
    ids=["key-id", "naive"],
)
def test_record_last_used_rejects(store: KeyStore, times, expected: str):
    with pytest.raises(InvalidInput, match=expected):
        store.record_last_used(times)


def test_changes_since_order_and_limit(store: KeyStore):
    for org_id in ("a", "b", "c", "d"):
        store.create_org(org_id)
    seqs = [change.seq for change in store.changes_since(0)]
    assert seqs == sorted(seqs)
    assert [c.org_id for c in store.changes_since(0, limit=2)] == ["a", "b"]
    assert [c.org_id for c in store.changes_since(seqs[1])] == ["c", "d"]
    assert store.changes_since(seqs[-1]) == []


@pytest.mark.parametrize(
    ("seq", "limit", "expected"), [(-1, 10, "invalid change seq"),
    (0, 0, "invalid change limit")])  # fmt: skip
def test_changes_since_rejects(store: KeyStore, seq: int, limit: int, expected):
    with pytest.raises(InvalidInput, match=expected):
        store.changes_since(seq, limit)


def test_prune_changes(store: KeyStore):
    for org_id in ("a", "b", "c"):
        store.create_org(org_id)
    seqs = [change.seq for change in store.changes_since(0)]
    assert store.prune_changes(seqs[2]) == 2
    assert [change.seq for change in store.changes_since(0)] == [seqs[2]]
    assert store.latest_change_seq() == seqs[2]


def test_prune_all_keeps_seq_growing(store: KeyStore):
    store.create_org("a")
    latest = store.latest_change_seq()
    assert store.prune_changes(latest + 1) == 1
    assert store.latest_change_seq() == 0
    store.create_org("b")
    assert store.changes_since(0)[0].seq > latest


def test_change_repr_hides_hash(store: KeyStore, acme):
    key = add_key(store)
    change = store.changes_since(0)[-1]
    assert change.key_hash == key.key_hash
    assert key.key_hash not in repr(change)
    assert key.key_id in repr(change)


def docs_examples(backend: str) -> list[str]:
    """Return the SQL statements of docs/keystore.md's examples for ``backend``.

    An example is a sql code block whose first line is ``-- PostgreSQL`` or
    ``-- SQLite``.
    """
    marker = {"sqlite": "-- SQLite", "postgresql": "-- PostgreSQL"}[backend]
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.DOTALL)
    statements = []
    for block in blocks:
        if block.startswith(marker + "\n"):
            statements += [part.strip() for part in block.split(";\n") if part.strip()]
    return statements


def test_docs_examples_run(store: KeyStore, raw_db: RawDatabase, keystore_backend):
    statements = docs_examples(keystore_backend)
    assert len(statements) >= 4
    for statement in statements:
        raw_db.execute(statement)
    key = store.get_key(KEY_ID)
    assert key.org_id == "acme"
    assert key.scopes == ("ai:chat", "ai:documents")
    assert key.key_hash == hash_token(DOCS_TOKEN)
    assert key.revoked_at is not None
    assert timedelta(days=89) < key.expires_at - key.created_at < timedelta(days=91)
    assert store.get_org("acme").baa_active is False
    kinds = [change.kind for change in store.changes_since(0)]
    assert kinds == ["org", "key", "key", "org"]


def test_wait_for_changes_times_out(store: KeyStore, keystore_backend: str):
    store.wait_for_changes(0.1)  # PostgreSQL starts listening on the first call.
    expected = POLL_INTERVAL if keystore_backend == "sqlite" else 0.5
    # NOTE: the notification channel is database-wide, so another test run on
    # the same database can wake a wait early. One of three waits must time out.
    waits = []
    for _ in range(3):
        started = time.monotonic()
        store.wait_for_changes(0.5)
        waits.append(time.monotonic() - started)
        if waits[-1] >= expected - 0.05:
            break
    assert max(waits) >= expected - 0.05
    assert max(waits) < expected + 0.5


@sqlite_only
def test_sqlite_wait_polls(store: KeyStore):
    started = time.monotonic()
    store.wait_for_changes(10)
    assert time.monotonic() - started < POLL_INTERVAL + 0.5


@postgres_only
def test_postgres_wait_wakes_on_write(store: KeyStore, raw_db: RawDatabase):
    started = time.monotonic()
    store.wait_for_changes(5)
    assert time.monotonic() - started < 1
    committed = []

    def write() -> None:
        raw_db.execute("INSERT INTO orgs (id, name) VALUES ('acme', 'Acme')")
        committed.append(time.monotonic())

    writer = threading.Timer(0.3, write)
    writer.start()
    # A write to another schema of the same database wakes the wait too, so
    # wait again until the change shows up, as a caller does.
    deadline = time.monotonic() + 10
    while not store.changes_since(0) and time.monotonic() < deadline:
        store.wait_for_changes(10)
    woke = time.monotonic()
    writer.join()
    assert logged(store) == [("org", None, None, "acme")]
    assert woke - committed[0] < 1


@postgres_only
def test_postgres_wait_consumes_backlog(store: KeyStore, raw_db: RawDatabase):
    store.wait_for_changes(0)
    for org_id in ("a", "b", "c"):
        raw_db.execute("INSERT INTO orgs (id, name) VALUES (?, ?)", (org_id, org_id))
    # The server delivers notifications to the listener asynchronously, so give
    # the last one time to arrive; one that comes later wakes the next call.
    time.sleep(0.3)
    store.wait_for_changes(5)
    started = time.monotonic()
    store.wait_for_changes(0.3)
    assert time.monotonic() - started >= 0.25


@postgres_only
def test_postgres_writers_commit_in_seq_order(store: KeyStore, raw_db: RawDatabase):
    with psycopg.connect(raw_db.url) as first:
        first.execute("INSERT INTO orgs (id, name) VALUES ('a', 'A')")
        second = threading.Thread(
            target=raw_db.execute,
            args=["INSERT INTO orgs (id, name) VALUES ('b', 'B')"],
        )
        second.start()
        second.join(0.5)
        # The second writer waits for the first one's change-log lock.
        assert second.is_alive()
        first.commit()
    second.join(5)
    assert [change.org_id for change in store.changes_since(0)] == ["a", "b"]
