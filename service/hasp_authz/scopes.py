"""The scopes a key can hold. Route files and ``hasp-keys create`` accept only these."""

from __future__ import annotations

SCOPES: frozenset[str] = frozenset(
    {
        "ai:chat",
        "ai:documents",
        "ai:embeddings",
        "ai:summarize",
        "control:read",
        "control:webhooks",
    }
)


def unknown_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    """Return the entries of ``scopes`` that are not known scopes, in order."""
    return [scope for scope in scopes if scope not in SCOPES]
