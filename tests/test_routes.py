"""Tests for hasp_authz.routes: default table, canonical paths, route files."""

from __future__ import annotations

from pathlib import Path

import pytest

from hasp_authz.routes import (
    DEFAULT_ROUTES_FILE,
    HTTP_METHODS,
    RouteFileError,
    RouteTable,
    load_route_table,
    parse_route_table,
    split_canonical_path,
)

# The documented scope table: (method, path template, scope).
DOCUMENTED_ROUTES = [
    ("POST", "/v1/ai/chat", "ai:chat"),
    ("POST", "/v1/messages", "ai:chat"),
    ("POST", "/v1/ai/documents", "ai:documents"),
    ("GET", "/v1/ai/documents", "ai:documents"),
    ("GET", "/v1/ai/documents/{id}", "ai:documents"),
    ("POST", "/v1/ai/embeddings", "ai:embeddings"),
    ("POST", "/v1/ai/summarize", "ai:summarize"),
    ("GET", "/v1/api_keys", "control:read"),
    ("POST", "/v1/api_keys", "control:read"),
    ("GET", "/v1/usage", "control:read"),
    ("GET", "/v1/usage/budget", "control:read"),
    ("PUT", "/v1/usage/budget", "control:read"),
    ("GET", "/v1/audit", "control:read"),
    ("GET", "/v1/webhooks", "control:webhooks"),
    ("POST", "/v1/webhooks", "control:webhooks"),
    ("DELETE", "/v1/webhooks/{id}", "control:webhooks"),
]
# A concrete request path for each template.
EXAMPLE_PATHS = {
    "/v1/ai/documents/{id}": "/v1/ai/documents/doc_01HZX",
    "/v1/webhooks/{id}": "/v1/webhooks/wh_42",
}
METHODS_WITHOUT_HEAD = sorted(HTTP_METHODS - {"HEAD"})


def example_path(template: str) -> str:
    return EXAMPLE_PATHS.get(template, template)


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return load_route_table()


def write_route_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_route_file_is_packaged():
    assert DEFAULT_ROUTES_FILE.name == "routes.yaml"
    assert DEFAULT_ROUTES_FILE.is_file()


def test_default_table_has_exactly_documented_routes(table):
    listed = {
        (method, route.template, route.scope)
        for route in table.routes
        for method in route.methods
    }

    assert listed == set(DOCUMENTED_ROUTES)


@pytest.mark.parametrize(("method", "template", "scope"), DOCUMENTED_ROUTES)
def test_default_table_matches_documented_route(table, method, template, scope):
    match = table.match(method, example_path(template))

    assert match is not None
    assert match.route.template == template
    assert match.route.scope == scope
    assert match.method_allowed


@pytest.mark.parametrize(("method", "template", "scope"), DOCUMENTED_ROUTES)
def test_default_table_ignores_query_string(table, method, template, scope):
    match = table.match(method, example_path(template) + "?limit=10&x=/../a%2F")

    assert match is not None
    assert match.route.template == template
    assert match.method_allowed


@pytest.mark.parametrize(
    "template", sorted({template for _, template, _ in DOCUMENTED_ROUTES})
)
def test_default_table_rejects_unlisted_methods(table, template):
    listed = {method for method, other, _ in DOCUMENTED_ROUTES if other == template}

    for method in METHODS_WITHOUT_HEAD:
        match = table.match(method, example_path(template))
        assert match is not None, method
        assert match.route.template == template
        assert match.method_allowed == (method in listed), method


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/ai/documents", True),
        ("/v1/ai/documents/doc_1", True),
        ("/v1/usage", True),
        ("/v1/usage/budget", True),
        ("/v1/audit", True),
        ("/v1/api_keys", True),
        ("/v1/webhooks", True),
        ("/v1/ai/chat", False),
        ("/v1/messages", False),
        ("/v1/ai/embeddings", False),
        ("/v1/ai/summarize", False),
        ("/v1/webhooks/wh_1", False),
    ],
)
def test_match_checks_head_as_get(table, path, allowed):
    match = table.match("HEAD", path)

    assert match is not None
    assert match.method_allowed == allowed


