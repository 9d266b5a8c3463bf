"""The gRPC face of hasp-authz: Envoy's Authorization/Check.

Fail-closed policy: Check never raises, except when gRPC cancels it because
the caller gave up or the shutdown grace period ended. A dependency failure, a
timeout or a bug anywhere below becomes the 503 AUTH_UNAVAILABLE deny, logged
with the request id. Only this module touches protobuf request messages.

Time budget: each Check works to a deadline, HASP_CHECK_BUDGET_MS from its
start or a little before the RPC's own deadline, whichever comes first, so the
503 reaches Envoy before Envoy gives up on the call. The key lookup ends at that
deadline (store.py); a backstop just after it covers a hang anywhere else.

Overload: at most ``max_concurrent_checks`` Checks run at once. One more gets
the same 503 at once, without waiting for a slot, because a queued Check would
only be answered after Envoy's timeout. The gRPC health service is a separate
servicer and is not counted.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from hasp_authz.authorizer import Authorizer, HttpAttributes
from hasp_authz.decision import Decision
from hasp_authz.outcomes import Outcome
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.responses import (
    IDENTITY_HEADERS,
    allow_response,
    deny_response,
    request_id_for,
)
from hasp_authz.store import CopyUnavailable

log = logging.getLogger(__name__)

_IDENTITY_PREFIX = "x-hasp-"
# Seconds kept back from the RPC deadline for the reply to travel to Envoy.
REPLY_MARGIN_SECONDS = 0.02
# The servicer's own limit comes this long after the lookup's deadline, so the
# lookup's limit fires first and the cache learns that Redis failed.
BACKSTOP_SECONDS = 0.05
# Seconds between two overload warnings. Each warning counts the Checks denied
# since the previous one.
OVERLOAD_LOG_INTERVAL_SECONDS = 1.0


class AuthorizationServicer(auth_grpc.AuthorizationServicer):
    def __init__(
        self,
        authorizer: Authorizer,
        *,
        budget_seconds: float,
        max_concurrent_checks: int = 256,
    ):
        self.authorizer = authorizer
        # Upper bound for one Check; the RPC deadline shortens it further.
        self.budget_seconds = budget_seconds
        self.max_concurrent_checks = max_concurrent_checks
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._overload_denied = 0
        self._overload_logged_at = -OVERLOAD_LOG_INTERVAL_SECONDS

    async def Check(  # noqa: N802 - the RPC name is fixed by Envoy's proto
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckResponse:
        if self.in_flight >= self.max_concurrent_checks:
            return self._deny_overloaded(request)
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._check(request, context)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_until_idle(self, timeout: float) -> bool:
        """Wait until no Check is in flight. Returns False after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _check(
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckResponse:
        request_id = "req_unknown"
        try:
            request_id = _request_id(request)
            http = request.attributes.request.http
            attributes, strip_headers = read_http_attributes(http, request_id)
            decision = await self._decide(attributes, context)
        except Exception:
            log.exception("check failed; denying with 503 request_id=%s", request_id)
            decision = Decision(Outcome.AUTH_UNAVAILABLE)
            strip_headers = []
        _log_decision(decision, request_id)
        if decision.allowed:
            return allow_response(
                decision, request_id=request_id, strip_headers=strip_headers
            )
        return deny_response(decision, request_id=request_id)

    async def _decide(
        self, attributes: HttpAttributes, context: grpc.aio.ServicerContext
    ) -> Decision:
        budget = self.budget_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - REPLY_MARGIN_SECONDS)
        if budget <= 0:
            log.warning(
                "check arrived with %.3f s left before its RPC deadline; denying "
                "with 503 request_id=%s",
                remaining,
                attributes.request_id,
            )
            return Decision(Outcome.AUTH_UNAVAILABLE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline + BACKSTOP_SECONDS):
                return await self.authorizer.authorize(attributes, deadline)
        except CopyUnavailable as error:
            log.warning(
                "key copy unavailable; denying with 503 request_id=%s error=%s",
                attributes.request_id,
                error,
            )
        except TimeoutError:
            log.warning(
                "check exceeded its %.3f s budget; denying with 503 request_id=%s",
                budget,
                attributes.request_id,
            )
        return Decision(Outcome.AUTH_UNAVAILABLE)

    def _deny_overloaded(
        self, request: auth_pb2.CheckRequest
    ) -> auth_pb2.CheckResponse:
        try:
            request_id = _request_id(request)
        except Exception:
            request_id = request_id_for("")
        self._overload_denied += 1
        now = time.monotonic()
        if now - self._overload_logged_at >= OVERLOAD_LOG_INTERVAL_SECONDS:
            log.warning(
                "overloaded: %d Checks in flight, the HASP_MAX_CONCURRENT_CHECKS "
                "limit; denied %d Checks with 503 since the last warning",
                self.in_flight,
                self._overload_denied,
            )
            self._overload_logged_at = now
            self._overload_denied = 0
        log.debug("deny code=AUTH_UNAVAILABLE request_id=%s overloaded", request_id)
        return deny_response(Decision(Outcome.AUTH_UNAVAILABLE), request_id=request_id)


