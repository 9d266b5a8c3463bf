"""No API key token or token hash leaks into logs, responses or CLI output.

One module-scoped flow runs the local stack (Redis, hasp-authz at DEBUG, the
demo upstream and the real Envoy) with its own key store, Redis and ports. It
creates, lists, revokes and syncs keys with the real ``hasp-keys``, with and
without ``--json``. Through Envoy it sends a request for every decision: a
revoked key, malformed and duplicate Authorization values, spoofed headers,
a token in the query string and a request while the sidecar is down. The
tests then search every sink for each token created, its 32-character body,
its SHA-256 hex and that hex's first 16 characters, case-insensitively. The
sinks are every ``*.log`` under the stack's folder (Envoy's access log
included), every response status line, header and body, the stdout of
``hasp-keys`` except ``create``'s token, its stderr, and hasp-authz's
``/metrics`` page, read before the sidecar stops and at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from hasp_authz.dev.stack import BIN_DIR, LocalStack, StackPorts
from hasp_authz.records import RedisLayout
from hasp_authz.tokens import TOKEN_PREFIX, generate_token, hash_token
from test_e2e import Stack

pytestmark = pytest.mark.e2e

ALL_SCOPES = (
    "ai:chat",
    "ai:documents",
    "ai:embeddings",
    "ai:summarize",
    "control:read",
    "control:webhooks",
)
# Seconds to wait for a revocation to reach the server. test_e2e.py checks the
# 1 s target, so this limit only keeps the flow from waiting forever.
REVOCATION_LIMIT_SECONDS = 3.0


@dataclass
class CliRun:
    arguments: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    # The token that a `create` run printed, else None.
    token: str | None = None


@dataclass
class Exchange:
    """One request through Envoy and its response, as the client saw it."""

    label: str
    expected: int
    status: int
    head: str
    body: bytes


@dataclass
class Flow:
    stack: LocalStack
    # Tokens that hasp-keys created, by key name.
    created: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)
    # Key-like values the client sent that were never created.
    sent_only: dict[str, str] = field(default_factory=dict)
    cli_runs: list[CliRun] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    # hasp-authz's /metrics pages, each read while the same process ran.
    metrics_pages: list[str] = field(default_factory=list)

    def read_metrics(self) -> None:
        url = f"{self.stack.metrics_url}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            self.metrics_pages.append(response.read().decode())

    def keys(self, *arguments: str, expect: int = 0) -> CliRun:
        """Run hasp-keys against the stack and record its output."""
        result = subprocess.run(
            [str(BIN_DIR / "hasp-keys"), *arguments],
            env={**os.environ, **self.stack.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        run = CliRun(arguments, result.returncode, result.stdout, result.stderr)
        self.cli_runs.append(run)
        assert result.returncode == expect, (
            f"hasp-keys {' '.join(arguments)} exited with {result.returncode}, "
            f"expected {expect}; stderr: {result.stderr}"
        )
        return run

    def create(
        self,
        name: str,
        org: str,
        scopes: tuple[str, ...],
        *options: str,
        json_output: bool = False,
        expect: int = 0,
    ) -> str:
        arguments = ["create", "--org", org, "--name", name, *options]
        for scope in scopes:
            arguments += ["--scope", scope]
        if json_output:
            arguments.append("--json")
        run = self.keys(*arguments, expect=expect)
        if json_output:
            created = json.loads(run.stdout)
            run.token = created["token"]
            self.key_ids[name] = created["key_id"]
        else:
            run.token = run.stdout.strip()
        self.created[name] = run.token
        return run.token

    def send(
        self,
        label: str,
        expected: int,
        method: str,
        path: str,
        headers: list[tuple[str, str]] = (),
        token: str | None = None,
    ) -> Exchange:
        """Send one request to Envoy. A repeated header name becomes repeated lines."""
        response = Stack(self.stack, {}, {}).request(method, path, headers, token)
        head = f"HTTP {response.status}\n{response.headers}"
        exchange = Exchange(label, expected, response.status, head, response.body)
        self.exchanges.append(exchange)
        return exchange

    def send_until(self, label: str, expected: int, token: str) -> Exchange:
        """Send POST /v1/ai/chat until it returns ``expected`` or time runs out."""
        deadline = time.monotonic() + REVOCATION_LIMIT_SECONDS
        while True:
            exchange = self.send(label, expected, "POST", "/v1/ai/chat", token=token)
            if exchange.status == expected or time.monotonic() > deadline:
                return exchange
            time.sleep(0.05)

    def secrets(self) -> dict[str, str]:
        return secret_forms(self.created, self.sent_only)


def secret_forms(created: dict[str, str], sent_only: dict[str, str]) -> dict[str, str]:
    """Return label -> text that must appear in no sink.

    For each created token: the token, its body after the prefix, its SHA-256
    hex and the first 16 characters of that hex. For each value that was only
    sent: the value and its SHA-256 hex.
    """
    forms = {}
    for name, token in created.items():
        key_hash = hash_token(token)
        forms[f"token of key {name}"] = token
        forms[f"token body of key {name}"] = token.removeprefix(TOKEN_PREFIX)
        forms[f"SHA-256 of key {name}"] = key_hash
        forms[f"SHA-256 prefix of key {name}"] = key_hash[:16]
    for label, value in sent_only.items():
        forms[label] = value
        forms[f"SHA-256 of {label}"] = hash_token(value)
    return forms


def secrets_in(text: str | bytes, secrets: dict[str, str]) -> list[str]:
    """Return the labels of the secrets that ``text`` contains, in any case."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    lowered = text.lower()
    return [label for label, secret in secrets.items() if secret.lower() in lowered]


