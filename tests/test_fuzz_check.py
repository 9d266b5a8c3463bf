"""Fuzz the Check RPC with raw serialized CheckRequest bytes.

The bytes are either arbitrary or mutations of serialized Envoy-like requests:
bit flips, inserted, deleted, overwritten and repeated bytes, truncation, and
concatenation, which protobuf parses as a merge of two messages. Bytes that
parse as a CheckRequest go over gRPC exactly as they are, not re-serialized, to
the in-process server of test_hostile_input.py. The response must be well
formed, its status must equal the oracle's for the parsed request, so no allow
happens without the valid key, and no exception or secret may reach the log.

Set HYPOTHESIS_PROFILE=thorough for a longer search than the default "ci".
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.tokens import hash_token
from test_hostile_input import (
    HYPOTHESIS_SETTINGS,
    RPC_TIMEOUT_SECONDS,
    TOKEN,
    UNKNOWN_TOKEN,
    Authz,
    assert_allow_replaces_identity,
    assert_well_formed,
    expected_status,
    running_authz,
)


@pytest.fixture(scope="module")
def authz(redis_url: str) -> Iterator[Authz]:
    with running_authz(redis_url) as running:
        yield running


def envoy_like_request(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    *,
    legacy_map: bool = False,
) -> auth_pb2.CheckRequest:
    """Build a CheckRequest with the fields Envoy fills, pseudo-headers first."""
    request = auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.address.socket_address.port_value = 50000
    attributes.destination.address.socket_address.address = "127.0.0.1"
    attributes.destination.address.socket_address.port_value = 8080
    attributes.request.time.FromSeconds(1_700_000_000)
    http = attributes.request.http
    http.id = "1234567890"
    http.method = method
    http.path = path
    http.host = "api.example.test"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    lines = [(":authority", "api.example.test"), (":path", path), (":method", method)]
    lines += [("x-request-id", "5f0c1e8a-4d2b-4f7e-9a61-0c3d2b1a9e77"), *headers]
    for name, value in lines:
        if legacy_map:
            http.headers[name] = value
        else:
            http.header_map.headers.add(key=name, raw_value=value.encode())
    return request


AUTHORIZATION = ("authorization", f"Bearer {TOKEN}")
# Serialized requests to mutate: allows in both header encodings, and near them
# a 403, a 405 and two 401s.
SEEDS = [
    envoy_like_request("POST", "/v1/ai/chat", [AUTHORIZATION]),
    envoy_like_request("POST", "/v1/ai/chat", [AUTHORIZATION], legacy_map=True),
    envoy_like_request(
        "GET",
        "/v1/ai/documents/doc_1?version=2",
        [AUTHORIZATION, ("x-hasp-org-id", "evil"), ("x-hasp-admin", "1")],
    ),
    envoy_like_request("GET", "/v1/usage", [AUTHORIZATION]),
    envoy_like_request("GET", "/v1/ai/chat", [AUTHORIZATION]),
    envoy_like_request(
        "POST", "/v1/ai/chat", [AUTHORIZATION, ("authorization", "Bearer x")]
    ),
    envoy_like_request(
        "POST", "/v1/ai/chat", [("authorization", f"Bearer {UNKNOWN_TOKEN}")]
    ),
]
SERIALIZED_SEEDS = [seed.SerializeToString() for seed in SEEDS]


def fragment(
    path: str | None = None,
    method: str | None = None,
    header: tuple[str, str] | None = None,
    legacy_header: tuple[str, str] | None = None,
) -> bytes:
    """Serialize a CheckRequest that sets only the given fields, for merging."""
    request = auth_pb2.CheckRequest()
    http = request.attributes.request.http
    if path is not None:
        http.path = path
    if method is not None:
        http.method = method
    if header is not None:
        http.header_map.headers.add(key=header[0], raw_value=header[1].encode())
    if legacy_header is not None:
        http.headers[legacy_header[0]] = legacy_header[1]
    return request.SerializeToString()


# Appended to a seed, a fragment replaces the path or method, or adds a header
# entry, as a smuggled second message would.
FRAGMENTS = [
    fragment(path="/v1/usage"),
    fragment(path="/v1/ai/chat"),
    fragment(path="/v1/ai/chat/../../usage"),
    fragment(method="POST"),
    fragment(method="GET"),
    fragment(header=AUTHORIZATION),
    fragment(header=("Authorization", f"Bearer {UNKNOWN_TOKEN}")),
    fragment(header=("x-hasp-scopes", "control:read")),
    fragment(legacy_header=AUTHORIZATION),
]
MUTATIONS = [
    "flip", "printable", "insert", "delete", "repeat", "truncate", "merge-seed",
    "merge-fragment",
]  # fmt: skip


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    """Return a serialized seed after one to three drawn mutations."""
    data = bytearray(draw(st.sampled_from(SERIALIZED_SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(MUTATIONS))
        at = draw(st.integers(0, len(data) - 1))
        if mutation == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif mutation == "printable":
            # Keeps every length prefix, so inside a string the message still
            # parses, with a different value.
            data[at] = draw(st.integers(0x20, 0x7E))
        elif mutation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif mutation == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif mutation == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif mutation == "truncate":
            del data[at:]
        else:
            # Concatenated messages parse as one: repeated fields and map
            # entries append, and later scalar fields replace earlier ones.
            pool = SERIALIZED_SEEDS if mutation == "merge-seed" else FRAGMENTS
            other = draw(st.sampled_from(pool))
            data = bytearray(other) + data if draw(st.booleans()) else data + other
        if not data:
            break
    return bytes(data)


def send_and_verify(authz: Authz, data: bytes) -> str:
    """Send ``data`` as a Check and verify the response if it parses at all.

    Returns a label for hypothesis' statistics: the HTTP status, or that the
    bytes are not a CheckRequest.
    """
    try:
        request = auth_pb2.CheckRequest.FromString(data)
    except DecodeError:
        return "not a CheckRequest"

    response = authz.server.check_bytes(data, timeout=RPC_TIMEOUT_SECONDS)

    status = assert_well_formed(response)
    assert status == expected_status(request)
    if status == 200:
        assert_allow_replaces_identity(response, request)
    serialized = response.SerializeToString()
    assert TOKEN.encode() not in serialized
    assert hash_token(TOKEN).encode() not in serialized
    authz.assert_clean_log()
    return f"HTTP {status}"


# Most fuzzed bytes do not parse and cost no RPC, so these tests draw five
# times as many examples as the profile names.
FUZZ_SETTINGS = settings(
    HYPOTHESIS_SETTINGS, max_examples=HYPOTHESIS_SETTINGS.max_examples * 5
)


@FUZZ_SETTINGS
@given(data=st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(authz: Authz, data: bytes) -> None:
    event(send_and_verify(authz, data))


@FUZZ_SETTINGS
@given(data=mutated_seeds())
def test_fuzz_mutated_requests(authz: Authz, data: bytes) -> None:
    event(send_and_verify(authz, data))


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (data, expected_status(seed))
        for data, seed in zip(SERIALIZED_SEEDS, SEEDS, strict=True)
    ],
)
def test_fuzz_seed_follows_oracle(authz: Authz, data: bytes, status: int) -> None:
    # The seeds unchanged, so the mutations start from requests that work.
    assert send_and_verify(authz, data) == f"HTTP {status}"


def test_fuzz_seeds_include_allows() -> None:
    statuses = [expected_status(seed) for seed in SEEDS]

    assert statuses == [200, 200, 200, 403, 405, 401, 401]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xff\xff", id="bad-tag"),
        pytest.param(SERIALIZED_SEEDS[0][:-5], id="truncated-field"),
        pytest.param(
            SERIALIZED_SEEDS[0].replace(b"/v1/ai/chat", b"/v1/ai/cha\xff", 1),
            id="invalid-utf8-path",
        ),
    ],
)
def test_fuzz_undecodable_bytes_fail_rpc(authz: Authz, data: bytes) -> None:
    # The server cannot parse these, so gRPC fails the call before Check runs.
    # Envoy (failure_mode_allow: false) returns its own 503 for such a failure.
    with pytest.raises(DecodeError):
        auth_pb2.CheckRequest.FromString(data)

    with pytest.raises(grpc.RpcError) as failure:
        authz.server.check_bytes(data, timeout=RPC_TIMEOUT_SECONDS)

    assert failure.value.code() != grpc.StatusCode.OK
    # gRPC's own log of the parse failure is expected here, so it is dropped.
    authz.logs.drain()
    response = authz.server.check_bytes(SERIALIZED_SEEDS[0], timeout=10)
    assert assert_well_formed(response) == 200
