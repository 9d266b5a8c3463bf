"""Records in the Redis copy of the key store, and the names they live under.

The sync (``hasp-keys``) writes these; the Check path reads them. Both sides go
through this module, so the layout is defined once:

- ``{prefix}key:{sha256 hex}``: a key record (JSON), present only while the key
  is active. A revoked key's record is deleted.
- ``{prefix}org:{org id}``: an org record (JSON) with its BAA status.
- ``{prefix}complete``: the marker the sync writes after a full load. Without it
  the copy may be partial, so the server returns 503 instead of 401.
- ``{prefix}changes``: the pub/sub channel that carries one change message per
  create, revoke or BAA change, and one after each full load. A message is a
  JSON object such as ``{"kind":"key","hash":H,"at":1718000000.123456}``, where
  ``at`` is the publish time in epoch seconds. Older publishers leave ``at``
  out, and servers accept messages without it.
- ``{prefix}last_used``: a sorted set of key id to the latest time (epoch
  seconds) any server saw the key used. The sync copies it into the store.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

DEFAULT_PREFIX = "hasp:"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An active API key as the Check path reads it. Contains no token and no hash."""

    key_id: str
    org_id: str
    scopes: tuple[str, ...]
    expires_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "key_id": self.key_id,
                "org_id": self.org_id,
                "scopes": list(self.scopes),
                "expires_at": self.expires_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> KeyRecord:
        """Parse a stored record. Raises ValueError, KeyError or TypeError."""
        data = json.loads(raw)
        scopes = data["scopes"]
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise TypeError(f"scopes must be a list of strings, got {scopes!r}")
        expires_at = data.get("expires_at")
        if expires_at is not None:
            expires_at = float(expires_at)
            if not math.isfinite(expires_at):
                raise ValueError(f"expires_at must be finite, got {expires_at!r}")
        return cls(
            key_id=str(data["key_id"]),
            org_id=str(data["org_id"]),
            scopes=tuple(scopes),
            expires_at=expires_at,
        )


@dataclass(frozen=True, slots=True)
class OrgRecord:
    """An organization and whether it has an active BAA."""

    org_id: str
    baa_active: bool

    def to_json(self) -> str:
        return json.dumps(
            {"org_id": self.org_id, "baa_active": self.baa_active},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> OrgRecord:
        """Parse a stored record. Raises ValueError, KeyError or TypeError."""
        data = json.loads(raw)
        baa_active = data["baa_active"]
        if not isinstance(baa_active, bool):
            raise TypeError(f"baa_active must be a boolean, got {baa_active!r}")
        return cls(org_id=str(data["org_id"]), baa_active=baa_active)


@dataclass(frozen=True, slots=True)
class RedisLayout:
    """Names of the Redis keys and channel under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def key(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    def org(self, org_id: str) -> str:
        return f"{self.prefix}org:{org_id}"

    @property
    def complete_marker(self) -> str:
        return f"{self.prefix}complete"

    @property
    def changes_channel(self) -> str:
        return f"{self.prefix}changes"

    @property
    def last_used(self) -> str:
        """Sorted set of key id -> last-used time (epoch seconds), kept by ZADD GT."""
        return f"{self.prefix}last_used"


def key_changed_message(key_hash: str, *, at: float | None = None) -> str:
    """Build the change message that makes servers drop one key's entry.

    ``at`` is the publish time in epoch seconds, left out of the message when None.
    """
    return _change_message({"kind": "key", "hash": key_hash}, at)


def org_changed_message(org_id: str, *, at: float | None = None) -> str:
    """Build the change message that makes servers drop one org's entry.

    ``at`` is the publish time in epoch seconds, left out of the message when None.
    """
    return _change_message({"kind": "org", "org_id": org_id}, at)


def flush_message(*, at: float | None = None) -> str:
    """Build the change message that makes servers drop every cached entry.

    The sync sends it after a full load, because a rebuild may change any record.
    ``at`` is the publish time in epoch seconds, left out of the message when None.
    """
    return _change_message({"kind": "all"}, at)


def _change_message(fields: dict[str, str], at: float | None) -> str:
    """Serialize a change message, adding ``at`` rounded to microseconds.

    Raises ValueError for an ``at`` that is not finite, because JSON has no NaN
    or infinity.
    """
    message: dict[str, str | float] = dict(fields)
    if at is not None:
        if not math.isfinite(at):
            raise ValueError(f"publish time must be finite epoch seconds, got {at!r}")
        message["at"] = round(at, 6)
    return json.dumps(message, separators=(",", ":"))
