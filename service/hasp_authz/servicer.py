"""The gRPC face of hasp-authz: Envoy's Authorization/Check.

Fail-closed policy: Check never raises, except when gRPC cancels it because
the caller gave up or the shutdown grace period ended. A dependency failure, a
timeout, an invalid ``hasp_*`` context extension or a bug anywhere below becomes
the 503 AUTH_UNAVAILABLE deny, logged with the request id and the cause. Only
this module touches protobuf request messages.

Per-route policy: the Check's context_extensions, which only Envoy's
configuration can set, may name a scope, or mark the route public or shadow
(policy.py). A public route is allowed without a key. A shadow route is
decided as usual, but a deny is logged and counted as "would deny" and the
request is allowed without identity headers.

Every Check is counted in the metrics by outcome code and route template, and
every deny gets one log line (logs.DenyLog, rate-limited per code).

Time budget: each Check that must read Redis works to a deadline. The deadline
is HASP_CHECK_BUDGET_MS from its start or a little before the RPC's own
deadline, whichever comes first, so the 503 reaches Envoy before Envoy gives up
on the call. The key lookup ends at that deadline (store.py), and a backstop
just after it covers a hang anywhere else. A Check decided from the cache, or
without a key, awaits nothing and needs no timer.

Overload: at most ``max_concurrent_checks`` Checks run at once. One more gets
the same 503 at once, without waiting for a slot, because a queued Check would
only be answered after Envoy's timeout. The gRPC health service is a separate
servicer and is not counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from hasp_authz.authorizer import Authorizer, HttpAttributes
from hasp_authz.decision import Decision
from hasp_authz.logs import DenyLog
from hasp_authz.metrics import Metrics
from hasp_authz.outcomes import Outcome
from hasp_authz.policy import PolicyError, parse_route_policy
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.responses import (
    allow_response,
    anonymous_allow_response,
    deny_response,
    request_id_for,
)
from hasp_authz.store import CopyUnavailable

log = logging.getLogger(__name__)
# Deny lines go to a logger of their own, so operators can route or silence them.
decision_log = logging.getLogger("hasp_authz.decisions")

_IDENTITY_PREFIX = "x-hasp-"
# Seconds kept back from the RPC deadline for the reply to travel to Envoy.
REPLY_MARGIN_SECONDS = 0.02
# The servicer's own limit comes this long after the lookup's deadline, so the
# lookup's limit fires first and the cache learns that Redis failed.
BACKSTOP_SECONDS = 0.05
# Seconds between two overload warnings. Each warning counts the Checks denied
# since the previous one.
OVERLOAD_LOG_INTERVAL_SECONDS = 1.0
# Route label of the metrics for a public route, which no table entry matches.
PUBLIC_ROUTE = "public"


@dataclass(slots=True)
class _Verdict:
    """The outcome of one Check, for its response, metrics and log line."""

    decision: Decision
    request_id: str
    # Client-sent x-hasp-* header names, for the allow response to remove.
    strip_headers: list[str] = field(default_factory=list)
    public: bool = False
    shadow: bool = False
    # Cause of a 503, for the log line only.
    reason: str | None = None
    error: BaseException | None = None
    # Route template for metrics and logs when the decision carries no route.
    route: str | None = None
    # False for overload denials, which a periodic warning counts instead.
    log_deny: bool = True


class AuthorizationServicer(auth_grpc.AuthorizationServicer):
    def __init__(
        self,
        authorizer: Authorizer,
        *,
        budget_seconds: float,
        max_concurrent_checks: int = 256,
        metrics: Metrics | None = None,
        deny_log: DenyLog | None = None,
    ):
        self.authorizer = authorizer
        # Upper bound for one Check; the RPC deadline shortens it further.
        self.budget_seconds = budget_seconds
        self.max_concurrent_checks = max_concurrent_checks
        self.metrics = metrics if metrics is not None else Metrics()
        self.deny_log = deny_log if deny_log is not None else DenyLog(decision_log)
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._overload_denied = 0
        self._overload_logged_at = -OVERLOAD_LOG_INTERVAL_SECONDS

    async def Check(  # noqa: N802 - the RPC name is fixed by Envoy's proto
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckResponse:
        started = time.perf_counter()
        if self.in_flight >= self.max_concurrent_checks:
            verdict = self._overloaded(request)
        else:
            self.in_flight += 1
            self._idle.clear()
            try:
                verdict = await self._check(request, context)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()
        try:
            response = self._respond(verdict)
        except Exception as error:
            # Only a bug gets here; the Check still gets the documented 503.
            verdict = _Verdict(
                Decision(Outcome.AUTH_UNAVAILABLE),
                verdict.request_id,
                reason=f"building the response failed: {type(error).__name__}",
                error=error,
            )
            response = deny_response(verdict.decision, request_id=verdict.request_id)
        try:
            self._record(verdict, time.perf_counter() - started)
        except Exception:
            log.exception(
                "recording a Check's metrics and log line failed request_id=%s",
                verdict.request_id,
            )
        return response

    async def wait_until_idle(self, timeout: float) -> bool:
        """Wait until no Check is in flight. Returns False after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _check(
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> _Verdict:
        verdict = _Verdict(Decision(Outcome.AUTH_UNAVAILABLE), "req_unknown")
        try:
            http = request.attributes.request.http
            headers = read_headers(http)
            verdict.request_id = request_id_for(headers.request_id or http.id)
            verdict.strip_headers = headers.identity_names
            policy = parse_route_policy(request.attributes.context_extensions)
            if policy.public:
                verdict.public = True
                verdict.decision = Decision(Outcome.ALLOW)
                return verdict
            verdict.shadow = policy.shadow
            attributes = HttpAttributes(
                method=http.method,
                path=http.path,
                request_id=verdict.request_id,
                authorization=headers.authorization,
                required_scope=policy.required_scope,
            )
            early = self.authorizer.decide_now(attributes)
            if isinstance(early, Decision):
                verdict.decision = early
            else:
                verdict.decision = await self._decide(
                    attributes, early, context, verdict
                )
            if verdict.shadow and verdict.decision.route is None:
                # A key that fails before the route is matched still counts
                # against the route that it would have been denied on.
                match = self.authorizer.routes.match(http.method, http.path)
                verdict.route = match.route.template if match else None
        except PolicyError as error:
            verdict.reason = f"invalid Envoy route policy: {error}"
        except Exception as error:
            verdict.reason = f"unexpected error: {type(error).__name__}"
            verdict.error = error
        return verdict

    async def _decide(
        self,
        attributes: HttpAttributes,
        key_hash: str,
        context: grpc.aio.ServicerContext,
        verdict: _Verdict,
    ) -> Decision:
        """Look the key up in Redis within the Check's budget, then decide."""
        budget = self.budget_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - REPLY_MARGIN_SECONDS)
        if budget <= 0:
            verdict.reason = (
                f"the Check arrived with {remaining:.3f} s left before its RPC deadline"
            )
            return Decision(Outcome.AUTH_UNAVAILABLE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline + BACKSTOP_SECONDS):
                return await self.authorizer.decide_after_lookup(
                    attributes, key_hash, deadline
                )
        except CopyUnavailable as error:
            verdict.reason = f"key copy unavailable: {error}"
        except TimeoutError:
            verdict.reason = f"the Check exceeded its {budget:.3f} s budget"
        return Decision(Outcome.AUTH_UNAVAILABLE)

    def _respond(self, verdict: _Verdict) -> auth_pb2.CheckResponse:
        decision = verdict.decision
        if verdict.public:
            return anonymous_allow_response(
                request_id=verdict.request_id,
                strip_headers=verdict.strip_headers,
                policy="public",
            )
        if decision.allowed:
            return allow_response(
                decision,
                request_id=verdict.request_id,
                strip_headers=verdict.strip_headers,
            )
        if verdict.shadow:
            return anonymous_allow_response(
                request_id=verdict.request_id,
                strip_headers=verdict.strip_headers,
                policy="shadow",
            )
        return deny_response(decision, request_id=verdict.request_id)

    def _record(self, verdict: _Verdict, seconds: float) -> None:
        decision = verdict.decision
        route = decision.route.template if decision.route else verdict.route
        if verdict.public:
            route = PUBLIC_ROUTE
        if decision.allowed:
            self.metrics.observe_check(Outcome.ALLOW.value, route, seconds)
            if decision_log.isEnabledFor(logging.DEBUG):
                _log_allow(verdict, route)
            return
        code = decision.outcome.value
        key = decision.key
        if verdict.shadow:
            self.metrics.observe_check(Outcome.ALLOW.value, route, seconds)
            self.metrics.observe_shadow_denial(code, route)
        else:
            self.metrics.observe_check(code, route, seconds)
        if not verdict.log_deny:
            return
        unavailable = decision.outcome is Outcome.AUTH_UNAVAILABLE
        self.deny_log.deny(
            code,
            request_id=verdict.request_id,
            key_id=key.key_id if key else None,
            org_id=key.org_id if key else None,
            route=route,
            verb="would deny" if verdict.shadow else "deny",
            reason=verdict.reason,
            level=logging.ERROR if verdict.error else (
                logging.WARNING if unavailable else logging.INFO
            ),
            exc_info=verdict.error,
        )  # fmt: skip

    def _overloaded(self, request: auth_pb2.CheckRequest) -> _Verdict:
        try:
            http = request.attributes.request.http
            request_id = request_id_for(read_headers(http).request_id or http.id)
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
                extra={"event": "overloaded", "denied": self._overload_denied},
            )
            self._overload_logged_at = now
            self._overload_denied = 0
        # The deny line would repeat the warning for each Check, so it goes at
        # debug level.
        log.debug("deny code=AUTH_UNAVAILABLE request_id=%s overloaded", request_id)
        return _Verdict(Decision(Outcome.AUTH_UNAVAILABLE), request_id, log_deny=False)


