"""The route table: which scope each method and path template requires.

Path matching rules. The sidecar must never read a path differently from the
upstream, so it matches only canonical paths and treats everything else as
matching nothing (a 404 after the key checks):

- The query string (from the first ``?``) is not part of the match.
- The path starts with ``/`` and splits on ``/`` into segments. Each segment is
  one or more unreserved characters (RFC 3986: letters, digits, ``-._~``) and is
  neither ``.`` nor ``..``. That excludes empty segments (``//``, a trailing
  ``/``), percent-encoding (so encoded ``/`` or ``\\``), ``;`` parameters,
  ``#``, control characters and non-ASCII.
- A literal template segment matches itself, case-sensitively. A ``{name}``
  segment matches any one segment.

HEAD is checked as GET. The table is compiled once. Two templates that could
match the same path are rejected at load time, so at most one route matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hasp_authz.scopes import SCOPES
from hasp_authz.yaml_files import YamlFileError, read_yaml

DEFAULT_ROUTES_FILE = Path(__file__).with_name("routes.yaml")

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~-]+", re.ASCII)
_PARAMETER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", re.ASCII)


class RouteFileError(ValueError):
    """The route file is missing, unreadable or invalid. The message names the entry."""


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the route table."""

    template: str
    methods: frozenset[str]
    scope: str
    # Template segments; None stands for a ``{name}`` parameter.
    segments: tuple[str | None, ...]
    # "path ... (entry N)", for error messages.
    label: str

    @property
    def allow_header(self) -> str:
        """Return the value of the ``Allow`` header for a 405 on this route."""
        methods = set(self.methods)
        if "GET" in methods:
            methods.add("HEAD")
        return ", ".join(sorted(methods))


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    method_allowed: bool


def split_canonical_path(path: str) -> tuple[str, ...] | None:
    """Return the segments of a canonical request path, or None if it is not one.

    The query string is dropped first. See the module docstring for the rules.
    """
    path = path.partition("?")[0]
    if not path.startswith("/"):
        return None
    segments = tuple(path[1:].split("/"))
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT_RE.fullmatch(segment):
            return None
    return segments


class RouteTable:
    """Compiled routes, looked up by method and path."""

    def __init__(self, routes: Iterable[Route]):
        self.routes: tuple[Route, ...] = tuple(routes)
        _reject_overlaps(self.routes)
        # Exact templates resolve with one dict lookup; templates with parameters
        # are few and are tried in order, bucketed by segment count.
        self._literal: dict[tuple[str, ...], Route] = {}
        self._templated: dict[int, list[Route]] = {}
        for route in self.routes:
            if None in route.segments:
                self._templated.setdefault(len(route.segments), []).append(route)
            else:
                self._literal[route.segments] = route  # type: ignore[index]

    def match(self, method: str, path: str) -> RouteMatch | None:
        """Return the route that matches ``path``, or None when no route does."""
        segments = split_canonical_path(path)
        if segments is None:
            return None
        route = self._literal.get(segments)
        if route is None:
            route = self._match_templated(segments)
            if route is None:
                return None
        checked_method = "GET" if method == "HEAD" else method
        return RouteMatch(route, checked_method in route.methods)

    def _match_templated(self, segments: tuple[str, ...]) -> Route | None:
        for route in self._templated.get(len(segments), ()):
            if all(
                expected is None or expected == actual
                for expected, actual in zip(route.segments, segments, strict=True)
            ):
                return route
        return None


def load_route_table(path: Path | str = DEFAULT_ROUTES_FILE) -> RouteTable:
    """Read, validate and compile a route file. Raises RouteFileError."""
    path = Path(path)
    try:
        document = read_yaml(path, "route file")
    except YamlFileError as error:
        raise RouteFileError(str(error)) from error
    try:
        return parse_route_table(document)
    except RouteFileError as error:
        raise RouteFileError(f"route file {path}: {error}") from error


def parse_route_table(document: Any) -> RouteTable:
    """Validate and compile a parsed route document. Raises RouteFileError."""
    if not isinstance(document, Mapping) or set(document) != {"routes"}:
        raise RouteFileError("expected a mapping with exactly one key, 'routes'")
    entries = document["routes"]
    if not isinstance(entries, list) or not entries:
        raise RouteFileError("'routes' must be a non-empty list of route entries")
    return RouteTable(
        _parse_entry(entry, number) for number, entry in enumerate(entries, 1)
    )


def _parse_entry(entry: Any, number: int) -> Route:
    if not isinstance(entry, Mapping) or set(entry) != {"path", "methods", "scope"}:
        raise RouteFileError(
            f"entry {number} must have exactly the keys path, methods and scope"
        )
    template, methods, scope = entry["path"], entry["methods"], entry["scope"]
    label = f"{template!r} (entry {number})"
    segments = _parse_template(template, label)
    if not isinstance(scope, str) or scope not in SCOPES:
        known = ", ".join(sorted(SCOPES))
        raise RouteFileError(f"{label}: unknown scope {scope!r}; known scopes: {known}")
    return Route(template, _parse_methods(methods, label), scope, segments, label)


def _parse_template(template: Any, label: str) -> tuple[str | None, ...]:
    if not isinstance(template, str) or not template.startswith("/"):
        raise RouteFileError(f"{label}: path must be a string starting with '/'")
    segments: list[str | None] = []
    for segment in template[1:].split("/"):
        if _PARAMETER_RE.fullmatch(segment):
            segments.append(None)
        elif _SEGMENT_RE.fullmatch(segment) and segment not in (".", ".."):
            segments.append(segment)
        else:
            raise RouteFileError(
                f"{label}: invalid path segment {segment!r}; use unreserved "
                "characters (A-Z a-z 0-9 - . _ ~) or a {name} parameter"
            )
    return tuple(segments)


def _parse_methods(methods: Any, label: str) -> frozenset[str]:
    if not isinstance(methods, list) or not methods:
        raise RouteFileError(f"{label}: methods must be a non-empty list")
    parsed: set[str] = set()
    for method in methods:
        if (
            not isinstance(method, str)
            or method not in HTTP_METHODS
            or method == "HEAD"
        ):
            raise RouteFileError(
                f"{label}: invalid method {method!r}; use upper-case HTTP methods "
                "(HEAD is implied by GET)"
            )
        if method in parsed:
            raise RouteFileError(f"{label}: method {method} is listed twice")
        parsed.add(method)
    return frozenset(parsed)


def _reject_overlaps(routes: tuple[Route, ...]) -> None:
    for index, first in enumerate(routes):
        for second in routes[index + 1 :]:
            if first.segments == second.segments:
                raise RouteFileError(
                    f"duplicate routes: {first.label} and {second.label} have the "
                    "same path; list all its methods in one entry"
                )
            if _can_match_same_path(first.segments, second.segments):
                raise RouteFileError(
                    f"overlapping routes: {first.label} and {second.label} can "
                    "match the same path"
                )


def _can_match_same_path(
    first: tuple[str | None, ...], second: tuple[str | None, ...]
) -> bool:
    if len(first) != len(second):
        return False
    pairs = zip(first, second, strict=True)
    return all(a is None or b is None or a == b for a, b in pairs)
