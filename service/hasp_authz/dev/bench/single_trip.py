"""A Redis lookup that reads the marker, the key and its org in one round trip.

``RedisKeyCopy`` in store.py makes two round trips on a miss: one pipeline for
the completeness marker and the key record, then a GET of the org that the key
record names. This variant runs one Lua script that returns all three, so the
benchmark can measure what the second round trip costs. It is a benchmark
variant, not product code.

NOTE: the script reads an org key that is not in its KEYS list. Redis Cluster
and some proxies reject that; a standalone Redis allows it.
"""

from __future__ import annotations

from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.store import CopyUnavailable, LookupResult, RedisKeyCopy

# KEYS[1] is the marker, KEYS[2] the key record; ARGV[1] is the org key prefix.
# The org id comes from the key record's JSON, as KeyRecord.from_json reads it.
_LOOKUP_SCRIPT = """
local marker = redis.call('EXISTS', KEYS[1])
local raw_key = redis.call('GET', KEYS[2])
if marker == 0 or not raw_key then
  return {marker, raw_key}
end
local ok, record = pcall(cjson.decode, raw_key)
if not ok or type(record) ~= 'table' or type(record.org_id) ~= 'string' then
  return {marker, raw_key}
end
return {marker, raw_key, redis.call('GET', ARGV[1] .. record.org_id)}
"""


class SingleTripKeyCopy(RedisKeyCopy):
    """RedisKeyCopy whose read is one EVALSHA instead of two round trips."""

    def __init__(self, client, layout: RedisLayout, **options):
        super().__init__(client, layout, **options)
        self._script = client.register_script(_LOOKUP_SCRIPT)
        self._org_prefix = layout.org("")

    async def _read(self, key_hash: str) -> LookupResult:
        keys = [self.layout.complete_marker, self.layout.key(key_hash)]
        reply = await self._script(keys=keys, args=[self._org_prefix])
        marker, raw_key = reply[0], reply[1]
        if not marker:
            raise CopyUnavailable("the completeness marker is missing")
        if not raw_key:
            return None
        key = _parse(KeyRecord, raw_key)
        raw_org = reply[2] if len(reply) > 2 else None
        if not raw_org:
            raise CopyUnavailable(f"key {key.key_id} names org {key.org_id}, not found")
        return key, _parse(OrgRecord, raw_org)


def _parse(record_type, raw):
    try:
        return record_type.from_json(raw)
    except (ValueError, KeyError, TypeError) as error:
        raise CopyUnavailable(f"malformed {record_type.__name__}: {error}") from error
