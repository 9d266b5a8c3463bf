"""The one HTTP request shape that every HTTP load of the benchmark sends.

A chat call as an API client would make it: POST /v1/ai/chat with a JSON body,
the API key and a few everyday headers. wrk's Lua script and the open-loop
generator are both rendered from these values.
"""

from __future__ import annotations

METHOD = "POST"
PATH = "/v1/ai/chat"
BODY = '{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
# Client headers besides Host, Authorization and Content-Length. They matter
# when Envoy sends every header to the sidecar (no allowed_headers).
HEADERS = (
    ("Content-Type", "application/json"),
    ("Accept", "application/json"),
    ("Accept-Encoding", "gzip, deflate"),
    ("User-Agent", "hasp-bench/1.0"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def raw_request(host: str, authorization: str) -> bytes:
    """Return the HTTP/1.1 request bytes for one Authorization value."""
    body = BODY.encode()
    lines = [
        f"{METHOD} {PATH} HTTP/1.1",
        f"Host: {host}",
        f"Authorization: {authorization}",
        *(f"{name}: {value}" for name, value in HEADERS),
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
