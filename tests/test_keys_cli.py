"""The ``hasp-keys`` console script, run as a subprocess on a real Redis and a
real key store of each backend (``keystore_url`` in conftest)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis

from conftest import RawDatabase
from hasp_authz.dev.redis_server import free_port
from hasp_authz.keystore import open_keystore
from hasp_authz.keystore.sqlite_schema import MIGRATIONS as SQLITE_MIGRATIONS
from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.tokens import hash_token, is_well_formed
from test_publisher import assert_change_message

HASP_KEYS = str(Path(sys.executable).parent / "hasp-keys")

Run = Callable[..., subprocess.CompletedProcess[str]]

sqlite_only = pytest.mark.parametrize("keystore_backend", ["sqlite"])


@pytest.fixture
def cli_env(keystore_url: str, redis_url: str, redis_prefix: str):
    env = {name: value for name, value in os.environ.items() if "HASP_" not in name}
    env["HASP_KEYSTORE_URL"] = keystore_url
    env["HASP_REDIS_URL"] = redis_url
    env["HASP_REDIS_PREFIX"] = redis_prefix
    return env


@pytest.fixture
def run(tmp_path: Path, cli_env: dict[str, str], redis_client) -> Run:
    """Run hasp-keys with the test's store, Redis and prefix; extra env overrides."""

    def run_hasp_keys(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [HASP_KEYS, *args],
            env={**cli_env, **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )

    return run_hasp_keys


@pytest.fixture
def subscriber(redis_client: redis.Redis, layout: RedisLayout):
    pubsub = redis_client.pubsub()
    pubsub.subscribe(layout.changes_channel)
    assert pubsub.get_message(timeout=2.0)["type"] == "subscribe"
    yield pubsub
    pubsub.close()


def messages(pubsub, expected: int = 1) -> list[str]:
    """Return the change messages that arrive, waiting up to 2 s for ``expected``.

    Any message that follows within 0.1 s is returned too, so extras show up.
    """
    received = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            received.append(message["data"])
        elif len(received) >= expected:
            break
    return received


def only_message(pubsub) -> str:
    """Return the one change message that arrives, and fail on none or several."""
    received = messages(pubsub)
    assert len(received) == 1, f"expected 1 change message, got {len(received)}"
    return received[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stderr == ""
    assert result.returncode == 0
    return result.stdout


@pytest.fixture
def token(run: Run) -> str:
    """The token of a key 'ci' of org acme, which has an active BAA."""
    ok(run("orgs", "create", "acme", "--name", "Acme Inc", "--baa"))
    return ok(run("create", "--org", "acme", "--name", "ci", "--scope", "ai:chat"))[:-1]


def key_id_of(raw_db: RawDatabase, token: str) -> str:
    query = "SELECT id FROM api_keys WHERE key_hash = ?"
    return raw_db.execute(query, (hash_token(token),))[0][0]


def redis_dump(client: redis.Redis, layout: RedisLayout) -> dict[str, str]:
    names = client.scan_iter(match=f"{layout.prefix}*", count=1000)
    return {name: client.get(name) for name in names}


def test_orgs_create(run: Run, redis_client, layout):
    stdout = ok(run("orgs", "create", "acme", "--name", "Acme Inc"))
    assert stdout == "created org acme ('Acme Inc'), BAA off\n"
    record = OrgRecord.from_json(redis_client.get(layout.org("acme")))
    assert record == OrgRecord("acme", False)


def test_orgs_create_baa(run: Run, redis_client, layout):
    assert "BAA on" in ok(run("orgs", "create", "acme", "--baa"))
    assert OrgRecord.from_json(redis_client.get(layout.org("acme"))).baa_active


@pytest.mark.parametrize(
    ("state", "stdout", "baa_active"),
    [
        ("off", "org acme: BAA off\n", False),
        ("on", "org acme: BAA was already on, nothing changed\n", True),
    ],
)
def test_orgs_baa(
    run, token, redis_client, layout, subscriber, state, stdout, baa_active
):
    assert ok(run("orgs", "baa", "acme", state)) == stdout
    record = OrgRecord.from_json(redis_client.get(layout.org("acme")))
    assert record.baa_active is baa_active
    assert_change_message(only_message(subscriber), {"kind": "org", "org_id": "acme"})


def test_orgs_list_json(run: Run, token: str):
    orgs = json.loads(ok(run("orgs", "list", "--json")))
    assert [(org["org_id"], org["name"], org["baa_active"]) for org in orgs] == [
        ("acme", "Acme Inc", True)
    ]


def test_create_prints_token_alone(run: Run, raw_db: RawDatabase, redis_client, layout):
    ok(run("orgs", "create", "acme"))
    stdout = ok(run("create", "--org", "acme", "--name", "ci", "--scope", "ai:chat"))
    token = stdout.removesuffix("\n")
    assert stdout.count("\n") == 1
    assert is_well_formed(token)
    record = KeyRecord.from_json(redis_client.get(layout.key(hash_token(token))))
    assert record.key_id == key_id_of(raw_db, token)
    assert record.scopes == ("ai:chat",)


def test_create_json(run: Run, raw_db: RawDatabase):
    ok(run("orgs", "create", "acme"))
    args = ["--scope", "ai:chat", "--scope", "control:read", "--json"]
    stdout = ok(run("create", "--org", "acme", "--name", "ci", *args))
    created = json.loads(stdout)
    assert stdout.count("\n") == 1
    assert is_well_formed(created["token"])
    assert created["key_id"] == key_id_of(raw_db, created["token"])
    assert created["org_id"] == "acme"
    assert created["name"] == "ci"
    assert created["scopes"] == ["ai:chat", "control:read"]
    assert created["created_at"].endswith("+00:00")


def test_create_publishes_change(run: Run, subscriber):
    ok(run("orgs", "create", "acme"))
    assert_change_message(only_message(subscriber), {"kind": "org", "org_id": "acme"})
    token = ok(run("create", "--org", "acme", "--name", "ci", "--scope", "ai:chat"))
    assert_change_message(
        only_message(subscriber), {"kind": "key", "hash": hash_token(token[:-1])}
    )


def test_db_holds_only_hash(run: Run, token: str, raw_db: RawDatabase):
    content = repr(raw_db.dump())
    assert token not in content
    assert hash_token(token) in content


@sqlite_only
def test_sqlite_file_holds_only_hash(run: Run, token: str, raw_db: RawDatabase):
    folder = Path(raw_db.sqlite_path).parent
    content = b"".join(path.read_bytes() for path in folder.iterdir())
    assert token.encode() not in content
    assert hash_token(token).encode() in content


def test_revoke(run, token, raw_db, redis_client, layout, subscriber):
    key_id = key_id_of(raw_db, token)
    stdout = ok(run("revoke", key_id))
    assert stdout == f"revoked {key_id} (org acme, name 'ci')\n"
    assert redis_client.exists(layout.key(hash_token(token))) == 0
    assert_change_message(
        only_message(subscriber), {"kind": "key", "hash": hash_token(token)}
    )


def test_revoke_twice(run: Run, token: str, raw_db: RawDatabase):
    key_id = key_id_of(raw_db, token)
    ok(run("revoke", key_id))
    stdout = ok(run("revoke", key_id))
    assert stdout.startswith(f"{key_id} was already revoked at ")
    assert stdout.endswith(", nothing changed\n")


def test_list_table(run: Run, token: str, raw_db: RawDatabase):
    key_id = key_id_of(raw_db, token)
    ok(run("revoke", key_id))
    header, row = ok(run("list")).splitlines()
    assert header.split() == ["KEY", "ID", "ORG", "NAME", "SCOPES", "CREATED",
                              "EXPIRES", "REVOKED", "LAST", "USED"]  # fmt: skip
    cells = row.split()
    assert cells[:4] == [key_id, "acme", "ci", "ai:chat"]
    assert cells[4].endswith("Z")
    assert cells[5] == "-"
    assert cells[6].endswith("Z")
    assert cells[7] == "-"


def test_list_hides_secrets(run: Run, token: str):
    for args in (["list"], ["list", "--json"]):
        stdout = ok(run(*args))
        assert token not in stdout
        assert hash_token(token) not in stdout


def test_list_json_filters_org(run: Run, token: str, raw_db: RawDatabase):
    ok(run("orgs", "create", "beta"))
    ok(run("create", "--org", "beta", "--name", "b", "--scope", "ai:chat"))
    keys = json.loads(ok(run("list", "--org", "acme", "--json")))
    assert [key["key_id"] for key in keys] == [key_id_of(raw_db, token)]
    assert keys[0]["revoked_at"] is None
    assert keys[0]["expires_at"] is None
    assert keys[0]["last_used_at"] is None


def test_sync(run: Run, token: str, redis_client, layout, subscriber):
    redis_client.set(layout.key("0" * 64), "stale")
    stdout = ok(run("sync"))
    assert stdout.startswith("synced to Redis at 127.0.0.1:")
    assert stdout.endswith("keys 1, orgs 1, stale records removed 1\n")
    assert redis_client.exists(layout.key("0" * 64)) == 0
    assert json.loads(redis_client.get(layout.complete_marker))["keys"] == 1
    assert_change_message(only_message(subscriber), {"kind": "all"})


@sqlite_only
@pytest.mark.parametrize("place", ["before", "after"])
def test_keystore_url_flag(run: Run, tmp_path: Path, place: str):
    flag = ["--keystore-url", f"sqlite:///{tmp_path / 'flag.db'}"]
    args = ["orgs", "create", "acme"]
    ok(run(*flag, *args) if place == "before" else run(*args, *flag))
    assert (tmp_path / "flag.db").is_file()


@sqlite_only
def test_default_keystore_relative(run: Run, tmp_path: Path, cli_env):
    del cli_env["HASP_KEYSTORE_URL"]
    ok(run("orgs", "create", "acme"))
    assert (tmp_path / ".run" / "keystore.db").is_file()


UNKNOWN_KEY_ID = "key_" + "z" * 20

ERROR_CASES = {
    "unknown-org": (
        ["create", "--org", "nope", "--name", "x", "--scope", "ai:chat"],
        "org 'nope' not found",
    ),
    "duplicate-org": (["orgs", "create", "acme"], "org 'acme' already exists"),
    "unknown-scope": (
        ["create", "--org", "acme", "--name", "x", "--scope", "ai:everything"],
        "unknown scope 'ai:everything'",
    ),
    "unknown-key": (["revoke", UNKNOWN_KEY_ID], f"key '{UNKNOWN_KEY_ID}' not found"),
    "malformed-key": (["revoke", "key_abc"], "invalid key id 'key_abc'"),
    "malformed-org": (["orgs", "create", "acme corp"], "invalid org id 'acme corp'"),
    "baa-unknown-org": (["orgs", "baa", "nope", "on"], "org 'nope' not found"),
    "list-unknown-org": (["list", "--org", "nope"], "org 'nope' not found"),
    "empty-name": (
        ["create", "--org", "acme", "--name", " ", "--scope", "ai:chat"],
        "invalid key name",
    ),
    "postgresql-url": (
        ["--keystore-url", "postgresql://u:s3cret@[::1/k", "orgs", "create", "b"],
        "invalid PostgreSQL URL",
    ),
    "redis-url": (
        ["--redis-url", "http://:s3cret@127.0.0.1/0", "orgs", "create", "b"],
        "invalid Redis URL",
    ),
}


@pytest.mark.parametrize(
    ("args", "expected"), ERROR_CASES.values(), ids=ERROR_CASES.keys()
)
def test_error_changes_nothing(
    run, token, raw_db, redis_client, layout, args, expected
):
    store_before = raw_db.dump()
    redis_before = redis_dump(redis_client, layout)
    result = run(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"hasp-keys: error: {expected}")
    assert result.stderr.count("\n") == 1
    assert "s3cret" not in result.stderr
    assert raw_db.dump() == store_before
    assert redis_dump(redis_client, layout) == redis_before


def test_token_as_key_id_hidden(run: Run, token: str):
    result = run("revoke", token)
    assert result.returncode == 1
    assert token not in result.stderr
    assert "looks like an API key token" in result.stderr


UNREACHABLE_STORES = {
    "postgresql-port": (
        "postgresql://hasp:s3cret@127.0.0.1:{port}/keys",
        "cannot connect to key store postgresql://hasp@127.0.0.1:{port}/keys (",
    ),
    "sqlite-directory": ("sqlite:///{tmp}", "cannot open key store {tmp} ("),
    "sqlite-parent-file": (
        "sqlite:///{tmp}/file/keys.db",
        "cannot create the directory of key store {tmp}/file/keys.db (",
    ),
}


# The unreachable URL is the subject, so the test's own store is SQLite only.
@sqlite_only
@pytest.mark.parametrize(
    ("url", "expected"), UNREACHABLE_STORES.values(), ids=UNREACHABLE_STORES.keys()
)
@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["orgs", "create", "beta"],
        ["create", "--org", "acme", "--name", "x", "--scope", "ai:chat"],
        ["revoke", "KEY"],
        ["migrate"],
    ],
    ids=["list", "orgs-create", "create", "revoke", "migrate"],
)
def test_store_unreachable(
    run, token, raw_db, redis_client, layout, tmp_path, url, expected, command
):
    (tmp_path / "file").write_text("x")
    fill = {"port": free_port(), "tmp": tmp_path}
    command = [key_id_of(raw_db, token) if arg == "KEY" else arg for arg in command]
    store_before = raw_db.dump()
    redis_before = redis_dump(redis_client, layout)
    result = run(*command, HASP_KEYSTORE_URL=url.format(**fill))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("hasp-keys: error: " + expected.format(**fill))
    assert result.stderr.count("\n") == 1
    assert "s3cret" not in result.stderr
    assert raw_db.dump() == store_before
    assert redis_dump(redis_client, layout) == redis_before


