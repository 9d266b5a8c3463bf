"""Log output: JSON lines (default) or plain text, and rate-limited deny lines.

HASP_LOG_FORMAT=json writes one JSON object per line through python-json-logger
(``time``, ``level``, ``logger``, ``message`` and every field passed in
``extra=``), so a log pipeline reads the fields without parsing the message.
HASP_LOG_FORMAT=text writes the classic ``time level logger message`` line for
a terminal. Messages carry their fields as ``name=value`` too, so both formats
hold the same facts.

Deny lines come through ``DenyLog``: at most ``rate`` lines per second per
outcome code (a token bucket with a burst of the same size). The rest are
counted, and one summary line reports them. A flood of bad keys then costs a
few lines a second and never hides the other codes' lines.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from hasp_authz.config import redact_url

LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Deny lines per second per code before they are suppressed and counted.
DENY_LINES_PER_SECOND = 20.0


def configure_logging(
    level: str, log_format: str = "json", stream: IO[str] | None = None
) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format``.

    Replaces any handler already on the root logger. Raises ValueError for a
    format not in LOG_FORMATS.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; expected json or text")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(build_formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def build_formatter(log_format: str) -> logging.Formatter:
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


def configuration_fields(settings: Any) -> dict[str, Any]:
    """Return a dataclass's fields for a log line, with every ``*_url`` redacted.

    Paths and other values that JSON cannot hold become strings.
    """
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if item.name.endswith("_url") and isinstance(value, str):
            value = redact_url(value)
        elif not isinstance(value, str | int | float | bool | type(None)):
            value = str(value)
        fields[item.name] = value
    return fields


class DenyLog:
    """Writes one info line per deny, at most ``rate`` per second per code.

    The lines name ids only (request, key, org), never a token or its hash.
    Suppressed lines are counted per code, and the count goes out as one
    warning at the next line that code is allowed again.
    """

    def __init__(
        self,
        logger: logging.Logger,
        rate: float = DENY_LINES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.rate = rate
        self.clock = clock
        # Code -> (tokens, time of the last refill).
        self._buckets: dict[str, tuple[float, float]] = {}
        self.suppressed: dict[str, int] = {}

    def deny(
        self,
        code: str,
        *,
        request_id: str,
        key_id: str | None,
        org_id: str | None,
        route: str | None,
        verb: str = "deny",
        reason: str | None = None,
        level: int = logging.INFO,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log one deny unless the code is over its rate. Returns True if logged.

        ``verb`` is "deny", or "would deny" for a shadow-mode route. ``reason``
        is the cause of a 503 for operators. It never goes to the client.
        """
        if not self._take(code):
            self.suppressed[code] = self.suppressed.get(code, 0) + 1
            return False
        self._report_suppressed(code)
        fields = {
            "code": code,
            "request_id": request_id,
            "key_id": key_id or "-",
            "org_id": org_id or "-",
            "route": route or "-",
        }
        message = "%s code=%s request_id=%s key_id=%s org_id=%s route=%s"
        arguments: tuple[object, ...] = (verb, *fields.values())
        if reason:
            fields["reason"] = reason
            message += " reason=%s"
            arguments += (reason,)
        self.logger.log(
            level,
            message,
            *arguments,
            exc_info=exc_info,
            extra={"event": verb.replace(" ", "_"), **fields},
        )
        return True

    def _take(self, code: str) -> bool:
        now = self.clock()
        tokens, refilled_at = self._buckets.get(code, (self.rate, now))
        tokens = min(self.rate, tokens + (now - refilled_at) * self.rate)
        if tokens < 1.0:
            self._buckets[code] = (tokens, now)
            return False
        self._buckets[code] = (tokens - 1.0, now)
        return True

    def _report_suppressed(self, code: str) -> None:
        # NOTE: a count is reported at the code's next logged deny, so the
        # last count of a flood that stops waits for the next deny of that code.
        count = self.suppressed.pop(code, 0)
        if count:
            self.logger.warning(
                "suppressed %d deny lines code=%s; over %g lines per second",
                count, code, self.rate,
                extra={"event": "deny_lines_suppressed", "code": code,
                       "suppressed": count},
            )  # fmt: skip