@pytest.mark.parametrize(
    ("template", "allow"),
    [
        ("/v1/ai/chat", "POST"),
        ("/v1/messages", "POST"),
        ("/v1/ai/documents", "GET, HEAD, POST"),
        ("/v1/ai/documents/{id}", "GET, HEAD"),
        ("/v1/ai/embeddings", "POST"),
        ("/v1/ai/summarize", "POST"),
        ("/v1/api_keys", "GET, HEAD, POST"),
        ("/v1/usage", "GET, HEAD"),
        ("/v1/usage/budget", "GET, HEAD, PUT"),
        ("/v1/audit", "GET, HEAD"),
        ("/v1/webhooks", "GET, HEAD, POST"),
        ("/v1/webhooks/{id}", "DELETE"),
    ],
)
def test_route_allow_header(table, template, allow):
    match = table.match("PATCH", example_path(template))

    assert match is not None
    assert match.route.allow_header == allow


@pytest.mark.parametrize("method", ["get", "Post", "", "BREW"])
def test_match_treats_methods_case_sensitively(table, method):
    match = table.match(method, "/v1/ai/documents")

    assert match is not None
    assert not match.method_allowed


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ai/documents/a",
        "/v1/ai/documents/01HZX-abc.def_ghi~jkl",
        "/v1/ai/documents/...",
        "/v1/ai/documents/.hidden",
        "/v1/ai/documents/x..",
        "/v1/ai/documents/~",
    ],
)
def test_template_parameter_matches_unreserved_segment(table, path):
    match = table.match("GET", path)

    assert match is not None
    assert match.route.template == "/v1/ai/documents/{id}"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ai",
        "/v1",
        "/v1/ai/chat/extra",
        "/v1/ai/documents/a/b",
        "/v1/webhooks/wh_1/deliveries",
        "/v2/ai/chat",
        "/V1/ai/chat",
        "/v1/AI/chat",
        "/v1/ai/Chat",
        "/v1/ai/chats",
        "/v1/ai/cha",
        "/ai/chat",
        "/healthz",
    ],
)
def test_match_returns_none_for_unlisted_path(table, path):
    assert table.match("GET", path) is None
    assert table.match("POST", path) is None


