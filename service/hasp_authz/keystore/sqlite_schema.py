"""The SQLite schema, as numbered migrations. docs/keystore.md documents the result.

Version 1 held scopes as a JSON array and had no constraints on the formats.
Version 2 rebuilds both tables with CHECK constraints, converts scopes to
space-separated text, and adds the ``key_changes`` log with the triggers that
fill it. SQLite cannot add a CHECK constraint to an existing table, hence the
rebuild: rename the old tables, copy their rows into new ones, drop the old ones.
The copy runs before the triggers exist, so it logs no changes.

Timestamps are ISO-8601 text in UTC with six fraction digits and a ``+00:00``
offset. Every value has the same width, so text order is time order and the
store compares them as text.
"""

from __future__ import annotations

from hasp_authz.keystore.sql import Migration

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
)"""

# NOTE: the constants below are part of migration 2. Changing them would change
# what that migration did on some databases but not others, so a later
# migration must define its own copies instead.

# The current time in the stored form. strftime's %f gives seconds with three
# fraction digits, so three zeros pad it to six.
NOW = "strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')"
_TIME_GLOB = (
    "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]"
    ".[0-9][0-9][0-9][0-9][0-9][0-9]+00:00'"
)


def _time_check(column: str) -> str:
    # NULL passes a CHECK, so the same check serves nullable columns.
    return f"CHECK ({column} GLOB {_TIME_GLOB})"


def _name_check(column: str) -> str:
    return (
        f"CHECK (length({column}) BETWEEN 1 AND 128 AND trim({column}) <> ''"
        f" AND instr(lower({column}), 'hasp_key_') = 0)"
    )


_V1 = (
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
)

_V2_TABLES = (
    # With foreign keys on, renaming orgs also renames the reference in api_keys,
    # and dropping the old child table before the old parent leaves no dangling
    # reference.
    "ALTER TABLE api_keys RENAME TO api_keys_v1",
    "ALTER TABLE orgs RENAME TO orgs_v1",
    f"""CREATE TABLE orgs (
        id TEXT PRIMARY KEY CHECK (
            length(id) BETWEEN 1 AND 64 AND id GLOB '[A-Za-z0-9]*'
            AND id NOT GLOB '*[^A-Za-z0-9_.-]*'
            AND instr(lower(id), 'hasp_key_') = 0
        ),
        name TEXT NOT NULL {_name_check("name")},
        baa_active INTEGER NOT NULL DEFAULT 0 CHECK (baa_active IN (0, 1)),
        created_at TEXT NOT NULL DEFAULT ({NOW}) {_time_check("created_at")},
        updated_at TEXT NOT NULL DEFAULT ({NOW}) {_time_check("updated_at")}
    )""",
    "INSERT INTO orgs (id, name, baa_active, created_at, updated_at)"
    " SELECT id, name, baa_active, created_at, updated_at FROM orgs_v1",
    f"""CREATE TABLE api_keys (
        id TEXT PRIMARY KEY CHECK (
            length(id) = 24 AND id GLOB 'key_*'
            AND substr(id, 5) NOT GLOB '*[^0-9a-hjkmnp-tv-z]*'
        ),
        org_id TEXT NOT NULL REFERENCES orgs (id),
        name TEXT NOT NULL {_name_check("name")},
        key_hash TEXT NOT NULL UNIQUE CHECK (
            length(key_hash) = 64 AND key_hash NOT GLOB '*[^0-9a-f]*'
        ),
        scopes TEXT NOT NULL CHECK (
            scopes <> '' AND scopes NOT GLOB '*[^a-z0-9_:. -]*'
            AND scopes NOT GLOB ' *' AND scopes NOT GLOB '* '
            AND scopes NOT GLOB '*  *'
        ),
        created_at TEXT NOT NULL DEFAULT ({NOW}) {_time_check("created_at")},
        revoked_at TEXT {_time_check("revoked_at")},
        expires_at TEXT {_time_check("expires_at")},
        last_used_at TEXT {_time_check("last_used_at")}
    )""",
    # Version 1 stored scopes as a JSON array such as ["ai:chat","control:read"].
    """INSERT INTO api_keys (id, org_id, name, key_hash, scopes, created_at,
            revoked_at, expires_at, last_used_at)
        SELECT id, org_id, name, key_hash,
            (SELECT group_concat(value, ' ') FROM
                (SELECT value FROM json_each(api_keys_v1.scopes) ORDER BY key)),
            created_at, revoked_at, expires_at, last_used_at
        FROM api_keys_v1""",
    "DROP TABLE api_keys_v1",
    "DROP TABLE orgs_v1",
    "CREATE INDEX api_keys_org_id ON api_keys (org_id)",
)

# AUTOINCREMENT keeps seq values from being reused after the newest rows are
# deleted, which a reader that remembers its last seq relies on.
_V2_CHANGE_LOG = (
    f"""CREATE TABLE key_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('key', 'org')),
        key_id TEXT,
        key_hash TEXT,
        org_id TEXT NOT NULL,
        changed_at TEXT NOT NULL DEFAULT ({NOW})
    )""",
    """CREATE TRIGGER api_keys_log_insert AFTER INSERT ON api_keys
    BEGIN
        INSERT INTO key_changes (kind, key_id, key_hash, org_id)
        VALUES ('key', NEW.id, NEW.key_hash, NEW.org_id);
    END""",
    # Only the columns that the Redis copy of a key depends on; last_used_at and
    # name changes log nothing. A changed hash also logs the old hash, so the
    # reader deletes the old Redis record.
    """CREATE TRIGGER api_keys_log_update
    AFTER UPDATE OF id, org_id, key_hash, scopes, revoked_at, expires_at ON api_keys
    WHEN OLD.id IS NOT NEW.id OR OLD.org_id IS NOT NEW.org_id
        OR OLD.key_hash IS NOT NEW.key_hash OR OLD.scopes IS NOT NEW.scopes
        OR OLD.revoked_at IS NOT NEW.revoked_at
        OR OLD.expires_at IS NOT NEW.expires_at
    BEGIN
        INSERT INTO key_changes (kind, key_id, key_hash, org_id)
        SELECT 'key', OLD.id, OLD.key_hash, OLD.org_id
        WHERE OLD.key_hash IS NOT NEW.key_hash;
        INSERT INTO key_changes (kind, key_id, key_hash, org_id)
        VALUES ('key', NEW.id, NEW.key_hash, NEW.org_id);
    END""",
    """CREATE TRIGGER api_keys_log_delete AFTER DELETE ON api_keys
    BEGIN
        INSERT INTO key_changes (kind, key_id, key_hash, org_id)
        VALUES ('key', OLD.id, OLD.key_hash, OLD.org_id);
    END""",
    """CREATE TRIGGER orgs_log_insert AFTER INSERT ON orgs
    BEGIN
        INSERT INTO key_changes (kind, org_id) VALUES ('org', NEW.id);
    END""",
    """CREATE TRIGGER orgs_log_update AFTER UPDATE OF id, baa_active ON orgs
    WHEN OLD.id IS NOT NEW.id OR OLD.baa_active IS NOT NEW.baa_active
    BEGIN
        INSERT INTO key_changes (kind, org_id)
        SELECT 'org', OLD.id WHERE OLD.id IS NOT NEW.id;
        INSERT INTO key_changes (kind, org_id) VALUES ('org', NEW.id);
    END""",
    """CREATE TRIGGER orgs_log_delete AFTER DELETE ON orgs
    BEGIN
        INSERT INTO key_changes (kind, org_id) VALUES ('org', OLD.id);
    END""",
)

MIGRATIONS: tuple[Migration, ...] = (
    (1, _V1),
    (2, _V2_TABLES + _V2_CHANGE_LOG),
)
