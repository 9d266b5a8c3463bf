"""Deterministic API keys for the benchmark, and a Redis copy filled with them.

Token ``i`` of a namespace is derived from SHA-256 of ``"{namespace}:{i}"``, so
the harness, the load generators and the Redis fill agree on the tokens without
passing a million of them around. Tokens of the ``unknown`` namespace are never
written to Redis.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time

import redis

from hasp_authz.records import KeyRecord, OrgRecord, RedisLayout
from hasp_authz.tokens import CROCKFORD_ALPHABET, TOKEN_PREFIX, hash_token

ORG_ID = "bench-org"
KNOWN = "known"
UNKNOWN = "unknown"
# Key/value pairs per MSET command. The commands go out in pipelines of
# PIPELINE_COMMANDS each.
MSET_PAIRS = 1000
PIPELINE_COMMANDS = 20
# A malformed key: lower case is outside the token alphabet.
MALFORMED_TOKEN = TOKEN_PREFIX + "not-a-valid-key-body-lower-case"
# RFC 4648 base32 digits, in value order, to Crockford's digits of equal value.
_TO_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", CROCKFORD_ALPHABET)


def token(index: int, namespace: str = KNOWN) -> str:
    """Return the well-formed token number ``index`` of ``namespace``."""
    digest = hashlib.sha256(f"{namespace}:{index}".encode()).digest()
    # 20 bytes are 160 bits, exactly 32 base32 digits with no padding.
    body = base64.b32encode(digest[:20]).decode("ascii")
    return TOKEN_PREFIX + body.translate(_TO_CROCKFORD)


def sample_tokens(key_count: int, sample_size: int, seed: int = 1) -> list[str]:
    """Return ``sample_size`` tokens drawn uniformly, without repeats, from the keys.

    With fewer keys than ``sample_size`` every key is returned once.
    """
    if key_count <= sample_size:
        indexes = list(range(key_count))
    else:
        indexes = random.Random(seed).sample(range(key_count), sample_size)
    return [token(index) for index in indexes]


def fill_redis(url: str, key_count: int, *, start: int = 0) -> float:
    """Write keys ``start`` to ``key_count - 1``, the org and the marker into Redis.

    Each key record is the JSON of records.KeyRecord under RedisLayout's names,
    as ``hasp-keys sync`` writes it. Returns the seconds the fill took.
    """
    layout = RedisLayout()
    client = redis.Redis.from_url(url, socket_timeout=30)
    started = time.perf_counter()
    try:
        client.set(layout.org(ORG_ID), OrgRecord(ORG_ID, baa_active=True).to_json())
        pipe = client.pipeline(transaction=False)
        for batch_start in range(start, key_count, MSET_PAIRS):
            batch_end = min(batch_start + MSET_PAIRS, key_count)
            pipe.mset(
                {
                    _key_name(layout, i): _key_json(i)
                    for i in range(batch_start, batch_end)
                }
            )
            if len(pipe) >= PIPELINE_COMMANDS:
                pipe.execute()
        pipe.execute()
        marker = {"synced_at": time.time(), "keys": key_count, "orgs": 1, "removed": 0}
        client.set(layout.complete_marker, json.dumps(marker))
        stored = client.dbsize()
    finally:
        client.close()
    # The org and the marker are the two records beside the keys.
    if stored < key_count + 2:
        raise RuntimeError(
            f"Redis contains {stored} records after filling {key_count} keys; "
            f"expected at least {key_count + 2} (the keys, the org and the marker)"
        )
    return time.perf_counter() - started


def _key_name(layout: RedisLayout, index: int) -> str:
    return layout.key(hash_token(token(index)))


def _key_json(index: int) -> str:
    return KeyRecord(f"key_bench{index:07d}", ORG_ID, ("ai:chat",)).to_json()
