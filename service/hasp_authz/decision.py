"""The authorization decision, as plain data in and a Decision out.

Nothing here touches gRPC or Redis, so every rule is unit-tested with tables of
cases. The checks run in this order and the first that fails decides:

1. a single, well-formed bearer key that the copy contains, not expired (401)
2. the key's organization has an active BAA (402)
3. a route matches the path (404)
4. the route allows the method (405)
5. the key has the route's scope, or the Envoy route's ``hasp_scope`` (403)

A dependency failure (Redis down, the copy incomplete) is the 503 outcome, and
the servicer produces it for any exception, so every fault fails closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hasp_authz.outcomes import Outcome
from hasp_authz.records import KeyRecord, OrgRecord
from hasp_authz.routes import Route, RouteTable
from hasp_authz.tokens import token_from_authorization


@dataclass(frozen=True, slots=True)
class Credentials:
    """Credentials from the Authorization headers. Contains the token, never log it."""

    token: str | None
    # True when some Authorization value was sent, even a malformed one, which
    # selects error="invalid_token" in WWW-Authenticate.
    sent: bool

    def __repr__(self) -> str:
        shown = "<redacted>" if self.token else None
        return f"Credentials(token={shown}, sent={self.sent})"


@dataclass(frozen=True, slots=True)
class Decision:
    """The result of a Check, before it is turned into a CheckResponse."""

    outcome: Outcome
    message: str | None = None
    key: KeyRecord | None = None
    route: Route | None = None
    credentials_sent: bool = False

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


def read_credentials(authorization_values: list[str]) -> Credentials:
    """Extract the token from the request's Authorization values.

    Exactly one value of the form ``Bearer hasp_key_live_...`` yields a token.
    None, several values or anything malformed yields no token.
    """
    if len(authorization_values) != 1:
        return Credentials(token=None, sent=bool(authorization_values))
    return Credentials(token_from_authorization(authorization_values[0]), sent=True)


def credentials_message(authorization_values: list[str]) -> str:
    """Say in plain words why these Authorization values yielded no key."""
    if not authorization_values:
        return (
            "No API key was sent. Send it as 'Authorization: Bearer hasp_key_live_...'."
        )
    if len(authorization_values) > 1:
        return "Send exactly one Authorization header; this request had several."
    return (
        "The API key is malformed: expected 'Bearer hasp_key_live_' followed by "
        "32 upper-case base32 characters."
    )


def decide(
    *,
    credentials_sent: bool,
    key: KeyRecord | None,
    org: OrgRecord | None,
    method: str,
    path: str,
    routes: RouteTable,
    now: float,
    required_scope: str | None = None,
) -> Decision:
    """Apply the decision steps to a key already looked up (or None if unknown).

    ``required_scope``, from the Envoy route's policy, replaces the matched
    route's scope. ``org`` is the record of ``key.org_id``. A known key with a
    missing org means the copy is incomplete, which is the 503 outcome, so the
    caller must not pass one. This function would return 402.
    """
    if key is None or (key.expires_at is not None and now >= key.expires_at):
        return Decision(Outcome.INVALID_API_KEY, credentials_sent=credentials_sent)
    if org is None or not org.baa_active:
        return Decision(Outcome.BAA_REQUIRED, key=key, credentials_sent=True)

    match = routes.match(method, path)
    if match is None:
        return Decision(Outcome.NOT_FOUND, key=key, credentials_sent=True)
    route = match.route
    if not match.method_allowed:
        return Decision(
            Outcome.METHOD_NOT_ALLOWED, key=key, route=route, credentials_sent=True
        )
    scope = required_scope or route.scope
    if scope not in key.scopes:
        return Decision(
            Outcome.MISSING_SCOPE,
            message=(
                f"The API key {key.key_id} does not have the scope "
                f"{scope!r}, which this route requires."
            ),
            key=key,
            route=route,
            credentials_sent=True,
        )
    return Decision(Outcome.ALLOW, key=key, route=route, credentials_sent=True)
