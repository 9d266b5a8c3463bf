"""Every outcome of a Check, and the one table that maps each deny to HTTP.

The same ``code`` string appears in the JSON error body, the log line and the
metric label, so an operator can follow one denial through all three.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    ALLOW = "ALLOW"
    INVALID_API_KEY = "INVALID_API_KEY"
    BAA_REQUIRED = "BAA_REQUIRED"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    MISSING_SCOPE = "MISSING_SCOPE"
    AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class DenyKind:
    """Status, type, retryable flag and message that one deny outcome sends."""

    status: int
    type: str
    retryable: bool
    message: str


DENY_KINDS: dict[Outcome, DenyKind] = {
    Outcome.INVALID_API_KEY: DenyKind(
        401,
        "unauthorized",
        False,
        "The API key is invalid, revoked or expired.",
    ),
    Outcome.BAA_REQUIRED: DenyKind(
        402,
        "payment_required",
        False,
        "An active Business Associate Agreement is required to use the AI API.",
    ),
    Outcome.NOT_FOUND: DenyKind(
        404,
        "not_found",
        False,
        "No API route matches this path.",
    ),
    Outcome.METHOD_NOT_ALLOWED: DenyKind(
        405,
        "method_not_allowed",
        False,
        "This route does not allow the request method.",
    ),
    Outcome.MISSING_SCOPE: DenyKind(
        403,
        "forbidden",
        False,
        "The API key does not have the scope this route requires.",
    ),
    Outcome.AUTH_UNAVAILABLE: DenyKind(
        503,
        "service_unavailable",
        True,
        "The authorization service is temporarily unavailable. Retry the request.",
    ),
}

# Seconds a client should wait before retrying a 503, sent as Retry-After.
RETRY_AFTER_SECONDS = 1