def run_flow(flow: Flow) -> None:
    """Create keys, send one request per decision and manage keys meanwhile."""
    keys, create, send = flow.keys, flow.create, flow.send
    keys("orgs", "create", "acme", "--name", "Acme Health", "--baa")
    keys("orgs", "create", "nobaa")
    keys("orgs", "list")
    keys("orgs", "list", "--json")
    chat = create("chat", "acme", ("ai:chat",))
    every = create("every", "acme", ALL_SCOPES, json_output=True)
    nobaa = create("nobaa", "nobaa", ("ai:chat",), json_output=True)
    doomed = create("doomed", "acme", ("ai:chat",), json_output=True)
    fresh = create("fresh", "acme", ("ai:chat",))
    # Redis unreachable (no socket at this path): the store keeps the key, the
    # command exits with 3 and warns on stderr, and the sync below repairs it.
    unreachable = f"unix://{flow.stack.workdir}/no-redis.sock"
    stale = create("stale", "acme", ("ai:chat",), "--redis-url", unreachable, expect=3)
    keys("list")
    keys("list", "--json")
    keys("list", "--org", "acme", "--json")
    keys("sync")

    unknown = generate_token()
    flow.sent_only["unknown token"] = unknown
    send("allow", 200, "POST", "/v1/ai/chat", token=chat)
    send(
        "allow, lower-case scheme",
        200,
        "POST",
        "/v1/ai/chat",
        [("Authorization", f"bearer {chat}")],
    )
    send(
        "allow, spoofed identity",
        200,
        "POST",
        "/v1/ai/chat",
        [
            ("X-Hasp-Org-Id", "evil"),
            ("X-Hasp-Key-Id", "key_evil"),
            ("X-Hasp-Scopes", "control:read"),
        ],
        token=chat,
    )
    send("allow, key synced after exit 3", 200, "POST", "/v1/ai/chat", token=stale)
    send("missing key", 401, "POST", "/v1/ai/chat")
    send("malformed key, lower case", 401, "POST", "/v1/ai/chat", token=chat.lower())
    send("malformed key, cut short", 401, "POST", "/v1/ai/chat", token=chat[:-3])
    send("unknown key", 401, "POST", "/v1/ai/chat", token=unknown)
    send(
        "duplicate Authorization",
        401,
        "POST",
        "/v1/ai/chat",
        [("Authorization", f"Bearer {chat}"), ("Authorization", f"Bearer {every}")],
    )
    send(
        "token split over two headers",
        401,
        "POST",
        "/v1/ai/chat",
        [("Authorization", f"Bearer {chat[:24]}"), ("Authorization", chat[24:])],
    )
    send("token as x-request-id", 401, "POST", "/v1/ai/chat", [("X-Request-Id", chat)])
    send("token in query string", 401, "POST", f"/v1/ai/chat?api_key={chat}")
    send("org without BAA", 402, "POST", "/v1/ai/chat", token=nobaa)
    send("unknown route", 404, "GET", "/v1/nowhere", token=every)
    send("method not allowed", 405, "DELETE", "/v1/usage/budget", token=every)
    send("missing scope", 403, "GET", "/v1/usage", token=chat)
    send("spoofed scopes header", 403, "GET", "/v1/usage",
         [("X-Hasp-Scopes", "control:read")], token=chat)  # fmt: skip

    # A key never looked up before, so no in-process cache can return it
    # without reading Redis.
    client = redis.Redis.from_url(flow.stack.redis_url)
    try:
        client.delete(RedisLayout(flow.stack.redis_prefix).complete_marker)
        send("copy incomplete", 503, "POST", "/v1/ai/chat", token=fresh)
    finally:
        client.close()
        keys("sync")

    send("before revocation", 200, "POST", "/v1/ai/chat", token=doomed)
    keys("revoke", flow.key_ids["doomed"])
    flow.send_until("revoked key", 401, doomed)
    keys("revoke", flow.key_ids["doomed"])
    # A token passed where a key id belongs, a likely slip.
    keys("revoke", chat, expect=1)

    send("public route, key sent", 200, "GET", "/v1/status", token=chat)

    flow.read_metrics()
    flow.stack.stop_authz()
    try:
        send("sidecar down", 503, "POST", "/v1/ai/chat", token=chat)
    finally:
        flow.stack.start_authz()
    send("sidecar back", 200, "POST", "/v1/ai/chat", token=chat)
    keys("list")
    keys("list", "--json")
    flow.read_metrics()


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    """Run the flow on a stack of its own, then stop it so every log is flushed."""
    workdir: Path = tmp_path_factory.mktemp("secrets-stack")
    stack = LocalStack(
        workdir=workdir,
        keystore_url=f"sqlite:///{workdir}/keystore.db",
        ports=StackPorts.free(),
        log_level="DEBUG",
    )
    stack.start()
    flow = Flow(stack)
    try:
        run_flow(flow)
    finally:
        stack.stop()
    yield flow


