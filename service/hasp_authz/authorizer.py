"""Run one Check: read the credentials, look the key up, decide.

A Check that resolves a key (any decision that carries the key, allow or deny)
also records the key's last-used time in memory (see last_used.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hasp_authz.cache import CachedKeyCopy
from hasp_authz.decision import Decision, credentials_message, decide, read_credentials
from hasp_authz.last_used import LastUsedRecorder
from hasp_authz.outcomes import Outcome
from hasp_authz.routes import RouteTable
from hasp_authz.store import CopyUnavailable, KeyLookup, LookupResult
from hasp_authz.tokens import hash_token

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpAttributes:
    """The parts of Envoy's CheckRequest that the decision reads."""

    method: str
    path: str
    request_id: str
    # Every Authorization value, in order; several values mean several headers.
    authorization: list[str] = field(default_factory=list, repr=False)
    # Scope named by the Envoy route's ``hasp_scope``, replacing the table's.
    required_scope: str | None = None


class Authorizer:
    """Decides requests against the key copy (or its cache) and the route table.

    A Check takes one of two paths. ``decide_now`` decides without awaiting
    when it can: a missing or malformed key, or a key in the in-process
    cache. Otherwise it returns the key hash, and ``decide_after_lookup``
    reads the copy. The servicer puts a time limit on the second path only,
    so a cache hit costs no timer. ``authorize`` runs both.
    """

    def __init__(
        self,
        copy: KeyLookup,
        routes: RouteTable,
        clock: Callable[[], float] = time.time,
        last_used: LastUsedRecorder | None = None,
    ):
        self.copy = copy
        # Replaced whole on reload, so a Check sees one table from start to end.
        self.routes = routes
        self.clock = clock
        self.last_used = last_used
        # Only a cached copy can return a result without awaiting.
        self._cached = copy if isinstance(copy, CachedKeyCopy) else None

    async def authorize(
        self, request: HttpAttributes, deadline: float | None = None
    ) -> Decision:
        """Return the decision for one request. Raises CopyUnavailable.

        ``deadline`` (event-loop time) ends the key lookup; see store.KeyLookup.
        """
        early = self.decide_now(request)
        if isinstance(early, Decision):
            return early
        return await self.decide_after_lookup(request, early, deadline)

    def decide_now(self, request: HttpAttributes) -> Decision | str:
        """Return the decision if no lookup in Redis is needed, else the key hash."""
        credentials = read_credentials(request.authorization)
        if credentials.token is None:
            return Decision(
                Outcome.INVALID_API_KEY,
                message=credentials_message(request.authorization),
                credentials_sent=credentials.sent,
            )
        key_hash = hash_token(credentials.token)
        if self._cached is not None:
            hit = self._cached.peek(key_hash)
            if hit is not None:
                return self._decide(request, hit.result)
        return key_hash

    async def decide_after_lookup(
        self, request: HttpAttributes, key_hash: str, deadline: float | None
    ) -> Decision:
        """Read the key from the copy, then decide. Raises CopyUnavailable."""
        if self._cached is not None:
            found = await self._cached.fetch(key_hash, deadline)
        else:
            found = await self.copy.lookup(key_hash, deadline)
        return self._decide(request, found)

    def _decide(self, request: HttpAttributes, found: LookupResult) -> Decision:
        key, org = found if found is not None else (None, None)
        now = self.clock()
        decision = decide(
            credentials_sent=True,
            key=key,
            org=org,
            method=request.method,
            path=request.path,
            routes=self.routes,
            now=now,
            required_scope=request.required_scope,
        )
        # An unknown or expired key leaves decision.key empty, so it is not recorded.
        if decision.key is not None and self.last_used is not None:
            self.last_used.record(decision.key.key_id, now)
        return decision


__all__ = ["Authorizer", "CopyUnavailable", "HttpAttributes"]
