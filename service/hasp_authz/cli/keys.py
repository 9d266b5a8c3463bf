"""``hasp-keys``: manage orgs and API keys in the key store and its Redis copy.

A command that changes something writes the key store first, because the store is
the source of truth. It then updates the Redis copy and publishes the change. When
that second step fails, the store keeps the change, the command exits with
EXIT_REDIS_STALE, and ``hasp-keys sync`` repairs the copy.

Only ``create`` prints a token, once, on stdout. Messages show key ids, never
tokens or hashes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hasp_authz.keystore import (
    ApiKey,
    KeyStore,
    KeyStoreError,
    Org,
    open_keystore,
    validate_name,
    validate_org_id,
    validate_scopes,
)
from hasp_authz.publisher import (
    InvalidRedisUrl,
    Publisher,
    PublishError,
    check_redis_url,
    connect,
    full_sync,
    redis_address,
)
from hasp_authz.records import DEFAULT_PREFIX, RedisLayout
from hasp_authz.tokens import generate_token, hash_token
from hasp_authz.watcher import add_watch_options, watch

PROG = "hasp-keys"
DEFAULT_KEYSTORE_URL = "sqlite:///.run/keystore.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

EXIT_OK = 0
EXIT_ERROR = 1  # nothing in the key store was changed
EXIT_USAGE = 2  # argparse's code for an invalid command line
EXIT_REDIS_STALE = 3  # the key store has the change, Redis does not

EPILOG = f"""\
environment:
  HASP_KEYSTORE_URL  key store URL, default {DEFAULT_KEYSTORE_URL}
                     (the path is relative to the current directory;
                     use sqlite:////absolute/path.db for an absolute one),
                     or postgresql://user:password@host:port/database, with
                     ?options=-csearch_path%3Dschema to choose the schema
  HASP_REDIS_URL     Redis URL, default {DEFAULT_REDIS_URL};
                     redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB
                     for a Sentinel-managed primary, or
                     redis+cluster://HOST:PORT[,HOST:PORT...] for a
                     Redis Cluster
  HASP_REDIS_PREFIX  prefix of Redis key names and the channel, default
                     {DEFAULT_PREFIX}
  The --keystore-url, --redis-url and --redis-prefix flags override them.
  An empty flag or variable counts as unset.

exit status:
  {EXIT_OK}  success
  {EXIT_ERROR}  error, and the key store was not changed
  {EXIT_USAGE}  invalid command line
  {EXIT_REDIS_STALE}  the key store has the change but Redis was not updated:
     run '{PROG} sync' once Redis is reachable
"""


# A duration for --expires-in: a positive whole number and a unit.
_DURATION_RE = re.compile(r"([0-9]+)([smhd])", re.ASCII)
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True, slots=True)
class Settings:
    keystore_url: str
    redis_url: str
    redis_prefix: str


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    try:
        return args.handler(args, settings)
    except (KeyStoreError, PublishError, InvalidRedisUrl) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _settings(args: argparse.Namespace) -> Settings:
    """Resolve each setting from its flag, else its variable, else the default."""
    return Settings(
        keystore_url=_first_set(
            args.keystore_url, "HASP_KEYSTORE_URL", DEFAULT_KEYSTORE_URL
        ),
        redis_url=_first_set(args.redis_url, "HASP_REDIS_URL", DEFAULT_REDIS_URL),
        redis_prefix=_first_set(args.redis_prefix, "HASP_REDIS_PREFIX", DEFAULT_PREFIX),
    )


def _first_set(flag_value: str | None, variable: str, default: str) -> str:
    # An empty flag or variable counts as unset.
    return flag_value or os.environ.get(variable) or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create, list and revoke API keys, create orgs and set their "
        "BAA status, and rebuild the Redis copy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection_options(parser, None)
    # The same options on every subcommand, with SUPPRESS as default so that a
    # subcommand without them keeps the value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, argparse.SUPPRESS)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_org_commands(commands, common)
    _add_key_commands(commands, common)
    return parser


def _add_connection_options(
    parser: argparse.ArgumentParser, default: str | None
) -> None:
    parser.add_argument(
        "--keystore-url", default=default, help="key store URL (HASP_KEYSTORE_URL)"
    )
    parser.add_argument(
        "--redis-url", default=default, help="Redis URL (HASP_REDIS_URL)"
    )
    parser.add_argument(
        "--redis-prefix",
        default=default,
        help="prefix of Redis key names (HASP_REDIS_PREFIX)",
    )


def _add_org_commands(commands, common: argparse.ArgumentParser) -> None:
    orgs = commands.add_parser("orgs", help="create orgs, set BAA status, list orgs")
    actions = orgs.add_subparsers(title="org commands", required=True, metavar="ACTION")

    create = actions.add_parser("create", parents=[common], help="create an org")
    create.add_argument("org_id", metavar="ORG_ID")
    create.add_argument("--name", help="display name (default: the org id)")
    create.add_argument(
        "--baa", action="store_true", help="mark the BAA active (default: inactive)"
    )
    create.set_defaults(handler=create_org)

    baa = actions.add_parser("baa", parents=[common], help="set an org's BAA status")
    baa.add_argument("org_id", metavar="ORG_ID")
    baa.add_argument("state", choices=("on", "off"))
    baa.set_defaults(handler=set_baa)

    listing = actions.add_parser("list", parents=[common], help="list orgs")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=list_orgs)


def _add_key_commands(commands, common: argparse.ArgumentParser) -> None:
    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a key and print its token once",
        description="Create a key. The token is printed once, alone on stdout.",
    )
    create.add_argument("--org", required=True, metavar="ORG_ID")
    create.add_argument("--name", required=True, help="a label for the key")
    create.add_argument(
        "--scope",
        required=True,
        action="append",
        help="a scope to grant, repeat the option for more",
    )
    create.add_argument(
        "--expires-in",
        type=parse_duration,
        metavar="DURATION",
        help="make the key expire after this time: a whole number and s, m, h "
        "or d, for example 90s, 30m, 12h or 30d (default: never)",
    )
    create.add_argument(
        "--json", action="store_true", help="print a JSON object with the token"
    )
    create.set_defaults(handler=create_key)

    revoke = commands.add_parser(
        "revoke",
        parents=[common],
        help="revoke a key",
        description="Revoke a key. Revoking a revoked key succeeds and changes "
        "nothing in the key store, but still deletes the key's Redis record.",
    )
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=revoke_key)

    listing = commands.add_parser(
        "list", parents=[common], help="list keys (never tokens or hashes)"
    )
    listing.add_argument("--org", metavar="ORG_ID", help="only this org's keys")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=list_keys)

    sync = commands.add_parser(
        "sync", parents=[common], help="rebuild the Redis copy from the key store"
    )
    sync.set_defaults(handler=sync_all)
    add_watch_options(sync)

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="bring the key store schema up to date and print its version",
        description="Apply the pending schema migrations in one transaction. "
        "The other commands apply them too, before they run.",
    )
    migrate.set_defaults(handler=migrate_store)


def parse_duration(text: str) -> timedelta:
    """Parse an --expires-in value such as 90s, 30m, 12h or 30d."""
    match = _DURATION_RE.fullmatch(text)
    amount = 0 if match is None else int(match.group(1))
    if amount == 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a whole number above 0 followed by "
            "s, m, h or d, for example 90s, 30m, 12h or 30d"
        )
    try:
        duration = timedelta(**{_DURATION_UNITS[match.group(2)]: amount})
    except OverflowError:
        duration = None
    if duration is None or duration > datetime.max.replace(tzinfo=UTC) - _utcnow():
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: it ends after the year 9999, use a "
            "smaller number"
        )
    return duration


def create_org(args: argparse.Namespace, settings: Settings) -> int:
    validate_org_id(args.org_id)
    if args.name is not None:
        validate_name(args.name, "org name")
    check_redis_url(settings.redis_url)
    with _open_store(settings) as store:
        org = store.create_org(args.org_id, args.name, baa_active=args.baa)
    print(f"created org {org.org_id} ({org.name!r}), BAA {_on_off(org.baa_active)}")
    return _update_redis(lambda: _publisher(settings).publish_org(org))


def set_baa(args: argparse.Namespace, settings: Settings) -> int:
    validate_org_id(args.org_id)
    check_redis_url(settings.redis_url)
    with _open_store(settings) as store:
        org, changed = store.set_baa(args.org_id, args.state == "on")
    state = _on_off(org.baa_active)
    if changed:
        print(f"org {org.org_id}: BAA {state}")
    else:
        print(f"org {org.org_id}: BAA was already {state}, nothing changed")
    return _update_redis(lambda: _publisher(settings).publish_org(org), changed)


def list_orgs(args: argparse.Namespace, settings: Settings) -> int:
    with _open_store(settings) as store:
        orgs = store.list_orgs()
    if args.json:
        print(json.dumps([_org_json(org) for org in orgs]))
        return EXIT_OK
    rows = [
        [org.org_id, org.name, _on_off(org.baa_active), _time(org.created_at)]
        for org in orgs
    ]
    _print_table(["ORG", "NAME", "BAA", "CREATED"], rows)
    return EXIT_OK


def create_key(args: argparse.Namespace, settings: Settings) -> int:
    validate_org_id(args.org)
    validate_name(args.name, "key name")
    scopes = validate_scopes(args.scope)
    check_redis_url(settings.redis_url)
    token = generate_token()
    expires_at = None
    if args.expires_in is not None:
        expires_at = _utcnow() + args.expires_in
    with _open_store(settings) as store:
        key = store.create_key(
            args.org, args.name, hash_token(token), scopes, expires_at=expires_at
        )
    if args.json:
        print(json.dumps({"token": token, **_key_json(key)}), flush=True)
    else:
        print(token, flush=True)
    return _update_redis(lambda: _publisher(settings).publish_key(key))


def revoke_key(args: argparse.Namespace, settings: Settings) -> int:
    check_redis_url(settings.redis_url)
    with _open_store(settings) as store:
        key, changed = store.revoke_key(args.key_id)
    if changed:
        print(f"revoked {key.key_id} (org {key.org_id}, name {key.name!r})")
    else:
        print(
            f"{key.key_id} was already revoked at {_time(key.revoked_at)}, "
            "nothing changed"
        )
    return _update_redis(lambda: _publisher(settings).publish_key(key), changed)


def list_keys(args: argparse.Namespace, settings: Settings) -> int:
    with _open_store(settings) as store:
        keys = store.list_keys(org_id=args.org)
    if args.json:
        print(json.dumps([_key_json(key) for key in keys]))
        return EXIT_OK
    header = [
        "KEY ID",
        "ORG",
        "NAME",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "REVOKED",
        "LAST USED",
    ]
    rows = [
        [
            key.key_id,
            key.org_id,
            key.name,
            ",".join(key.scopes),
            _time(key.created_at),
            _time(key.expires_at),
            _time(key.revoked_at),
            _time(key.last_used_at),
        ]
        for key in keys
    ]
    _print_table(header, rows)
    return EXIT_OK


def sync_all(args: argparse.Namespace, settings: Settings) -> int:
    if args.watch:
        return watch(args, settings)
    publisher = _publisher(settings)
    with _open_store(settings) as store:
        result = full_sync(store, publisher.client, publisher.layout)
    print(
        f"synced to Redis at {redis_address(publisher.client)} "
        f"(prefix {settings.redis_prefix!r}): keys {result.keys}, "
        f"orgs {result.orgs}, stale records removed {result.removed}"
    )
    return EXIT_OK


def migrate_store(args: argparse.Namespace, settings: Settings) -> int:
    with closing(open_keystore(settings.keystore_url, migrate=False)) as store:
        before = store.schema_version()
        after = store.migrate()
    if after == before:
        print(f"key store schema is at version {after}, nothing to migrate")
    else:
        print(f"key store schema migrated from version {before} to {after}")
    return EXIT_OK


def _open_store(settings: Settings) -> closing[KeyStore]:
    return closing(open_keystore(settings.keystore_url))


def _publisher(settings: Settings) -> Publisher:
    """Create the publisher. Raises PublishError when no node of a cluster replies."""
    client = connect(settings.redis_url)
    return Publisher(client, RedisLayout(settings.redis_prefix))


def _update_redis(update: Callable[[], None], store_changed: bool = True) -> int:
    """Run the Redis update that follows a store call, and warn if it fails.

    Returns EXIT_OK, or EXIT_REDIS_STALE after a failure.

    The update also runs after a call that changed nothing, such as a second
    revoke, so that repeating a command repairs a Redis copy that missed it.
    """
    try:
        update()
    except PublishError as exc:
        store = "the key store was changed but " if store_changed else ""
        print(
            f"{PROG}: warning: {store}Redis was not updated ({exc}); "
            f"run '{PROG} sync' once Redis is reachable",
            file=sys.stderr,
        )
        return EXIT_REDIS_STALE
    return EXIT_OK


def _key_json(key: ApiKey) -> dict[str, object]:
    return {
        "key_id": key.key_id,
        "org_id": key.org_id,
        "name": key.name,
        "scopes": list(key.scopes),
        "created_at": _iso(key.created_at),
        "revoked_at": _iso(key.revoked_at),
        "expires_at": _iso(key.expires_at),
        "last_used_at": _iso(key.last_used_at),
    }


def _org_json(org: Org) -> dict[str, object]:
    return {
        "org_id": org.org_id,
        "name": org.name,
        "baa_active": org.baa_active,
        "created_at": _iso(org.created_at),
        "updated_at": _iso(org.updated_at),
    }


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(moment: datetime | None) -> str:
    """Format a UTC time to the second for tables, or '-' when there is none."""
    return "-" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _on_off(active: bool) -> str:
    return "on" if active else "off"


if __name__ == "__main__":
    sys.exit(main())
