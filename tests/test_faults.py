"""Fail closed under faults: Redis killed, frozen or slow, and the sidecar down.

The Redis tests run a real ``hasp-authz serve`` process against a
redis-server of the test's own and send Checks over gRPC. A key that hasp-authz
cannot verify must get the 503 AUTH_UNAVAILABLE deny (retryable, with
Retry-After) within the check budget, never 200, 401 or 402. Within 2 s after
Redis is back, the same process must decide correctly again.

The cross-talk tests cancel Redis calls in the middle of a reply, many at a
time, and check that no Check ever gets the reply meant for another key.

The sidecar tests run the whole local stack (hasp_authz.dev.stack) and send
HTTP through the real Envoy while hasp-authz is killed or hung.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from fault_helpers import (
    ANSWER_LIMIT_SECONDS,
    RECOVERY_SECONDS,
    assert_auth_unavailable,
    freeze,
    kill,
    redis_stalls,
    thaw,
    timed_check,
    wait_for_status,
    write_key,
)
from hasp_authz.config import Settings
from hasp_authz.dev.stack import LocalStack, StackPorts
from hasp_authz.proto import envoy_service_auth_v3_pb2 as auth_pb2
from hasp_authz.proto import envoy_service_auth_v3_pb2_grpc as auth_grpc
from hasp_authz.records import RedisLayout, key_changed_message
from hasp_authz.server import build_redis_client
from hasp_authz.store import CopyUnavailable, RedisKeyCopy, RedisUnavailable
from hasp_authz.tokens import generate_token, hash_token
from test_servicer import (
    SUBSCRIBED_LOG,
    check_request,
    http_status,
    mark_complete,
    seed_key,
    wait_for_log,
)


def bearer(token: str) -> auth_pb2.CheckRequest:
    return check_request(headers=[("authorization", f"Bearer {token}")])


class Keys:
    """Keys in a private Redis: one checked once (so cached), one never checked."""

    def __init__(self, client: redis.Redis, layout: RedisLayout):
        self.client = client
        self.layout = layout
        self.cached = seed_key(client, layout)
        self.uncached = seed_key(client, layout)
        self.unknown = generate_token()
        mark_complete(client, layout)

    def rewrite(self) -> None:
        """Write every record and the marker again, as the sync does after a restart."""
        for key in (self.cached, self.uncached):
            write_key(self.client, self.layout, key)
        mark_complete(self.client, self.layout)

    def requests(self) -> dict[str, auth_pb2.CheckRequest]:
        return {
            "cached": bearer(self.cached.token),
            "uncached": bearer(self.uncached.token),
            "unknown": bearer(self.unknown),
        }


def start_on_private_redis(start_server, private_redis, keys: Keys, *extra: str):
    """Start hasp-authz, wait for its subscription and cache the ``cached`` key."""
    server = start_server(redis_url=private_redis.url, extra_args=list(extra))
    wait_for_log(server, SUBSCRIBED_LOG)
    assert http_status(server.check(bearer(keys.cached.token))) == 200
    return server


def assert_every_check_fails_closed(server, keys: Keys, rounds: int = 3) -> None:
    for _ in range(rounds):
        for name, request in keys.requests().items():
            response, elapsed = timed_check(server, request)
            assert_auth_unavailable(response)
            assert elapsed < ANSWER_LIMIT_SECONDS, f"{name}: {elapsed:.3f} s"


# --- Redis faults, against the real process ---


def test_check_fails_closed_when_redis_killed(
    start_server, private_redis, private_client, layout
):
    keys = Keys(private_client, layout)
    server = start_on_private_redis(start_server, private_redis, keys)
    pid = server.process.pid

    kill(private_redis)
    assert_every_check_fails_closed(server, keys)

    # Restarted empty: the completeness marker is missing, so still 503, not 401.
    private_redis.start()
    assert_every_check_fails_closed(server, keys)

    keys.rewrite()
    elapsed = wait_for_status(server, bearer(keys.cached.token), 200, RECOVERY_SECONDS)
    assert elapsed < RECOVERY_SECONDS
    assert http_status(server.check(bearer(keys.uncached.token))) == 200
    assert http_status(server.check(bearer(keys.unknown))) == 401
    assert server.process.poll() is None
    assert server.process.pid == pid


def test_check_fails_closed_when_redis_frozen(
    start_server, private_redis, private_client, layout
):
    keys = Keys(private_client, layout)
    server = start_on_private_redis(start_server, private_redis, keys)

    freeze(private_redis)
    try:
        # The first Redis timeout also takes the cached key out of service.
        response, elapsed = timed_check(server, bearer(keys.uncached.token))
        assert_auth_unavailable(response)
        assert elapsed < ANSWER_LIMIT_SECONDS
        assert_every_check_fails_closed(server, keys)
    finally:
        thaw(private_redis)

    elapsed = wait_for_status(server, bearer(keys.cached.token), 200, RECOVERY_SECONDS)
    assert elapsed < RECOVERY_SECONDS
    assert http_status(server.check(bearer(keys.uncached.token))) == 200
    assert http_status(server.check(bearer(keys.unknown))) == 401


def test_cached_key_fails_closed_within_1s_of_freeze(
    start_server, private_redis, private_client, layout
):
    # Only cached traffic: no Check reaches Redis, so only the subscriber's
    # keepalive (a PING after 0.5 s of silence, lost after 0.5 s more) can tell.
    keys = Keys(private_client, layout)
    server = start_on_private_redis(start_server, private_redis, keys)
    request = bearer(keys.cached.token)

    freeze(private_redis)
    frozen_at = time.monotonic()
    try:
        statuses = []
        while not statuses or statuses[-1] != 503:
            response, elapsed = timed_check(server, request)
            statuses.append(http_status(response))
            assert elapsed < ANSWER_LIMIT_SECONDS
            assert time.monotonic() - frozen_at < 3.0, f"statuses {set(statuses)}"
            time.sleep(0.02)
        cut_off_after = time.monotonic() - frozen_at
        for _ in range(5):
            assert_auth_unavailable(server.check(request))
    finally:
        thaw(private_redis)

    assert set(statuses) <= {200, 503}
    # 1 s by the keepalive, plus room for a slow test machine.
    assert cut_off_after < 1.6
    assert wait_for_status(server, request, 200, RECOVERY_SECONDS) < RECOVERY_SECONDS


def test_redis_failure_takes_cache_out_of_service(
    start_server, private_redis, private_client, layout
):
    keys = Keys(private_client, layout)
    server = start_on_private_redis(start_server, private_redis, keys)

    # A Redis call that times out (a 0.3 s pause against the 0.1 s Redis
    # timeout) while Redis itself stays up.
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("CLIENT", "PAUSE", "300", "ALL")
    response = server.check(bearer(keys.uncached.token))
    cached = server.check(bearer(keys.cached.token))
    admin.close()

    assert_auth_unavailable(response)
    assert_auth_unavailable(cached)
    wait_for_log(server, "a Check's Redis call failed; subscribing again")
    wait_for_log(server, "subscription restored")
    assert http_status(server.check(bearer(keys.cached.token))) == 200


@pytest.mark.parametrize(
    ("seconds", "error"),
    [(0.02, CopyUnavailable), (0.3, RedisUnavailable)],
    ids=["late-check", "full-budget"],
)
def test_deadline_counts_as_redis_failure_only_with_full_budget(
    private_redis, private_client, layout, seconds, error
):
    # A deadline shorter than one Redis timeout (0.1 s) runs out without
    # showing that Redis failed, so it must not take the cache out of service.
    key = seed_key(private_client, layout)
    mark_complete(private_client, layout)

    async def lookup() -> None:
        client = build_redis_client(Settings(redis_url=private_redis.url))
        copy = RedisKeyCopy(client, layout, redis_timeout_seconds=0.1)
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            await copy.lookup(hash_token(key.token), deadline)
        finally:
            await client.aclose()

    freeze(private_redis)
    try:
        with pytest.raises(CopyUnavailable) as caught:
            asyncio.run(lookup())
    finally:
        thaw(private_redis)

    assert type(caught.value) is error


# --- stale-if-error ---


def test_stale_if_error_allows_recent_key(
    start_server, private_redis, private_client, layout
):
    keys = Keys(private_client, layout)
    server = start_on_private_redis(
        start_server, private_redis, keys, "--stale-if-error-seconds", "30"
    )

    kill(private_redis)
    statuses = [http_status(server.check(bearer(keys.cached.token))) for _ in range(3)]
    uncached = server.check(bearer(keys.uncached.token))
    unknown = server.check(bearer(keys.unknown))

    assert statuses == [200, 200, 200]
    assert_auth_unavailable(uncached)
    assert_auth_unavailable(unknown)
    assert server.log().count("deciding keys verified within") == 1


def test_stale_if_error_window_ends(
    start_server, private_redis, private_client, layout
):
    keys = Keys(private_client, layout)
    server = start_on_private_redis(
        start_server, private_redis, keys, "--stale-if-error-seconds", "1"
    )
    request = bearer(keys.cached.token)
    # The cache hit counts as a verification, as a read from Redis would.
    verified_after = time.monotonic()
    assert http_status(server.check(request)) == 200
    verified_before = time.monotonic()

    kill(private_redis)
    assert http_status(server.check(request)) == 200
    wait_for_status(server, request, 503, within=3.0)
    refused_at = time.monotonic()

    assert refused_at - verified_after >= 1.0
    assert refused_at - verified_before < 1.5
    assert_auth_unavailable(server.check(request))


def test_stale_if_error_skips_revoked_key(
    start_server, private_redis, private_client, layout
):
    keys = Keys(private_client, layout)
    server = start_on_private_redis(
        start_server, private_redis, keys, "--stale-if-error-seconds", "30"
    )
    key_hash = hash_token(keys.cached.token)
    private_client.delete(layout.key(key_hash))
    private_client.publish(layout.changes_channel, key_changed_message(key_hash))
    wait_for_status(server, bearer(keys.cached.token), 401, within=1.0)

    kill(private_redis)

    assert_auth_unavailable(server.check(bearer(keys.cached.token)))


# --- no cross-talk when Redis calls are cancelled mid-reply ---


def seed_many(client: redis.Redis, layout: RedisLayout, count: int) -> dict[str, str]:
    """Seed ``count`` keys, each in an org of its own; return token -> key id."""
    keys = {}
    for _ in range(count):
        key = seed_key(client, layout)
        keys[key.token] = key.record.key_id
    mark_complete(client, layout)
    return keys


def test_cancelled_lookup_never_reads_other_reply(
    private_redis, private_client, layout
):
    # The production client, with a small pool and Redis timeouts far above the
    # deadlines, so the deadline cancels reads in flight. A reply read by the
    # wrong lookup shows as a wrong key id or as a CopyUnavailable for a
    # malformed record, which raises through.
    keys = seed_many(private_client, layout, 32)
    settings = Settings(
        redis_url=private_redis.url,
        redis_max_connections=4,
        redis_timeout_ms=2000,
        check_budget_ms=3000,
    )
    tokens = list(keys)
    outcomes = {"matched": 0, "unavailable": 0}

    async def one_lookup(copy: RedisKeyCopy, token: str, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            found = await copy.lookup(hash_token(token), deadline)
        except RedisUnavailable:
            outcomes["unavailable"] += 1
            return
        # Any other CopyUnavailable (a malformed record, a missing marker or
        # org) raises through: here it can only come from a reply read by the
        # wrong request.
        assert found is not None
        assert found[0].key_id == keys[token]
        assert found[1].org_id == found[0].org_id
        outcomes["matched"] += 1

    async def main() -> None:
        client = build_redis_client(settings)
        copy = RedisKeyCopy(client, layout)
        try:
            for _ in range(30):
                await asyncio.gather(
                    *(
                        one_lookup(copy, token, random.uniform(0.001, 0.04))
                        for token in random.sample(tokens, len(tokens))
                    )
                )
            # Every pooled connection must still be in step with its replies.
            for token in tokens:
                await one_lookup(copy, token, 5.0)
        finally:
            await client.aclose()

    with redis_stalls(private_redis.url, stall_ms=20, gap_seconds=0.01):
        asyncio.run(main())

    assert outcomes["unavailable"] > 0
    assert outcomes["matched"] > len(tokens)


def test_cancelled_checks_never_get_other_identity(
    start_server, private_redis, private_client, layout
):
    # No cache, a small pool and a Redis that stalls for 20 ms every 30 ms.
    # Redis timeouts far above the stalls leave the end of each Check to its
    # deadline, which the caller's short RPC deadline sets, so many Checks end
    # in the middle of a reply. A reply read by the wrong Check shows as a
    # wrong identity or as a malformed record in the log.
    keys = seed_many(private_client, layout, 32)
    server = start_server(
        redis_url=private_redis.url,
        extra_args=[
            "--cache-size", "0",
            "--redis-max-connections", "8",
            "--check-budget-ms", "2000",
            "--redis-timeout-ms", "1500",
        ],
    )  # fmt: skip
    tokens = list(keys)
    outcomes = {"matched": 0, "unavailable": 0, "cancelled": 0}

    async def one_check(stub, token: str) -> None:
        try:
            response = await stub.Check(
                bearer(token), timeout=random.uniform(0.01, 0.3)
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            outcomes["cancelled"] += 1
            return
        status = http_status(response)
        if status == 503:
            assert_auth_unavailable(response)
            outcomes["unavailable"] += 1
            return
        assert status == 200, response
        identity = {h.header.key: h.header.value for h in response.ok_response.headers}
        assert identity["x-hasp-key-id"] == keys[token]
        outcomes["matched"] += 1

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_grpc.AuthorizationStub(channel)
            for _ in range(12):
                await asyncio.gather(*(one_check(stub, token) for token in tokens))

    with redis_stalls(private_redis.url, stall_ms=20, gap_seconds=0.01):
        asyncio.run(main())

    assert outcomes["matched"] > 0, outcomes
    assert outcomes["unavailable"] + outcomes["cancelled"] > 0, outcomes
    # A 503 for a reply read by the wrong request shows only in the log.
    for symptom in ("malformed", "marker is missing", "not found"):
        assert symptom not in server.log()
    # Afterwards every key still gets its own identity.
    for token, key_id in keys.items():
        response = server.check(bearer(token))
        assert http_status(response) == 200
        headers = {h.header.key: h.header.value for h in response.ok_response.headers}
        assert headers["x-hasp-key-id"] == key_id


# --- the sidecar itself killed or hung, seen through the real Envoy ---


class EnvoyClient:
    def __init__(self, stack: LocalStack, token: str):
        self.stack = stack
        self.token = token

    def post_chat(self) -> tuple[int, http.client.HTTPMessage, bytes, float]:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.stack.ports.envoy, timeout=10
        )
        started = time.monotonic()
        try:
            connection.request(
                "POST",
                "/v1/ai/chat",
                body=b"{}",
                headers={"Authorization": f"Bearer {self.token}"},
            )
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return response.status, response.headers, body, time.monotonic() - started


def assert_envoy_json_503(headers: http.client.HTTPMessage, body: bytes) -> None:
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "1"
    assert "www-authenticate" not in headers
    error = json.loads(body)["error"]
    assert error["code"] == "AUTH_UNAVAILABLE"
    assert error["retryable"] is True
    assert error["request_id"] == "req_" + headers["x-request-id"]


@pytest.fixture(scope="module")
def sidecar_stack(tmp_path_factory) -> Iterator[EnvoyClient]:
    workdir: Path = tmp_path_factory.mktemp("faults-stack")
    stack = LocalStack(
        workdir=workdir,
        keystore_url=f"sqlite:///{workdir}/keystore.db",
        ports=StackPorts.free(),
        redis_prefix=f"hasp-faults-{uuid.uuid4().hex[:12]}:",
    )
    stack.start()
    try:
        stack.hasp_keys("orgs", "create", "acme", "--baa")
        created = json.loads(
            stack.hasp_keys(
                "create", "--org", "acme", "--name", "faults", "--scope", "ai:chat",
                "--json",
            )
        )  # fmt: skip
        client = EnvoyClient(stack, created["token"])
        deadline = time.monotonic() + 5
        while client.post_chat()[0] != 200:
            assert time.monotonic() < deadline, "the new key never reached Envoy"
            time.sleep(0.05)
        yield client
    finally:
        stack.stop()


def wait_for_envoy_200(client: EnvoyClient, within: float) -> float:
    started = time.monotonic()
    while client.post_chat()[0] != 200:
        assert time.monotonic() - started < within, f"no 200 within {within} s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.e2e
def test_envoy_fails_closed_when_authz_killed(sidecar_stack):
    sidecar_stack.stack.signal_authz(signal.SIGKILL)
    authz = sidecar_stack.stack.processes["hasp-authz"]
    assert authz.process is not None
    authz.process.wait(timeout=5)
    try:
        for _ in range(3):
            status, headers, body, elapsed = sidecar_stack.post_chat()
            assert status == 503, body
            assert_envoy_json_503(headers, body)
            # Nothing listens, so Envoy's connect fails at once.
            assert elapsed < ANSWER_LIMIT_SECONDS
    finally:
        sidecar_stack.stack.start_authz()

    wait_for_envoy_200(sidecar_stack, within=5.0)


@pytest.mark.e2e
def test_envoy_fails_closed_when_authz_hangs(sidecar_stack):
    sidecar_stack.stack.signal_authz(signal.SIGSTOP)
    try:
        for _ in range(3):
            status, headers, body, elapsed = sidecar_stack.post_chat()
            assert status == 503, body
            assert_envoy_json_503(headers, body)
            # Envoy's ext_authz timeout is 0.5 s.
            assert 0.45 <= elapsed < 1.5
    finally:
        sidecar_stack.stack.signal_authz(signal.SIGCONT)

    assert wait_for_envoy_200(sidecar_stack, within=RECOVERY_SECONDS) < RECOVERY_SECONDS