def _log_allow(verdict: _Verdict, route: str | None) -> None:
    key = verdict.decision.key
    fields = {
        "request_id": verdict.request_id,
        "key_id": key.key_id if key else "-",
        "org_id": key.org_id if key else "-",
        "route": route or "-",
    }
    decision_log.debug(
        "allow request_id=%s key_id=%s org_id=%s route=%s",
        *fields.values(),
        extra={"event": "allow", **fields},
    )


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    """The request headers that a Check reads, from one pass over them."""

    # Every Authorization value, in order.
    authorization: list[str]
    # The first x-request-id value, or "" when none was sent.
    request_id: str
    # Client-sent x-hasp-* header names, sorted.
    identity_names: list[str]


def read_headers(http: auth_pb2.AttributeContext.HttpRequest) -> RequestHeaders:
    """Read Authorization, x-request-id and the x-hasp-* names in one pass.

    Envoy fills ``header_map`` (one entry per header line, when
    ``encode_raw_headers`` is on) or else the ``headers`` map, where repeated
    headers arrive joined by commas. Envoy also joins repeated Authorization
    headers into one value while parsing, even in ``header_map``, and such a
    joined value is never a well-formed key, so it is a 401 too.
    """
    authorization: list[str] = []
    request_id = ""
    names: set[str] = set()
    # One loop per encoding, without a generator, because this runs for every
    # header of every Check.
    if http.header_map.headers:
        for header in http.header_map.headers:
            name = header.key.lower()
            if name == "authorization" or name == "x-request-id":
                raw = header.raw_value or header.value.encode(
                    "utf-8", "surrogateescape"
                )
                # NOTE: Latin-1 maps every byte to one character, so a
                # non-ASCII value still reaches the checks as an unmatchable
                # string, not an error.
                value = raw.decode("latin-1")
                if name == "authorization":
                    authorization.append(value)
                elif not request_id:
                    request_id = value
            elif name.startswith(_IDENTITY_PREFIX):
                names.add(name)
    else:
        for name, value in http.headers.items():
            name = name.lower()
            if name == "authorization":
                authorization.append(value)
            elif name == "x-request-id":
                request_id = request_id or value
            elif name.startswith(_IDENTITY_PREFIX):
                names.add(name)
    return RequestHeaders(authorization, request_id, sorted(names))
