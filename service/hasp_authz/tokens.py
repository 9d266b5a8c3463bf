"""API key tokens: format, generation, hashing and the Authorization header.

A token is ``hasp_key_live_`` followed by exactly 32 upper-case characters of
Crockford's base32 alphabet (no I, L, O or U). 32 characters carry 160 bits, all
drawn from ``secrets``. The store and the Redis copy only ever see the lowercase
hex SHA-256 of the whole token string.
"""

from __future__ import annotations

import hashlib
import re
import secrets

TOKEN_PREFIX = "hasp_key_live_"
CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TOKEN_BODY_LENGTH = 32

_TOKEN_RE = re.compile(
    rf"{TOKEN_PREFIX}[{CROCKFORD_ALPHABET}]{{{TOKEN_BODY_LENGTH}}}", re.ASCII
)
# RFC 6750 names the scheme "Bearer" and RFC 7235 makes scheme names
# case-insensitive. Exactly one space separates scheme and token.
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] (\S+)", re.ASCII)


def generate_token() -> str:
    """Return a new random token."""
    body = "".join(secrets.choice(CROCKFORD_ALPHABET) for _ in range(TOKEN_BODY_LENGTH))
    return TOKEN_PREFIX + body


def is_well_formed(token: str) -> bool:
    return _TOKEN_RE.fullmatch(token) is not None


def hash_token(token: str) -> str:
    """Return the lowercase hex SHA-256 of the token, the form the store keeps."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def token_from_authorization(value: str) -> str | None:
    """Return the well-formed token in an ``Authorization`` value, or None."""
    match = _BEARER_RE.fullmatch(value)
    if match is None:
        return None
    token = match.group(1)
    return token if is_well_formed(token) else None
