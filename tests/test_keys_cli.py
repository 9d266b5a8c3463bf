"""The ``hasp-keys`` console script, run as a subprocess on a real SQLite file
and a real Redis."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from hasp_authz.dev.redis_server import free_port
from hasp_authz.records import (
    KeyRecord,
    OrgRecord,
    RedisLayout,
    flush_message,
    key_changed_message,
    org_changed_message,
)
from hasp_authz.tokens import hash_token, is_well_formed

HASP_KEYS = str(Path(sys.executable).parent / "hasp-keys")

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "keystore.db"


@pytest.fixture
def cli_env(tmp_path: Path, db_path: Path, redis_url: str, redis_prefix: str):
    env = {name: value for name, value in os.environ.items() if "HASP_" not in name}
    env["HASP_KEYSTORE_URL"] = f"sqlite:///{db_path}"
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


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stderr == ""
    assert result.returncode == 0
    return result.stdout


@pytest.fixture
def token(run: Run) -> str:
    """The token of a key 'ci' of org acme, which has an active BAA."""
    ok(run("orgs", "create", "acme", "--name", "Acme Inc", "--baa"))
    return ok(run("create", "--org", "acme", "--name", "ci", "--scope", "ai:chat"))[:-1]


def key_id_of(db_path: Path, token: str) -> str:
    with sqlite3.connect(db_path) as db:
        query = "SELECT id FROM api_keys WHERE key_hash = ?"
        return db.execute(query, (hash_token(token),)).fetchone()[0]


def store_dump(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return list(db.iterdump())


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
    assert messages(subscriber) == [org_changed_message("acme")]


def test_orgs_list_json(run: Run, token: str):
    orgs = json.loads(ok(run("orgs", "list", "--json")))
    assert [(org["org_id"], org["name"], org["baa_active"]) for org in orgs] == [
        ("acme", "Acme Inc", True)
    ]


def test_create_prints_token_alone(run: Run, db_path: Path, redis_client, layout):
    ok(run("orgs", "create", "acme"))
    stdout = ok(run("create", "--org", "acme", "--name", "ci", "--scope", "ai:chat"))
    token = stdout.removesuffix("\n")
    assert stdout.count("\n") == 1
    assert is_well_formed(token)
    record = KeyRecord.from_json(redis_client.get(layout.key(hash_token(token))))
    assert record.key_id == key_id_of(db_path, token)
    assert record.scopes == ("ai:chat",)


def test_create_json(run: Run, db_path: Path):
    ok(run("orgs", "create", "acme"))
    args = ["--scope", "ai:chat", "--scope", "control:read", "--json"]
    stdout = ok(run("create", "--org", "acme", "--name", "ci", *args))
    created = json.loads(stdout)
    assert stdout.count("\n") == 1
    assert is_well_formed(created["token"])
    assert created["key_id"] == key_id_of(db_path, created["token"])
    assert created["org_id"] == "acme"
    assert created["name"] == "ci"
    assert created["scopes"] == ["ai:chat", "control:read"]
    assert created["created_at"].endswith("+00:00")


def test_create_publishes_change(run: Run, subscriber):
    ok(run("orgs", "create", "acme"))
    assert messages(subscriber) == [org_changed_message("acme")]
    token = ok(run("create", "--org", "acme", "--name", "ci", "--scope", "ai:chat"))
    assert messages(subscriber) == [key_changed_message(hash_token(token[:-1]))]


def test_db_holds_only_hash(run: Run, token: str, db_path: Path):
    content = b"".join(path.read_bytes() for path in db_path.parent.iterdir())
    assert token.encode() not in content
    assert hash_token(token).encode() in content


def test_revoke(run, token, db_path, redis_client, layout, subscriber):
    key_id = key_id_of(db_path, token)
    stdout = ok(run("revoke", key_id))
    assert stdout == f"revoked {key_id} (org acme, name 'ci')\n"
    assert redis_client.exists(layout.key(hash_token(token))) == 0
    assert messages(subscriber) == [key_changed_message(hash_token(token))]


def test_revoke_twice(run: Run, token: str, db_path: Path):
    key_id = key_id_of(db_path, token)
    ok(run("revoke", key_id))
    stdout = ok(run("revoke", key_id))
    assert stdout.startswith(f"{key_id} was already revoked at ")
    assert stdout.endswith(", nothing changed\n")


def test_list_table(run: Run, token: str, db_path: Path):
    key_id = key_id_of(db_path, token)
    ok(run("revoke", key_id))
    header, row = ok(run("list")).splitlines()
    assert header.split() == ["KEY", "ID", "ORG", "NAME", "SCOPES", "CREATED",
                              "REVOKED", "LAST", "USED"]  # fmt: skip
    cells = row.split()
    assert cells[:4] == [key_id, "acme", "ci", "ai:chat"]
    assert cells[4].endswith("Z")
    assert cells[5].endswith("Z")
    assert cells[6] == "-"


def test_list_hides_secrets(run: Run, token: str):
    for args in (["list"], ["list", "--json"]):
        stdout = ok(run(*args))
        assert token not in stdout
        assert hash_token(token) not in stdout


def test_list_json_filters_org(run: Run, token: str, db_path: Path):
    ok(run("orgs", "create", "beta"))
    ok(run("create", "--org", "beta", "--name", "b", "--scope", "ai:chat"))
    keys = json.loads(ok(run("list", "--org", "acme", "--json")))
    assert [key["key_id"] for key in keys] == [key_id_of(db_path, token)]
    assert keys[0]["revoked_at"] is None
    assert keys[0]["last_used_at"] is None


def test_sync(run: Run, token: str, redis_client, layout, subscriber):
    redis_client.set(layout.key("0" * 64), "stale")
    stdout = ok(run("sync"))
    assert stdout.startswith("synced to Redis at 127.0.0.1:")
    assert stdout.endswith("keys 1, orgs 1, stale records removed 1\n")
    assert redis_client.exists(layout.key("0" * 64)) == 0
    assert json.loads(redis_client.get(layout.complete_marker))["keys"] == 1
    assert messages(subscriber) == [flush_message()]


@pytest.mark.parametrize("place", ["before", "after"])
def test_keystore_url_flag(run: Run, tmp_path: Path, place: str):
    flag = ["--keystore-url", f"sqlite:///{tmp_path / 'flag.db'}"]
    args = ["orgs", "create", "acme"]
    ok(run(*flag, *args) if place == "before" else run(*args, *flag))
    assert (tmp_path / "flag.db").is_file()


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
    "postgresql": (
        ["--keystore-url", "postgresql://u:s3cret@127.0.0.1/k", "orgs", "create", "b"],
        "PostgreSQL key stores are not supported yet",
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
    run, token, db_path, redis_client, layout, args, expected
):
    store_before = store_dump(db_path)
    redis_before = redis_dump(redis_client, layout)
    result = run(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"hasp-keys: error: {expected}")
    assert result.stderr.count("\n") == 1
    assert "s3cret" not in result.stderr
    assert store_dump(db_path) == store_before
    assert redis_dump(redis_client, layout) == redis_before


def test_token_as_key_id_hidden(run: Run, token: str):
    result = run("revoke", token)
    assert result.returncode == 1
    assert token not in result.stderr
    assert "looks like an API key token" in result.stderr


@pytest.mark.parametrize("command", [["list"], ["orgs", "create", "acme"]])
def test_store_unopenable(run: Run, tmp_path: Path, command: list[str]):
    result = run(*command, HASP_KEYSTORE_URL=f"sqlite:///{tmp_path}")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"hasp-keys: error: cannot open key store {tmp_path}"
    )
    assert result.stderr.count("\n") == 1


def test_usage_error_exit_code(run: Run):
    result = run("create", "--org", "acme", "--name", "ci")
    assert result.returncode == 2
    assert "--scope" in result.stderr


def test_redis_down_after_store_write(
    run: Run, token: str, db_path: Path, redis_client, layout
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
    assert key_id_of(db_path, new_token).startswith("key_")
    assert redis_client.exists(layout.key(hash_token(new_token))) == 0

    ok(run("sync"))
    assert redis_client.exists(layout.key(hash_token(new_token))) == 1


@pytest.mark.parametrize(
    "command",
    [["orgs", "create", "beta"], ["orgs", "baa", "acme", "off"], ["revoke", "KEY"]],
    ids=["orgs-create", "orgs-baa", "revoke"],
)
def test_redis_down_exit_code(run: Run, token: str, db_path: Path, command: list[str]):
    command = [key_id_of(db_path, token) if arg == "KEY" else arg for arg in command]
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