# Paths that are not canonical. Each must match nothing, whatever a lenient
# upstream would normalize it to.
NON_CANONICAL_PATHS = [
    pytest.param("/v1/ai/documents/..", id="dot-dot-as-parameter"),
    pytest.param("/v1/ai/documents/.", id="dot-as-parameter"),
    pytest.param("/v1/ai/./chat", id="dot-segment"),
    pytest.param("/v1/ai/../ai/chat", id="dot-dot-segment"),
    pytest.param("/v1/ai/chat/..", id="trailing-dot-dot"),
    pytest.param("/v1/ai/chat/.", id="trailing-dot"),
    pytest.param("/./v1/ai/chat", id="leading-dot"),
    pytest.param("/../v1/ai/chat", id="leading-dot-dot"),
    pytest.param("/v1/webhooks/../usage", id="dot-dot-to-other-route"),
    pytest.param("//v1/ai/chat", id="leading-double-slash"),
    pytest.param("/v1//ai/chat", id="inner-double-slash"),
    pytest.param("/v1/ai/chat//", id="trailing-double-slash"),
    pytest.param("/v1/ai/chat/", id="trailing-slash"),
    pytest.param("/v1/ai/documents/", id="empty-parameter"),
    pytest.param("/v1/ai/documents/a%2Fb", id="encoded-slash-upper"),
    pytest.param("/v1/ai/documents/a%2fb", id="encoded-slash-lower"),
    pytest.param("/v1/ai%2Fchat", id="encoded-slash-in-literal"),
    pytest.param("/v1/ai/documents/a%5Cb", id="encoded-backslash-upper"),
    pytest.param("/v1/ai/documents/a%5cb", id="encoded-backslash-lower"),
    pytest.param("/v1/ai/documents/a\\b", id="backslash"),
    pytest.param("/v1\\ai\\chat", id="backslash-separators"),
    pytest.param("/v1/ai/chat\\", id="trailing-backslash"),
    pytest.param("/v1/ai/chat;jsessionid=x", id="matrix-parameter"),
    pytest.param("/v1/ai;x=1/chat", id="inner-matrix-parameter"),
    pytest.param("/v1/ai/documents/doc;v=2", id="parameter-with-semicolon"),
    pytest.param("/v1/ai/chat#frag", id="fragment"),
    pytest.param("/v1/ai/chat#", id="empty-fragment"),
    pytest.param("v1/ai/chat", id="no-leading-slash"),
    pytest.param("", id="empty"),
    pytest.param("/", id="root"),
    pytest.param("?", id="query-only"),
    pytest.param("*", id="asterisk-form"),
    pytest.param("http://upstream/v1/ai/chat", id="absolute-form"),
    pytest.param("/v1/ai/chat\x00", id="nul"),
    pytest.param("/v1/ai/chat\r\n", id="crlf"),
    pytest.param("/v1/ai/chat\n", id="newline"),
    pytest.param("/v1/ai/ch\tat", id="tab"),
    pytest.param("/v1/ai/documents/\x7f", id="delete-character"),
    pytest.param("/v1/ai/documents/\x1b", id="escape-character"),
    pytest.param("/v1/ai/documents/caf\u00e9", id="latin-1-letter"),
    pytest.param("/v1/ai/ch\u0430t", id="cyrillic-lookalike"),
    pytest.param("/v1\uff0fai/chat", id="fullwidth-slash"),
    pytest.param("/v1/ai/documents/\u0661", id="arabic-digit"),
    pytest.param("/v1/ai/documents/a b", id="inner-space"),
    pytest.param("/v1/ai/chat ", id="trailing-space"),
    pytest.param(" /v1/ai/chat", id="leading-space"),
    pytest.param("/v1/ai/%63hat", id="encoded-letter"),
    pytest.param("/v1/ai/documents/%61", id="encoded-parameter-letter"),
    pytest.param("/v1/ai/documents/%2e%2e", id="encoded-dot-dot"),
    pytest.param("/v1/ai/documents/.%2E", id="half-encoded-dot-dot"),
    pytest.param("/v1/ai/chat%00", id="encoded-nul"),
    pytest.param("/v1/ai/documents/a%20b", id="encoded-space"),
    pytest.param("/v1/ai/documents/a+b", id="plus"),
    pytest.param("/v1/ai/documents/a@b", id="at-sign"),
    pytest.param("/v1/ai/documents/a:b", id="colon"),
    pytest.param("/v1/ai/documents/{id}", id="template-braces"),
]


@pytest.mark.parametrize("path", NON_CANONICAL_PATHS)
def test_split_canonical_path_rejects_non_canonical(path):
    assert split_canonical_path(path) is None


@pytest.mark.parametrize("path", NON_CANONICAL_PATHS)
def test_match_returns_none_for_non_canonical_path(table, path):
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
        assert table.match(method, path) is None, method


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("/v1/ai/chat", ("v1", "ai", "chat")),
        ("/v1/ai/chat?", ("v1", "ai", "chat")),
        ("/v1/ai/chat?a=1?b=2", ("v1", "ai", "chat")),
        ("/v1/ai/chat?next=/../x#y", ("v1", "ai", "chat")),
        ("/a", ("a",)),
        ("/A-z_0.9~", ("A-z_0.9~",)),
    ],
)
def test_split_canonical_path_returns_segments(path, segments):
    assert split_canonical_path(path) == segments


