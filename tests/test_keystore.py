"""The SQLite key store on real files under tmp_path."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from hasp_authz.keystore import (
    ApiKey,
    InvalidInput,
    KeyNotFound,
    KeyStoreUnavailable,
    OrgExists,
    OrgNotFound,
    new_key_id,
    open_keystore,
)
from hasp_authz.keystore.sqlite import MIGRATIONS, SqliteKeyStore
from hasp_authz.tokens import generate_token, hash_token

KEY_ID_RE = re.compile(r"key_[0-9abcdefghjkmnpqrstvwxyz]{20}")
STORED_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keystore.db"


@pytest.fixture
def store(db_path: Path):
    with SqliteKeyStore.open(str(db_path)) as opened:
        yield opened


@pytest.fixture
def acme(store: SqliteKeyStore):
    return store.create_org("acme", "Acme Inc")


def add_key(store: SqliteKeyStore, org_id: str = "acme", **changes) -> ApiKey:
    fields = {"name": "ci", "key_hash": hash_token(generate_token())}
    fields["scopes"] = ["ai:chat"]
    fields.update(changes)
    return store.create_key(org_id, **fields)


def table_rows(db_path: Path, table: str) -> list[tuple]:
    with sqlite3.connect(db_path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


def test_open_creates_parent_directory(tmp_path: Path):
    path = tmp_path / "a" / "b" / "keys.db"
    SqliteKeyStore.open(str(path)).close()
    assert path.is_file()


def test_open_applies_migrations_once(db_path: Path):
    SqliteKeyStore.open(str(db_path)).close()
    with SqliteKeyStore.open(str(db_path)) as store:
        assert store.schema_version() == MIGRATIONS[-1][0]
    versions = [row[0] for row in table_rows(db_path, "schema_version")]
    assert versions == [version for version, _ in MIGRATIONS]


def test_open_uses_wal_mode(store: SqliteKeyStore, db_path: Path):
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_rejects_newer_schema(db_path: Path):
    SqliteKeyStore.open(str(db_path)).close()
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO schema_version VALUES (999, 'x')")
    with pytest.raises(KeyStoreUnavailable, match="schema version 999"):
        SqliteKeyStore.open(str(db_path))


def test_open_keeps_data(db_path: Path):
    with SqliteKeyStore.open(str(db_path)) as store:
        store.create_org("acme")
    with SqliteKeyStore.open(str(db_path)) as store:
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
        ("postgresql://user:s3cret@127.0.0.1/keys", "not supported yet"),
        ("postgres://user:s3cret@127.0.0.1/keys", "not supported yet"),
        ("mysql://user:s3cret@127.0.0.1/keys", "unsupported key store URL scheme"),
        ("keys.db", "unsupported key store URL scheme"),
        ("sqlite://", "invalid SQLite URL"),
        ("sqlite:///", "invalid SQLite URL"),
        ("sqlite://host/keys.db", "invalid SQLite URL"),
        ("sqlite:///keys.db?mode=ro", "not supported"),
    ],
)
def test_open_keystore_rejects_url(url: str, expected: str):
    with pytest.raises(InvalidInput, match=expected) as caught:
        open_keystore(url)
    assert "s3cret" not in str(caught.value)


def test_create_org_defaults(store: SqliteKeyStore):
    org = store.create_org("acme")
    assert org.name == "acme"
    assert org.baa_active is False
    assert org.created_at.tzinfo == UTC
    assert store.get_org("acme") == org


def test_create_org_with_baa(store: SqliteKeyStore):
    store.create_org("acme", "Acme Inc", baa_active=True)
    assert store.get_org("acme").baa_active is True


def test_create_org_duplicate(store: SqliteKeyStore, acme, db_path: Path):
    with pytest.raises(OrgExists, match="'acme' already exists"):
        store.create_org("acme", "Other")
    assert [row[1] for row in table_rows(db_path, "orgs")] == ["Acme Inc"]


@pytest.mark.parametrize(
    "org_id", ["a", "A1", "acme.prod_2-eu", "0rg", "x" * 64], ids=str.__len__
)
def test_org_id_valid(store: SqliteKeyStore, org_id: str):
    assert store.create_org(org_id).org_id == org_id


@pytest.mark.parametrize(
    "org_id",
    ["", " acme", "-acme", ".acme", "x" * 65, "ac me", "acme/x", "acme\n", "acmé"],
)
def test_org_id_invalid(store: SqliteKeyStore, org_id: str, db_path: Path):
    with pytest.raises(InvalidInput, match="invalid org id"):
        store.create_org(org_id)
    assert table_rows(db_path, "orgs") == []


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "tab\there", "\x00", "n" * 129])
def test_key_name_invalid(store: SqliteKeyStore, acme, name: str):
    with pytest.raises(InvalidInput, match="invalid key name"):
        add_key(store, name=name)


def test_org_id_token_rejected(store: SqliteKeyStore):
    token = generate_token()
    with pytest.raises(InvalidInput) as caught:
        store.create_org(token)
    assert token not in str(caught.value)
    assert "looks like an API key token" in str(caught.value)


def test_key_name_token_rejected(store: SqliteKeyStore, acme):
    token = generate_token()
    with pytest.raises(InvalidInput, match="must not contain") as caught:
        add_key(store, name=f"copy of {token}")
    assert token not in str(caught.value)


@pytest.mark.parametrize(("start", "request_", "changed"), [(False, True, True),
    (True, False, True), (True, True, False), (False, False, False)])  # fmt: skip
def test_set_baa(store: SqliteKeyStore, start: bool, request_: bool, changed: bool):
    before = store.create_org("acme", baa_active=start)
    org, was_changed = store.set_baa("acme", request_)
    assert was_changed is changed
    assert org.baa_active is request_
    assert store.get_org("acme") == org
    assert (org.updated_at > before.updated_at) is changed


def test_set_baa_unknown_org(store: SqliteKeyStore):
    with pytest.raises(OrgNotFound, match="hasp-keys orgs create nope"):
        store.set_baa("nope", True)


def test_create_key_fields(store: SqliteKeyStore, acme):
    key_hash = hash_token(generate_token())
    key = store.create_key("acme", "ci", key_hash, ["ai:chat", "control:read"])
    assert KEY_ID_RE.fullmatch(key.key_id)
    assert key.key_hash == key_hash
    assert key.scopes == ("ai:chat", "control:read")
    assert key.revoked_at is None
    assert key.last_used_at is None
    assert key.active
    assert store.get_key(key.key_id) == key


def test_create_key_dedupes_scopes(store: SqliteKeyStore, acme):
    key = add_key(store, scopes=["ai:chat", "control:read", "ai:chat"])
    assert key.scopes == ("ai:chat", "control:read")


def test_create_key_stores_expiry(store: SqliteKeyStore, acme):
    berlin = timezone(timedelta(hours=1))
    expires = datetime(2030, 1, 1, 13, 0, tzinfo=berlin)
    key = add_key(store, expires_at=expires)
    stored = store.get_key(key.key_id).expires_at
    assert stored == expires
    assert stored.tzinfo == UTC


def test_create_key_naive_expiry(store: SqliteKeyStore, acme):
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
def test_create_key_rejects(store, acme, db_path: Path, changes, error, expected):
    with pytest.raises(error, match=expected):
        add_key(store, **changes)
    assert table_rows(db_path, "api_keys") == []


def test_create_key_duplicate_hash(store: SqliteKeyStore, acme, db_path: Path):
    key = add_key(store)
    with pytest.raises(InvalidInput, match="already exists") as caught:
        add_key(store, key_hash=key.key_hash)
    assert key.key_hash not in str(caught.value)
    assert len(table_rows(db_path, "api_keys")) == 1


def test_store_keeps_only_hash(db_path: Path):
    token = generate_token()
    with SqliteKeyStore.open(str(db_path)) as store:
        store.create_org("acme")
        store.create_key("acme", "ci", hash_token(token), ["ai:chat"])
    files = [path for path in db_path.parent.iterdir() if path.is_file()]
    content = b"".join(path.read_bytes() for path in files)
    assert token.encode() not in content
    assert token.removeprefix("hasp_key_live_").encode() not in content
    assert hash_token(token).encode() in content


def test_timestamps_stored_as_utc_text(store: SqliteKeyStore, acme, db_path: Path):
    key = add_key(store)
    store.revoke_key(key.key_id)
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT created_at, revoked_at FROM api_keys").fetchone()
    assert all(STORED_TIME_RE.fullmatch(text) for text in row)


def test_revoke_key(store: SqliteKeyStore, acme):
    key = add_key(store)
    revoked, changed = store.revoke_key(key.key_id)
    assert changed is True
    assert revoked.revoked_at is not None
    assert not revoked.active
    assert store.get_key(key.key_id) == revoked


def test_revoke_key_twice(store: SqliteKeyStore, acme):
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
def test_revoke_key_rejects(store: SqliteKeyStore, acme, key_id: str, error):
    key = add_key(store)
    with pytest.raises(error) as caught:
        store.revoke_key(key_id)
    assert "hasp_key_live_" not in str(caught.value)
    assert store.get_key(key.key_id).active


def test_list_keys_filters(store: SqliteKeyStore, acme):
    store.create_org("beta")
    first = add_key(store, name="first")
    second = add_key(store, "beta", name="second")
    revoked = add_key(store, name="revoked")
    store.revoke_key(revoked.key_id)
    assert [key.name for key in store.list_keys()] == ["first", "second", "revoked"]
    assert [key.key_id for key in store.list_keys("beta")] == [second.key_id]
    active = store.list_keys(include_revoked=False)
    assert [key.key_id for key in active] == [first.key_id, second.key_id]


def test_list_keys_unknown_org(store: SqliteKeyStore):
    with pytest.raises(OrgNotFound):
        store.list_keys("nope")


def test_list_orgs_sorted(store: SqliteKeyStore):
    for org_id in ["zeta", "Acme", "beta"]:
        store.create_org(org_id)
    assert [org.org_id for org in store.list_orgs()] == ["Acme", "beta", "zeta"]


def test_two_stores_share_file(db_path: Path):
    with (
        SqliteKeyStore.open(str(db_path)) as one,
        SqliteKeyStore.open(str(db_path)) as two,
    ):
        one.create_org("acme")
        add_key(two)
        assert len(one.list_keys()) == 1


def test_api_key_repr_hides_hash(store: SqliteKeyStore, acme):
    key = add_key(store)
    assert key.key_hash not in repr(key)
    assert key.key_id in repr(key)


def test_new_key_id_format():
    ids = {new_key_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(KEY_ID_RE.fullmatch(key_id) for key_id in ids)