@pytest.mark.parametrize(
    ("form", "label"),
    [
        (str.lower, "token of key k"),
        (lambda token: token.removeprefix(TOKEN_PREFIX), "token body of key k"),
        (lambda token: f"hasp:key:{hash_token(token)}", "SHA-256 of key k"),
        (lambda token: hash_token(token).upper(), "SHA-256 of key k"),
        (lambda token: f"hash={hash_token(token)[:16]}...", "SHA-256 prefix of key k"),
    ],
)
def test_secret_search_finds_each_form(form, label: str) -> None:
    token = generate_token()
    secrets = secret_forms({"k": token}, {})

    assert label in secrets_in(f"log line with {form(token)} inside", secrets)
    assert secrets_in("log line with key_id=key_abc inside", secrets) == []


def test_flow_reaches_every_decision(flow: Flow) -> None:
    wrong = [
        f"{exchange.label}: expected {exchange.expected}, got {exchange.status}"
        for exchange in flow.exchanges
        if exchange.status != exchange.expected
    ]

    assert wrong == []
    assert {exchange.status for exchange in flow.exchanges} == {
        200, 401, 402, 403, 404, 405, 503,
    }  # fmt: skip


def test_process_logs_contain_no_secret(flow: Flow) -> None:
    logs = sorted(flow.stack.workdir.glob("**/*.log"))
    names = {path.name for path in logs}
    authz_log = (flow.stack.workdir / "hasp-authz.log").read_text()

    assert {"hasp-authz.log", "envoy.log", "upstream.log"} <= names
    # The server logged at DEBUG, allow lines included.
    assert "DEBUG" in authz_log
    assert "allow request_id=" in authz_log
    for path in logs:
        text = path.read_text(errors="replace")
        assert secrets_in(text, flow.secrets()) == [], path.name


def test_responses_contain_no_secret(flow: Flow) -> None:
    secrets = flow.secrets()
    for exchange in flow.exchanges:
        assert secrets_in(exchange.head, secrets) == [], exchange.label
        assert secrets_in(exchange.body, secrets) == [], exchange.label


def test_create_prints_only_its_token(flow: Flow) -> None:
    creates = [run for run in flow.cli_runs if run.arguments[0] == "create"]
    secrets = flow.secrets()

    assert len(creates) == len(flow.created)
    for run in creates:
        if "--json" in run.arguments:
            created = json.loads(run.stdout)
            assert created.pop("token") == run.token
            assert run.stdout.count(run.token) == 1
            assert secrets_in(json.dumps(created), secrets) == [], run.arguments
        else:
            assert run.stdout == f"{run.token}\n"


def test_other_commands_print_no_secret(flow: Flow) -> None:
    others = [run for run in flow.cli_runs if run.arguments[0] != "create"]

    assert {run.arguments[0] for run in others} >= {"orgs", "list", "revoke", "sync"}
    for run in others:
        assert secrets_in(run.stdout, flow.secrets()) == [], run.arguments


def test_cli_stderr_contains_no_secret(flow: Flow) -> None:
    warned = [run for run in flow.cli_runs if run.returncode != 0]

    # The exit-3 create and the revoke of a token both wrote to stderr.
    assert [run.returncode for run in warned] == [3, 1]
    assert all(run.stderr for run in warned)
    for run in flow.cli_runs:
        assert secrets_in(run.stderr, flow.secrets()) == [], run.arguments


def test_envoy_access_log_contains_no_secret(flow: Flow) -> None:
    lines = (flow.stack.workdir / "envoy.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    by_id = {entry["request_id"]: entry for entry in entries}

    # Every request has its line, so the search below covers them all.
    assert len(entries) >= len(flow.exchanges)
    assert "api_key" not in json.dumps(entries)
    allowed = [entry for entry in entries if entry["status"] == 200]
    keyed = [entry for entry in allowed if entry["policy"] != "public"]
    assert keyed
    assert all(entry["key_id"].startswith("key_") for entry in keyed)
    # A public route is allowed without reading the key.
    public = [entry for entry in allowed if entry["policy"] == "public"]
    assert [entry["key_id"] for entry in public] == [None]
    assert len(by_id) == len(entries)
    for entry in entries:
        assert secrets_in(json.dumps(entry), flow.secrets()) == [], entry


def test_metrics_contain_no_secret(flow: Flow) -> None:
    assert len(flow.metrics_pages) == 2
    # The page counts the flow's decisions, so the search below covers them.
    assert 'hasp_authz_decisions_total{code="MISSING_SCOPE"' in flow.metrics_pages[0]
    assert 'route="public"' in flow.metrics_pages[0]
    for page in flow.metrics_pages:
        assert secrets_in(page, flow.secrets()) == []
