"""Tests for hasp_authz.tokens: token format, generation, hashing and Bearer parsing."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import pytest

from hasp_authz.tokens import (
    CROCKFORD_ALPHABET,
    TOKEN_BODY_LENGTH,
    TOKEN_PREFIX,
    generate_token,
    hash_token,
    is_well_formed,
    token_from_authorization,
)

# The alphabet has exactly 32 characters, so it is itself a valid body.
ALPHABET_TOKEN = "hasp_key_live_0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# SHA-256 of ALPHABET_TOKEN, computed with coreutils `sha256sum`.
ALPHABET_TOKEN_SHA256 = (
    "fd3c9d7d2dfce7286f245e2f3615d5e4be102ab29bec6e04a68e43dd4e665a0c"
)
VALID_BODY = "7K3M9QXZ2R4T6V8W0Y1ABCDEFGHJNPST"


def test_constants_match_documented_format():
    assert TOKEN_PREFIX == "hasp_key_live_"
    assert TOKEN_BODY_LENGTH == 32
    assert CROCKFORD_ALPHABET == "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(ALPHABET_TOKEN, id="every-alphabet-character"),
        pytest.param(TOKEN_PREFIX + VALID_BODY, id="mixed"),
        pytest.param(TOKEN_PREFIX + "0" * 32, id="all-zeros"),
        pytest.param(TOKEN_PREFIX + "1" * 32, id="all-ones"),
        pytest.param(TOKEN_PREFIX + "Z" * 32, id="all-z"),
    ],
)
def test_is_well_formed_accepts(token):
    assert is_well_formed(token)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(TOKEN_PREFIX + "I" + VALID_BODY[1:], id="excluded-I"),
        pytest.param(TOKEN_PREFIX + "L" + VALID_BODY[1:], id="excluded-L"),
        pytest.param(TOKEN_PREFIX + "O" + VALID_BODY[1:], id="excluded-O"),
        pytest.param(TOKEN_PREFIX + VALID_BODY[:-1] + "U", id="excluded-U"),
        pytest.param(TOKEN_PREFIX + VALID_BODY.lower(), id="lower-case-body"),
        pytest.param(TOKEN_PREFIX + "a" + VALID_BODY[1:], id="one-lower-case"),
        pytest.param("HASP_KEY_LIVE_" + VALID_BODY, id="upper-case-prefix"),
        pytest.param(TOKEN_PREFIX + VALID_BODY[:-1], id="31-characters"),
        pytest.param(TOKEN_PREFIX + VALID_BODY + "A", id="33-characters"),
        pytest.param(TOKEN_PREFIX + VALID_BODY * 2, id="64-characters"),
        pytest.param(TOKEN_PREFIX, id="prefix-only"),
        pytest.param("", id="empty"),
        pytest.param(VALID_BODY, id="body-without-prefix"),
        pytest.param("hasp_key_test_" + VALID_BODY, id="test-prefix"),
        pytest.param("hasp_key_" + VALID_BODY, id="short-prefix"),
        pytest.param("hasp_live_" + VALID_BODY, id="other-prefix"),
        pytest.param("sk_live_" + VALID_BODY, id="foreign-prefix"),
        pytest.param("xhasp_key_live_" + VALID_BODY, id="leading-junk"),
        pytest.param(" " + TOKEN_PREFIX + VALID_BODY, id="leading-space"),
        pytest.param(TOKEN_PREFIX + VALID_BODY + "\n", id="trailing-newline"),
        pytest.param(TOKEN_PREFIX + VALID_BODY + " ", id="trailing-space"),
        pytest.param(TOKEN_PREFIX + VALID_BODY[:-1] + "-", id="hyphen"),
        pytest.param(TOKEN_PREFIX + VALID_BODY[:-1] + "=", id="padding"),
        pytest.param(TOKEN_PREFIX + "\uff21" + VALID_BODY[1:], id="fullwidth-A"),
        pytest.param(TOKEN_PREFIX + "\u0661" + VALID_BODY[1:], id="arabic-digit"),
    ],
)
def test_is_well_formed_rejects(token):
    assert not is_well_formed(token)


def test_generate_token_is_well_formed():
    for _ in range(200):
        token = generate_token()
        assert token.startswith(TOKEN_PREFIX)
        assert len(token) == len(TOKEN_PREFIX) + TOKEN_BODY_LENGTH
        assert set(token[len(TOKEN_PREFIX) :]) <= set(CROCKFORD_ALPHABET)
        assert is_well_formed(token)


def test_generate_token_is_unique():
    tokens = [generate_token() for _ in range(5000)]

    assert len(set(tokens)) == len(tokens)


def test_generate_token_uses_whole_alphabet():
    # 32,000 draws from 32 characters: each is expected about 1,000 times, so a
    # character that never appears means the generator does not use it.
    counts = Counter(
        "".join(generate_token()[len(TOKEN_PREFIX) :] for _ in range(1000))
    )

    assert set(counts) == set(CROCKFORD_ALPHABET)


def test_hash_token_matches_known_digest():
    assert hash_token(ALPHABET_TOKEN) == ALPHABET_TOKEN_SHA256


def test_hash_token_is_lowercase_hex_sha256():
    token = generate_token()

    digest = hash_token(token)

    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hashlib.sha256(token.encode("ascii")).hexdigest()


def test_hash_token_covers_prefix():
    body_digest = hashlib.sha256(VALID_BODY.encode("ascii")).hexdigest()

    assert hash_token(TOKEN_PREFIX + VALID_BODY) != body_digest


def test_hash_token_differs_per_token():
    assert hash_token(TOKEN_PREFIX + "A" * 32) != hash_token(TOKEN_PREFIX + "B" * 32)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_token_from_authorization_accepts_scheme_in_any_case(scheme):
    assert token_from_authorization(f"{scheme} {ALPHABET_TOKEN}") == ALPHABET_TOKEN


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(f"Bearer  {ALPHABET_TOKEN}", id="two-spaces"),
        pytest.param(f"Bearer\t{ALPHABET_TOKEN}", id="tab"),
        pytest.param(f"Bearer \t{ALPHABET_TOKEN}", id="space-and-tab"),
        pytest.param(f"Bearer\u00a0{ALPHABET_TOKEN}", id="no-break-space"),
        pytest.param(f"Bearer{ALPHABET_TOKEN}", id="no-space"),
        pytest.param(f" Bearer {ALPHABET_TOKEN}", id="leading-space"),
        pytest.param(f"Bearer {ALPHABET_TOKEN} ", id="trailing-space"),
        pytest.param(f"Bearer {ALPHABET_TOKEN}\t", id="trailing-tab"),
        pytest.param(f"Bearer {ALPHABET_TOKEN}\n", id="trailing-newline"),
        pytest.param(f"Bearer {ALPHABET_TOKEN}\r\n", id="trailing-crlf"),
        pytest.param(f"Bearer {ALPHABET_TOKEN} extra", id="trailing-word"),
        pytest.param(f"Bearer {ALPHABET_TOKEN}x", id="trailing-character"),
        pytest.param(f"Bearer {ALPHABET_TOKEN},", id="trailing-comma"),
        pytest.param(
            f"Bearer {ALPHABET_TOKEN},Bearer {ALPHABET_TOKEN}", id="comma-joined"
        ),
        pytest.param(
            f"Bearer {ALPHABET_TOKEN}, Bearer {ALPHABET_TOKEN}",
            id="comma-space-joined",
        ),
        pytest.param(f"Bearer {ALPHABET_TOKEN},{ALPHABET_TOKEN}", id="two-tokens"),
        pytest.param(f"Bearer {ALPHABET_TOKEN.lower()}", id="lower-case-token"),
        pytest.param(f"Bearer {ALPHABET_TOKEN[:-1]}", id="short-token"),
        pytest.param(f'Bearer "{ALPHABET_TOKEN}"', id="quoted-token"),
        pytest.param(f"Basic {ALPHABET_TOKEN}", id="basic-scheme"),
        pytest.param(f"Token {ALPHABET_TOKEN}", id="token-scheme"),
        pytest.param(f"Bearer: {ALPHABET_TOKEN}", id="scheme-with-colon"),
        pytest.param(f"Bearer={ALPHABET_TOKEN}", id="scheme-with-equals"),
        pytest.param(f"Bearers {ALPHABET_TOKEN}", id="longer-scheme"),
        pytest.param(ALPHABET_TOKEN, id="token-without-scheme"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="scheme-and-space"),
        pytest.param("", id="empty"),
    ],
)
def test_token_from_authorization_rejects(value):
    assert token_from_authorization(value) is None
