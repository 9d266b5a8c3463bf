"""Build the CheckResponse for an allow and for each deny, each in one place."""

from __future__ import annotations

import functools
import json
import re
import uuid

from google.protobuf import struct_pb2

from hasp_authz.decision import Decision
from hasp_authz.outcomes import DENY_KINDS, RETRY_AFTER_SECONDS, Outcome
from hasp_authz.proto import envoy_config_core_v3_pb2 as core_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_type_v3_pb2 as type_pb2
from hasp_authz.proto import google_rpc_status_pb2 as status_pb2
from hasp_authz.records import KeyRecord

IDENTITY_HEADERS = ("x-hasp-org-id", "x-hasp-key-id", "x-hasp-scopes")
# gRPC status codes carried in CheckResponse.status: Envoy allows on OK (0)
# and denies on anything else; 7 is PERMISSION_DENIED, 14 UNAVAILABLE.
_GRPC_OK = 0
_GRPC_PERMISSION_DENIED = 7
_GRPC_UNAVAILABLE = 14
_OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SAFE_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
# A run this long of letters and digits could be a token body (32 characters) or
# a key hash (64), which must never be echoed or logged. UUIDs have runs of 12.
_SECRET_LIKE_RE = re.compile(r"[A-Za-z0-9]{32}", re.ASCII)


def request_id_for(envoy_request_id: str) -> str:
    """Return ``req_`` plus Envoy's request id if it is safe, else a new id."""
    if _SAFE_REQUEST_ID_RE.fullmatch(envoy_request_id) and not (
        _SECRET_LIKE_RE.search(envoy_request_id)
    ):
        return "req_" + envoy_request_id
    return "req_" + uuid.uuid4().hex


def allow_response(
    decision: Decision, *, request_id: str, strip_headers: list[str]
) -> auth_pb2.CheckResponse:
    """Allow, replace the identity headers and remove the client's credentials.

    ``strip_headers`` names client-sent ``x-hasp-*`` headers to remove. The
    identity headers among them are overwritten instead.
    """
    key = decision.key
    assert key is not None, "an allow decision always carries its key"
    response = auth_pb2.CheckResponse()
    # The parts that depend on the key alone are built once per key record
    # and copied in C, which costs less than building them per Check.
    response.CopyFrom(_allow_template(key))
    response.dynamic_metadata.fields["request_id"].string_value = request_id
    if strip_headers:
        response.ok_response.headers_to_remove.extend(
            name for name in strip_headers if name not in IDENTITY_HEADERS
        )
    return response


# Bounded so that a key store with many active keys cannot grow it without
# limit. A KeyRecord is immutable and hashable, so a changed record is a new
# entry and a template never outlives the facts it was built from.
@functools.lru_cache(maxsize=4096)
def _allow_template(key: KeyRecord) -> auth_pb2.CheckResponse:
    scopes = " ".join(key.scopes)
    identity = {
        "x-hasp-org-id": key.org_id,
        "x-hasp-key-id": key.key_id,
        "x-hasp-scopes": scopes,
    }
    ok = auth_pb2.OkHttpResponse(
        headers=[_header(name, value) for name, value in identity.items()],
        headers_to_remove=["authorization"],
    )
    metadata = {"org_id": key.org_id, "key_id": key.key_id, "scopes": scopes}
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_OK),
        ok_response=ok,
        dynamic_metadata=_struct(metadata),
    )


def anonymous_allow_response(
    *, request_id: str, strip_headers: list[str], policy: str
) -> auth_pb2.CheckResponse:
    """Allow without identity, for a public route or a shadow-mode deny.

    The upstream gets no ``x-hasp-*`` header and no Authorization header.
    ``strip_headers`` names every client-sent ``x-hasp-*`` header, the
    identity headers included, because none is overwritten here. ``policy``
    ("public" or "shadow") goes into the dynamic metadata for access logs.
    """
    ok = auth_pb2.OkHttpResponse(
        headers_to_remove=["authorization", *strip_headers],
    )
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_OK),
        ok_response=ok,
        dynamic_metadata=_struct({"request_id": request_id, "policy": policy}),
    )


def deny_response(decision: Decision, *, request_id: str) -> auth_pb2.CheckResponse:
    """Deny with the documented JSON body and the outcome's extra headers."""
    template, body_head, body_tail = _deny_template(decision)
    response = auth_pb2.CheckResponse()
    # Everything but the request id is the same for every Check with this
    # decision, and a flood of bad keys repeats one decision many times.
    response.CopyFrom(template)
    escaped = json.dumps(request_id)[1:-1]
    response.denied_response.body = body_head + escaped + body_tail
    response.dynamic_metadata.fields["request_id"].string_value = request_id
    return response


# Stands in for the request id in a template body. JSON escapes its NUL
# characters, so no message can contain the escaped form by accident.
_REQUEST_ID_MARK = "\x00request_id\x00"
_ESCAPED_MARK = json.dumps(_REQUEST_ID_MARK)[1:-1]


@functools.lru_cache(maxsize=4096)
def _deny_template(decision: Decision) -> tuple[auth_pb2.CheckResponse, str, str]:
    """Build a decision's deny response once, with its body split at the request id.

    A Decision is immutable and hashable. The cache is bounded, because
    decisions that name a key are as many as the keys that get them.
    """
    kind = DENY_KINDS[decision.outcome]
    body = {
        "success": False,
        "error": {
            "code": decision.outcome.value,
            "type": kind.type,
            "message": decision.message or kind.message,
            "retryable": kind.retryable,
            "request_id": _REQUEST_ID_MARK,
        },
    }
    body_head, _, body_tail = json.dumps(body, separators=(",", ":")).partition(
        _ESCAPED_MARK
    )
    headers = [_header("content-type", "application/json")]
    headers += [_header(name, value) for name, value in _extra_headers(decision)]
    denied = auth_pb2.DeniedHttpResponse(
        status=type_pb2.HttpStatus(code=kind.status), headers=headers
    )
    grpc_code = (
        _GRPC_UNAVAILABLE
        if decision.outcome is Outcome.AUTH_UNAVAILABLE
        else _GRPC_PERMISSION_DENIED
    )
    metadata = {"code": decision.outcome.value}
    if decision.key is not None:
        metadata.update(org_id=decision.key.org_id, key_id=decision.key.key_id)
    template = auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code),
        denied_response=denied,
        dynamic_metadata=_struct(metadata),
    )
    return template, body_head, body_tail


def _extra_headers(decision: Decision) -> list[tuple[str, str]]:
    outcome = decision.outcome
    if outcome is Outcome.INVALID_API_KEY:
        challenge = 'Bearer realm="hasp"'
        if decision.credentials_sent:
            challenge += ', error="invalid_token"'
        return [("www-authenticate", challenge)]
    if outcome is Outcome.METHOD_NOT_ALLOWED and decision.route is not None:
        return [("allow", decision.route.allow_header)]
    if outcome is Outcome.AUTH_UNAVAILABLE:
        return [("retry-after", str(RETRY_AFTER_SECONDS))]
    return []


def _header(name: str, value: str) -> core_pb2.HeaderValueOption:
    return core_pb2.HeaderValueOption(
        header=core_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def _struct(fields: dict[str, str]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(fields)
    return result
