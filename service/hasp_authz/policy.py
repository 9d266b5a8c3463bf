"""Per-route policy that Envoy sends in the Check's context_extensions.

An Envoy route can set ``typed_per_filter_config`` for ext_authz with
``check_settings.context_extensions``, and Envoy copies that map into every
CheckRequest for the route. Clients cannot set or change it: it comes from
Envoy's configuration only, never from request headers, so the sidecar may
trust it. Three keys are read, and every other ``hasp_*`` key is an error so
that a typo never silently drops a rule:

- ``hasp_scope``: the scope this route requires, in place of the route
  table's scope for the matched route. The route table still decides whether
  the path and method match (404 and 405 as usual).
- ``hasp_public: "true"``: no key is needed. The request is allowed without
  reading the key or Redis, so the route keeps working while Redis is down.
  A key that is sent is not checked. The upstream gets no identity:
  ``authorization`` and every client-sent ``x-hasp-*`` header are removed and
  none is added.
- ``hasp_shadow: "true"``: shadow mode. The Check decides as usual and a deny
  is counted in ``hasp_authz_shadow_denials_total`` and logged as "would
  deny", but the request is allowed. The upstream gets identity headers only
  when the decision was ALLOW. NOTE: a 503 outcome (Redis down) is allowed
  too, so a shadow route does not fail closed.

Values other than ``"true"`` and ``"false"``, an unknown scope, or
``hasp_public`` combined with another key raise PolicyError. The servicer
then fails closed with the 503 outcome and logs the error, because the fault
is in the operator's configuration, not in the client's request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from hasp_authz.scopes import SCOPES

SCOPE_KEY = "hasp_scope"
PUBLIC_KEY = "hasp_public"
SHADOW_KEY = "hasp_shadow"
_KNOWN_KEYS = frozenset({SCOPE_KEY, PUBLIC_KEY, SHADOW_KEY})
_PREFIX = "hasp_"
_BOOLEANS = {"true": True, "false": False}


class PolicyError(ValueError):
    """Envoy sent an invalid hasp_* context extension. The message names it."""


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Requirements of one Envoy route that add to or replace the route table."""

    # Scope that replaces the route table's scope, or None to keep it.
    required_scope: str | None = None
    public: bool = False
    shadow: bool = False


DEFAULT_POLICY = RoutePolicy()


def parse_route_policy(extensions: Mapping[str, str]) -> RoutePolicy:
    """Read the ``hasp_*`` entries of a Check's context_extensions.

    Entries without the ``hasp_`` prefix belong to other filters and are
    ignored. Raises PolicyError for an invalid entry.
    """
    ours = tuple(sorted((k, v) for k, v in extensions.items() if k.startswith(_PREFIX)))
    if not ours:
        return DEFAULT_POLICY
    return _parse(ours)


# Envoy sends the same few maps over and over, one per configured route, so
# the parsed result is cached. Errors are not cached and are raised each time.
@lru_cache(maxsize=256)
def _parse(entries: tuple[tuple[str, str], ...]) -> RoutePolicy:
    values = dict(entries)
    unknown = sorted(set(values) - _KNOWN_KEYS)
    if unknown:
        raise PolicyError(
            f"unknown context extension {unknown[0]!r}; expected "
            f"{SCOPE_KEY}, {PUBLIC_KEY} or {SHADOW_KEY}"
        )
    scope = values.get(SCOPE_KEY)
    if scope is not None and scope not in SCOPES:
        raise PolicyError(
            f"context extension {SCOPE_KEY}={scope!r:.60} is not a known scope; "
            f"expected one of {', '.join(sorted(SCOPES))}"
        )
    public = _boolean(values, PUBLIC_KEY)
    shadow = _boolean(values, SHADOW_KEY)
    if public and (scope is not None or shadow):
        raise PolicyError(
            f'context extension {PUBLIC_KEY}="true" cannot be combined with '
            f"{SCOPE_KEY} or {SHADOW_KEY}, because a public route checks no key"
        )
    return RoutePolicy(required_scope=scope, public=public, shadow=shadow)


def _boolean(values: Mapping[str, str], key: str) -> bool:
    raw = values.get(key, "false")
    if raw not in _BOOLEANS:
        raise PolicyError(
            f'context extension {key}={raw!r:.60} is invalid; expected "true" or '
            '"false"'
        )
    return _BOOLEANS[raw]