def test_usage_error_exit_code(run: Run):
    result = run("create", "--org", "acme", "--name", "ci")
    assert result.returncode == 2
    assert "--scope" in result.stderr


def test_redis_down_after_store_write(
    run: Run, token: str, raw_db: RawDatabase, redis_client, layout
):
    down = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    result = run("create", "--org", "acme", "--name", "late", "--scope", "ai:chat",
                 HASP_REDIS_URL=down)  # fmt: skip
    assert result.returncode == 3
    new_token = result.stdout.removesuffix("\n")
    assert is_well_formed(new_token)
    assert result.stderr.startswith(
        "hasp-keys: warning: the key store was changed but Redis was not updated"
    )
    assert "run 'hasp-keys sync'" in result.stderr
    assert result.stderr.count("\n") == 1
    assert "s3cret-pw" not in result.stderr
    assert key_id_of(raw_db, new_token).startswith("key_")
    assert redis_client.exists(layout.key(hash_token(new_token))) == 0

    ok(run("sync"))
    assert redis_client.exists(layout.key(hash_token(new_token))) == 1


@pytest.mark.parametrize(
    "command",
    [["orgs", "create", "beta"], ["orgs", "baa", "acme", "off"], ["revoke", "KEY"]],
    ids=["orgs-create", "orgs-baa", "revoke"],
)
def test_redis_down_exit_code(
    run: Run, token: str, raw_db: RawDatabase, command: list[str]
):
    command = [key_id_of(raw_db, token) if arg == "KEY" else arg for arg in command]
    result = run(*command, HASP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 3
    assert "the key store was changed but Redis was not updated" in result.stderr


def test_sync_redis_down(run: Run, token: str):
    result = run("sync", HASP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert result.stderr.startswith("hasp-keys: error: Redis at 127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_help_lists_exit_codes(run: Run):
    stdout = ok(run("--help"))
    assert "3  the key store has the change but Redis was not updated" in stdout
    assert "HASP_KEYSTORE_URL" in stdout


def test_migrate(run: Run, keystore_url: str):
    assert ok(run("migrate")) == "key store schema migrated from version 0 to 2\n"
    assert (
        ok(run("migrate")) == "key store schema is at version 2, nothing to migrate\n"
    )
    with closing(open_keystore(keystore_url, migrate=False)) as store:
        assert store.schema_version() == 2


@sqlite_only
def test_migrate_sqlite_version_1(run: Run, raw_db: RawDatabase):
    Path(raw_db.sqlite_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(raw_db.sqlite_path)) as db, db:
        for statement in SQLITE_MIGRATIONS[0][1]:
            db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER, applied_at TEXT)")
        db.execute("INSERT INTO schema_version VALUES (1, 'then')")
    assert ok(run("migrate")) == "key store schema migrated from version 1 to 2\n"


def test_migrate_rejects_newer_schema(run: Run, raw_db: RawDatabase):
    ok(run("migrate"))
    raw_db.execute(
        f"INSERT INTO schema_version (version, applied_at) VALUES (7, {raw_db.now})"
    )
    for command in (["migrate"], ["list"]):
        result = run(*command)
        assert result.returncode == 1
        assert "has schema version 7, newer than version 2" in result.stderr
        assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [("90s", 90), ("30m", 1800), ("12h", 43200), ("30d", 2592000), ("007m", 420)],
)
def test_create_expires_in(run, redis_client, layout, duration: str, seconds: int):
    ok(run("orgs", "create", "acme", "--baa"))
    args = ["--org", "acme", "--name", "ci", "--scope", "ai:chat", "--json"]
    created = json.loads(ok(run("create", *args, "--expires-in", duration)))
    expires_at = datetime.fromisoformat(created["expires_at"])
    lifetime = expires_at - datetime.fromisoformat(created["created_at"])
    assert abs(lifetime - timedelta(seconds=seconds)) < timedelta(seconds=5)
    stored = redis_client.get(layout.key(hash_token(created["token"])))
    assert KeyRecord.from_json(stored).expires_at == expires_at.timestamp()
    listed = json.loads(ok(run("list", "--json")))
    assert listed[0]["expires_at"] == created["expires_at"]
    row = ok(run("list")).splitlines()[1].split()
    assert row[5] == expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_create_without_expiry(run: Run):
    ok(run("orgs", "create", "acme"))
    args = ["--org", "acme", "--name", "ci", "--scope", "ai:chat", "--json"]
    assert json.loads(ok(run("create", *args)))["expires_at"] is None


@pytest.mark.parametrize(
    "value",
    ["5x", "0s", "-1h", "", "1.5h", "h", "10", "5 s", " 5s", "5S", "1e3s", "0d",
     "99999999999d", "9999999999999999999999s"],
)  # fmt: skip
def test_create_expires_in_invalid(run: Run, raw_db: RawDatabase, value: str):
    ok(run("orgs", "create", "acme"))
    store_before = raw_db.dump()
    args = ["--org", "acme", "--name", "ci", "--scope", "ai:chat"]
    result = run("create", *args, f"--expires-in={value}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"argument --expires-in: invalid duration {value!r}" in result.stderr
    assert raw_db.dump() == store_before


def test_create_expires_in_negative_separate(run: Run, raw_db: RawDatabase):
    ok(run("orgs", "create", "acme"))
    args = ["--org", "acme", "--name", "ci", "--scope", "ai:chat"]
    result = run("create", *args, "--expires-in", "-1h")
    assert result.returncode == 2
    assert "--expires-in" in result.stderr
    assert raw_db.rows("api_keys") == []