def test_load_route_table_accepts_valid_file(tmp_path):
    path = write_route_file(
        tmp_path,
        "routes:\n"
        "  - {path: '/v1/a/{name}', methods: [GET, DELETE], scope: ai:chat}\n"
        "  - {path: /v1/a, methods: [POST], scope: control:read}\n"
        "  - {path: '/v1/b/{x}/c', methods: [PATCH], scope: ai:documents}\n",
    )

    table = load_route_table(path)

    assert len(table.routes) == 3
    assert table.match("DELETE", "/v1/a/n1").route.scope == "ai:chat"
    assert table.match("POST", "/v1/a").route.scope == "control:read"
    assert table.match("PATCH", "/v1/b/y/c").route.scope == "ai:documents"
    assert table.match("PATCH", "/v1/b/y") is None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/a/{x}", "/a/{x}/b"),
        ("/a/{x}", "/b/{x}"),
        ("/a/b", "/a/c"),
        ("/{x}/b", "/{y}/c"),
    ],
)
def test_parse_route_table_accepts_disjoint_templates(first, second):
    document = {
        "routes": [
            {"path": first, "methods": ["GET"], "scope": "ai:chat"},
            {"path": second, "methods": ["GET"], "scope": "ai:chat"},
        ]
    }

    assert len(parse_route_table(document).routes) == 2