def _request_id(request: auth_pb2.CheckRequest) -> str:
    http = request.attributes.request.http
    # NOTE: http.id is Envoy's internal stream id, not the x-request-id that
    # Envoy returns to the client, so the header comes first.
    return request_id_for(_first(http, "x-request-id") or http.id)


def read_http_attributes(
    http: auth_pb2.AttributeContext.HttpRequest, request_id: str
) -> tuple[HttpAttributes, list[str]]:
    """Convert Envoy's HttpRequest into the decision's input.

    Returns the attributes and the client-sent ``x-hasp-*`` header names that
    the allow response must remove. Envoy fills ``header_map`` (one entry per
    header line, when ``encode_raw_headers`` is on) or else the ``headers`` map,
    where repeated headers arrive joined by commas. Envoy also joins repeated
    Authorization headers into one value while parsing, even in ``header_map``,
    and such a joined value is never a well-formed key, so it is a 401 too.
    """
    authorization: list[str] = []
    names: set[str] = set()
    for name, value in _header_items(http):
        if name == "authorization":
            authorization.append(value)
        elif name.startswith(_IDENTITY_PREFIX) and name not in IDENTITY_HEADERS:
            names.add(name)
    attributes = HttpAttributes(
        method=http.method,
        path=http.path,
        request_id=request_id,
        authorization=authorization,
    )
    return attributes, sorted(names)


def _header_items(http: auth_pb2.AttributeContext.HttpRequest):
    if http.header_map.headers:
        for header in http.header_map.headers:
            raw = header.raw_value or header.value.encode("utf-8", "surrogateescape")
            # NOTE: Latin-1 maps every byte to one character, so a non-ASCII value
            # still reaches the checks as an unmatchable string, not an error.
            yield header.key.lower(), raw.decode("latin-1")
    else:
        for name, value in http.headers.items():
            yield name.lower(), value


def _first(http: auth_pb2.AttributeContext.HttpRequest, name: str) -> str:
    for header_name, value in _header_items(http):
        if header_name == name:
            return value
    return ""


def _log_decision(decision: Decision, request_id: str) -> None:
    key_id = decision.key.key_id if decision.key else "-"
    org_id = decision.key.org_id if decision.key else "-"
    route = decision.route.template if decision.route else "-"
    if decision.allowed:
        log.debug(
            "allow request_id=%s key_id=%s org_id=%s route=%s",
            request_id, key_id, org_id, route,
        )  # fmt: skip
    else:
        log.info(
            "deny code=%s request_id=%s key_id=%s org_id=%s route=%s",
            decision.outcome.value, request_id, key_id, org_id, route,
        )  # fmt: skip
