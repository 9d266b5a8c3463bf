"""Run one Check: read the credentials, look the key up, decide."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hasp_authz.decision import Decision, credentials_message, decide, read_credentials
from hasp_authz.outcomes import Outcome
from hasp_authz.routes import RouteTable
from hasp_authz.store import CopyUnavailable, RedisKeyCopy
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


class Authorizer:
    """Decides requests against the Redis copy and the route table."""

    def __init__(
        self,
        copy: RedisKeyCopy,
        routes: RouteTable,
        clock: Callable[[], float] = time.time,
    ):
        self.copy = copy
        # Replaced whole on reload, so a Check sees one table from start to end.
        self.routes = routes
        self.clock = clock

    async def authorize(self, request: HttpAttributes) -> Decision:
        """Return the decision for one request. Raises CopyUnavailable."""
        credentials = read_credentials(request.authorization)
        if credentials.token is None:
            return Decision(
                Outcome.INVALID_API_KEY,
                message=credentials_message(request.authorization),
                credentials_sent=credentials.sent,
            )
        found = await self.copy.lookup(hash_token(credentials.token))
        key, org = found if found is not None else (None, None)
        return decide(
            credentials_sent=True,
            key=key,
            org=org,
            method=request.method,
            path=request.path,
            routes=self.routes,
            now=self.clock(),
        )


__all__ = ["Authorizer", "CopyUnavailable", "HttpAttributes"]