# Route files that must be rejected: (file text, fragments the error must contain).
INVALID_ROUTE_FILES = [
    pytest.param(
        "routes:\n"
        "  - {path: /v1/a, methods: [GET], scope: ai:chat}\n"
        "  - {path: /v1/b, methods: [GET], scope: ai:imagine}\n",
        ["'/v1/b' (entry 2)", "unknown scope 'ai:imagine'", "ai:chat, ai:documents"],
        id="unknown-scope",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [GET], scope: AI:CHAT}\n",
        ["'/v1/a' (entry 1)", "unknown scope 'AI:CHAT'"],
        id="scope-in-upper-case",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [GET], scope: [ai:chat]}\n",
        ["'/v1/a' (entry 1)", "unknown scope"],
        id="scope-as-list",
    ),
    pytest.param(
        "routes:\n"
        "  - {path: /v1/a, methods: [GET], scope: ai:chat}\n"
        "  - {path: /v1/a, methods: [POST], scope: ai:chat}\n",
        ["duplicate routes", "'/v1/a' (entry 1)", "'/v1/a' (entry 2)"],
        id="duplicate-template",
    ),
    pytest.param(
        "routes:\n"
        "  - {path: '/v1/a/{x}', methods: [GET], scope: ai:chat}\n"
        "  - {path: /v1/b, methods: [GET], scope: ai:chat}\n"
        "  - {path: '/v1/a/{y}', methods: [POST], scope: ai:chat}\n",
        ["duplicate routes", "'/v1/a/{x}' (entry 1)", "'/v1/a/{y}' (entry 3)"],
        id="duplicate-template-other-parameter-name",
    ),
    pytest.param(
        "routes:\n"
        "  - {path: '/a/{x}', methods: [GET], scope: ai:chat}\n"
        "  - {path: /a/b, methods: [POST], scope: ai:chat}\n",
        ["overlapping routes", "'/a/{x}' (entry 1)", "'/a/b' (entry 2)"],
        id="parameter-overlaps-literal",
    ),
    pytest.param(
        "routes:\n"
        "  - {path: /a/b, methods: [POST], scope: ai:chat}\n"
        "  - {path: '/a/{x}', methods: [GET], scope: ai:chat}\n",
        ["overlapping routes", "'/a/b' (entry 1)", "'/a/{x}' (entry 2)"],
        id="literal-overlaps-parameter",
    ),
    pytest.param(
        "routes:\n"
        "  - {path: '/{x}/b', methods: [GET], scope: ai:chat}\n"
        "  - {path: '/a/{y}', methods: [GET], scope: ai:chat}\n",
        ["overlapping routes", "'/{x}/b' (entry 1)", "'/a/{y}' (entry 2)"],
        id="crossed-parameters-overlap",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [get], scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "invalid method 'get'"],
        id="lower-case-method",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [FETCH], scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "invalid method 'FETCH'"],
        id="unknown-method",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [[GET]], scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "invalid method ['GET']"],
        id="method-as-list",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [GET, HEAD], scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "invalid method 'HEAD'", "HEAD is implied by GET"],
        id="head-listed",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [GET, GET], scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "method GET is listed twice"],
        id="method-twice",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [], scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "methods must be a non-empty list"],
        id="no-methods",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: GET, scope: ai:chat}\n",
        ["'/v1/a' (entry 1)", "methods must be a non-empty list"],
        id="methods-as-string",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a b, methods: [GET], scope: ai:chat}\n",
        ["'/v1/a b' (entry 1)", "invalid path segment 'a b'"],
        id="segment-with-space",
    ),
    pytest.param(
        "routes:\n  - {path: /v1//a, methods: [GET], scope: ai:chat}\n",
        ["'/v1//a' (entry 1)", "invalid path segment ''"],
        id="empty-segment",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a/, methods: [GET], scope: ai:chat}\n",
        ["'/v1/a/' (entry 1)", "invalid path segment ''"],
        id="trailing-slash",
    ),
    pytest.param(
        "routes:\n  - {path: /, methods: [GET], scope: ai:chat}\n",
        ["'/' (entry 1)", "invalid path segment ''"],
        id="root",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/../a, methods: [GET], scope: ai:chat}\n",
        ["'/v1/../a' (entry 1)", "invalid path segment '..'"],
        id="dot-dot-segment",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/./a, methods: [GET], scope: ai:chat}\n",
        ["'/v1/./a' (entry 1)", "invalid path segment '.'"],
        id="dot-segment",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a%2Fb, methods: [GET], scope: ai:chat}\n",
        ["'/v1/a%2Fb' (entry 1)", "invalid path segment 'a%2Fb'"],
        id="percent-encoding",
    ),
    pytest.param(
        "routes:\n  - {path: '/v1/a;v=1', methods: [GET], scope: ai:chat}\n",
        ["'/v1/a;v=1' (entry 1)", "invalid path segment 'a;v=1'"],
        id="matrix-parameter",
    ),
    pytest.param(
        "routes:\n  - {path: '/v1/{1x}', methods: [GET], scope: ai:chat}\n",
        ["'/v1/{1x}' (entry 1)", "invalid path segment '{1x}'"],
        id="parameter-name-starts-with-digit",
    ),
    pytest.param(
        "routes:\n  - {path: '/v1/{x', methods: [GET], scope: ai:chat}\n",
        ["'/v1/{x' (entry 1)", "invalid path segment '{x'"],
        id="unclosed-parameter",
    ),
    pytest.param(
        "routes:\n  - {path: '/v1/a{x}', methods: [GET], scope: ai:chat}\n",
        ["'/v1/a{x}' (entry 1)", "invalid path segment 'a{x}'"],
        id="parameter-inside-segment",
    ),
    pytest.param(
        "routes:\n  - {path: '/v1/{}', methods: [GET], scope: ai:chat}\n",
        ["'/v1/{}' (entry 1)", "invalid path segment '{}'"],
        id="empty-parameter-name",
    ),
    pytest.param(
        "routes:\n  - {path: '/v1/caf\u00e9', methods: [GET], scope: ai:chat}\n",
        ["(entry 1)", "invalid path segment"],
        id="non-ascii-segment",
    ),
    pytest.param(
        "routes:\n  - {path: v1/a, methods: [GET], scope: ai:chat}\n",
        ["'v1/a' (entry 1)", "path must be a string starting with '/'"],
        id="no-leading-slash",
    ),
    pytest.param(
        "routes:\n  - {path: 5, methods: [GET], scope: ai:chat}\n",
        ["5 (entry 1)", "path must be a string starting with '/'"],
        id="path-not-string",
    ),
    pytest.param(
        "routes:\n"
        "  - {path: /v1/a, methods: [GET], scope: ai:chat}\n"
        "  - {path: /v1/b, methods: [GET]}\n",
        ["entry 2 must have exactly the keys path, methods and scope"],
        id="missing-scope",
    ),
    pytest.param(
        "routes:\n  - {methods: [GET], scope: ai:chat}\n",
        ["entry 1 must have exactly the keys path, methods and scope"],
        id="missing-path",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, scope: ai:chat}\n",
        ["entry 1 must have exactly the keys path, methods and scope"],
        id="missing-methods",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [GET], scope: ai:chat, name: a}\n",
        ["entry 1 must have exactly the keys path, methods and scope"],
        id="extra-key",
    ),
    pytest.param(
        "routes:\n  - /v1/a\n",
        ["entry 1 must have exactly the keys path, methods and scope"],
        id="entry-not-mapping",
    ),
    pytest.param(
        "routes:\n  path: /v1/a\n  methods: [GET]\n  scope: ai:chat\n",
        ["'routes' must be a non-empty list"],
        id="routes-is-mapping",
    ),
    pytest.param(
        "routes: /v1/a\n",
        ["'routes' must be a non-empty list"],
        id="routes-is-string",
    ),
    pytest.param(
        "routes: []\n",
        ["'routes' must be a non-empty list"],
        id="routes-empty",
    ),
    pytest.param(
        "routes:\n",
        ["'routes' must be a non-empty list"],
        id="routes-null",
    ),
    pytest.param(
        "- {path: /v1/a, methods: [GET], scope: ai:chat}\n",
        ["expected a mapping with exactly one key, 'routes'"],
        id="top-level-list",
    ),
    pytest.param(
        "routes: [{path: /v1/a, methods: [GET], scope: ai:chat}]\nextra: 1\n",
        ["expected a mapping with exactly one key, 'routes'"],
        id="extra-top-level-key",
    ),
    pytest.param(
        "",
        ["expected a mapping with exactly one key, 'routes'"],
        id="empty-file",
    ),
    pytest.param(
        "routes: [\n",
        ["is not valid YAML"],
        id="invalid-yaml",
    ),
    pytest.param(
        "routes:\n  - {path: /v1/a, methods: [GET], scope: ai:chat\n",
        ["is not valid YAML"],
        id="unclosed-flow-mapping",
    ),
]


