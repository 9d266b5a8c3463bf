"""The PostgreSQL schema, as numbered migrations. docs/keystore.md documents it.

Version numbers mean the same tables and columns on both backends. The
PostgreSQL backend was added at version 2, so its first migration creates the
version-2 schema directly.

Every object is created unqualified, so it lands in the current schema: the
first schema of the session's search_path that exists.

The triggers serialize writers of the change log with a transaction-level
advisory lock, so that seq values are assigned in commit order. Without it, a
transaction could take seq 5, commit after another one took seq 6, and a reader
that had already moved past 6 would miss 5. The lock key is per schema, so
stores in different schemas of one database do not wait for each other.
"""

from __future__ import annotations

from hasp_authz.keystore.sql import Migration

# Classes of the two-key advisory locks; the second key is hashtext(schema).
# 0x68617370 is "hasp" in ASCII.
CHANGE_LOG_LOCK = 0x68617370
MIGRATION_LOCK = 0x68617371

# The channel that the triggers notify. Channels are database-wide, so a
# listener may also wake for a store in another schema, and then finds nothing
# new in its own log.
NOTIFY_CHANNEL = "hasp_key_changes"

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def _name_check(column: str) -> str:
    return (
        f"CHECK (char_length({column}) BETWEEN 1 AND 128 AND btrim({column}) <> ''"
        f" AND strpos(lower({column}), 'hasp_key_') = 0)"
    )


_V2_TABLES = (
    f"""CREATE TABLE orgs (
        id text PRIMARY KEY CHECK (
            id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$'
            AND strpos(lower(id), 'hasp_key_') = 0
        ),
        name text NOT NULL {_name_check("name")},
        baa_active boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    f"""CREATE TABLE api_keys (
        id text PRIMARY KEY CHECK (id ~ '^key_[0-9a-hjkmnp-tv-z]{{20}}$'),
        org_id text NOT NULL REFERENCES orgs (id),
        name text NOT NULL {_name_check("name")},
        key_hash text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{{64}}$'),
        scopes text NOT NULL CHECK (
            scopes ~ '^[a-z0-9_:.-]+( [a-z0-9_:.-]+)*$'
        ),
        created_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz,
        expires_at timestamptz,
        last_used_at timestamptz
    )""",
    "CREATE INDEX api_keys_org_id ON api_keys (org_id)",
    """CREATE TABLE key_changes (
        seq bigserial PRIMARY KEY,
        kind text NOT NULL CHECK (kind IN ('key', 'org')),
        key_id text,
        key_hash text,
        org_id text NOT NULL,
        changed_at timestamptz NOT NULL DEFAULT now()
    )""",
)

# The functions name key_changes through TG_TABLE_SCHEMA rather than the
# search_path, because a program that writes the tables may use another one.
# They run as their owner (SECURITY DEFINER), so a writer needs privileges on
# orgs and api_keys only, and a fixed search_path keeps the caller's schemas
# from shadowing the built-in functions they call.
_APPEND = (
    "format('INSERT INTO %I.key_changes (kind, key_id, key_hash, org_id)"
    " VALUES ($1, $2, $3, $4)', TG_TABLE_SCHEMA)"
)

_V2_TRIGGERS = (
    f"""CREATE FUNCTION hasp_log_key_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({CHANGE_LOG_LOCK}, hashtext(TG_TABLE_SCHEMA));
        IF TG_OP = 'UPDATE' THEN
            IF OLD.key_hash IS DISTINCT FROM NEW.key_hash THEN
                EXECUTE {_APPEND} USING 'key', OLD.id, OLD.key_hash, OLD.org_id;
            END IF;
        END IF;
        IF TG_OP = 'DELETE' THEN
            EXECUTE {_APPEND} USING 'key', OLD.id, OLD.key_hash, OLD.org_id;
        ELSE
            EXECUTE {_APPEND} USING 'key', NEW.id, NEW.key_hash, NEW.org_id;
        END IF;
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END
    $$""",
    f"""CREATE FUNCTION hasp_log_org_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({CHANGE_LOG_LOCK}, hashtext(TG_TABLE_SCHEMA));
        IF TG_OP = 'UPDATE' THEN
            IF OLD.id IS DISTINCT FROM NEW.id THEN
                EXECUTE {_APPEND} USING 'org', NULL::text, NULL::text, OLD.id;
            END IF;
        END IF;
        IF TG_OP = 'DELETE' THEN
            EXECUTE {_APPEND} USING 'org', NULL::text, NULL::text, OLD.id;
        ELSE
            EXECUTE {_APPEND} USING 'org', NULL::text, NULL::text, NEW.id;
        END IF;
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END
    $$""",
    """CREATE TRIGGER api_keys_log_insert_delete AFTER INSERT OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION hasp_log_key_change()""",
    # Only the columns that the Redis copy of a key depends on; last_used_at and
    # name changes log nothing.
    """CREATE TRIGGER api_keys_log_update
    AFTER UPDATE OF id, org_id, key_hash, scopes, revoked_at, expires_at ON api_keys
    FOR EACH ROW
    WHEN (OLD.id IS DISTINCT FROM NEW.id OR OLD.org_id IS DISTINCT FROM NEW.org_id
        OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
        OR OLD.scopes IS DISTINCT FROM NEW.scopes
        OR OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
        OR OLD.expires_at IS DISTINCT FROM NEW.expires_at)
    EXECUTE FUNCTION hasp_log_key_change()""",
    """CREATE TRIGGER orgs_log_insert_delete AFTER INSERT OR DELETE ON orgs
    FOR EACH ROW EXECUTE FUNCTION hasp_log_org_change()""",
    """CREATE TRIGGER orgs_log_update AFTER UPDATE OF id, baa_active ON orgs
    FOR EACH ROW
    WHEN (OLD.id IS DISTINCT FROM NEW.id
        OR OLD.baa_active IS DISTINCT FROM NEW.baa_active)
    EXECUTE FUNCTION hasp_log_org_change()""",
)

MIGRATIONS: tuple[Migration, ...] = ((2, _V2_TABLES + _V2_TRIGGERS),)