@pytest.mark.parametrize(("text", "fragments"), INVALID_ROUTE_FILES)
def test_load_route_table_rejects_invalid_file(tmp_path, text, fragments):
    path = write_route_file(tmp_path, text)

    with pytest.raises(RouteFileError) as caught:
        load_route_table(path)

    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_load_route_table_rejects_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(RouteFileError) as caught:
        load_route_table(path)

    assert f"cannot read route file {path}" in str(caught.value)


def test_load_route_table_rejects_directory(tmp_path):
    with pytest.raises(RouteFileError) as caught:
        load_route_table(tmp_path)

    assert f"route file {tmp_path} is not a regular file" in str(caught.value)


def test_load_route_table_rejects_non_utf8_file(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"routes:\n  - {path: /v1/caf\xe9, methods: [GET], scope: x}\n")

    with pytest.raises(RouteFileError) as caught:
        load_route_table(path)

    assert str(path) in str(caught.value)
    assert "UTF-8" in str(caught.value)


@pytest.mark.parametrize(
    "document",
    [None, [], "routes", {"routes": None}, {"Routes": []}, {"routes": [], "x": 1}],
)
def test_parse_route_table_rejects_bad_document(document):
    with pytest.raises(RouteFileError):
        parse_route_table(document)


def test_route_table_rejects_overlap():
    table = parse_route_table(
        {
            "routes": [
                {"path": "/a/{x}", "methods": ["GET"], "scope": "ai:chat"},
                {"path": "/b", "methods": ["GET"], "scope": "ai:chat"},
            ]
        }
    )
    literal = parse_route_table(
        {"routes": [{"path": "/a/b", "methods": ["GET"], "scope": "ai:chat"}]}
    ).routes[0]

    with pytest.raises(RouteFileError, match="overlapping routes"):
        RouteTable([*table.routes, literal])
