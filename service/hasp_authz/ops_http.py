"""The operations HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``.

It listens on HASP_METRICS_LISTEN, apart from the gRPC Check port, in a thread
of its own (stdlib ``http.server``), so a scrape never runs on the event loop
that serves Checks.

- ``/healthz`` returns 200 while the process runs.
- ``/readyz`` returns 200 while the last readiness probe passed, else 503 with
  a one-line plain-text reason. The probe runs on the event loop every
  ``interval`` seconds (``ReadinessProbe.run``). A request only reads its last
  result, so a flood of probes never reaches Redis.
- ``/metrics`` returns the Prometheus text format of the server's registry.

The gRPC health service on the Check port is separate and unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from hasp_authz.redis_clients import REDIS_ERRORS, AsyncClient, ping_primaries

log = logging.getLogger(__name__)

# Seconds between two readiness probes, and the time limit of one.
PROBE_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Readiness:
    """The result of one readiness probe. ``reason`` is empty when ready."""

    ready: bool
    reason: str


NOT_PROBED = Readiness(False, "readiness not probed yet")


class ReadinessProbe:
    """Probes Redis, the completeness marker and the change subscription.

    ``subscription_live`` returns whether the change subscription is up. It is
    None when the in-process cache is off, because no subscription runs then.
    """

    def __init__(
        self,
        client: AsyncClient,
        marker: str,
        subscription_live: Callable[[], bool] | None = None,
        *,
        interval: float = PROBE_INTERVAL_SECONDS,
    ):
        self.client = client
        self.marker = marker
        self.subscription_live = subscription_live
        self.interval = interval
        # Replaced whole by the event loop and read by the HTTP thread. A
        # single attribute assignment is atomic, so no lock is needed.
        self.current = NOT_PROBED

    async def run(self) -> None:
        """Probe every ``interval`` seconds until cancelled."""
        while True:
            self._update(await self.probe())
            await asyncio.sleep(self.interval)

    async def probe(self) -> Readiness:
        """Run one probe: PING, EXISTS on the marker, then the subscription flag.

        On a Redis Cluster the PING goes to every primary, because each one
        serves part of the keys.
        """
        try:
            async with asyncio.timeout(self.interval):
                await ping_primaries(self.client)
                marker_present = await self.client.exists(self.marker)
        except TimeoutError:
            return Readiness(False, f"Redis did not reply within {self.interval:g} s")
        except REDIS_ERRORS as error:
            return Readiness(False, f"Redis unreachable: {type(error).__name__}")
        except Exception as error:
            # Any other failure must not end the probe task, or /readyz would
            # keep its last result forever.
            log.exception("readiness probe failed")
            return Readiness(False, f"readiness probe failed: {type(error).__name__}")
        if not marker_present:
            return Readiness(
                False, f"completeness marker {self.marker} missing; run hasp-keys sync"
            )
        if self.subscription_live is not None and not self.subscription_live():
            return Readiness(False, "change subscription down")
        return Readiness(True, "")

    def _update(self, result: Readiness) -> None:
        previous, self.current = self.current, result
        if result == previous:
            return
        if result.ready:
            log.info(
                "ready: Redis responds, the copy is complete, subscription is live"
            )
        else:
            log.warning("not ready: %s", result.reason)


# Connections served at once. A scrape or a probe takes milliseconds, so more
# than this many at once are idle or hostile, and the next one is closed at once
# instead of taking another thread.
MAX_CONNECTIONS = 32
# Seconds a connection may take to send its request, so an idle or slow client
# gives its thread back.
REQUEST_TIMEOUT_SECONDS = 5.0


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with a connection cap and one-line errors."""

    daemon_threads = True
    # The listen backlog; the stdlib default of 5 drops bursts of probes.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.rejected = 0

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.rejected += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # The stdlib prints a traceback to stderr for every connection that a
        # client resets; one debug line in the log format is enough.
        error = sys.exc_info()[1]
        log.debug(
            "ops http connection from %s failed: %s",
            client_address[0],
            type(error).__name__,
        )


class OpsHttpServer:
    """Serves /metrics, /healthz and /readyz from a daemon thread."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        readiness: Callable[[], Readiness],
    ):
        host, _, port = listen.rpartition(":")
        handler = _handler_class(registry, readiness)
        # Raises OSError when the address is in use, before any thread starts.
        self.httpd = _BoundedHTTPServer((host, int(port)), handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="hasp-ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Blocks until the thread ends."""
        # shutdown() waits for serve_forever(), so it would block for good on
        # a server whose thread never started.
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()


def _handler_class(
    registry: CollectorRegistry, readiness: Callable[[], Readiness]
) -> type[BaseHTTPRequestHandler]:
    class OpsHandler(BaseHTTPRequestHandler):
        server_version = "hasp-authz"
        timeout = REQUEST_TIMEOUT_SECONDS
        # True for a HEAD request: the same status and headers, no body.
        _head_only = False

        def do_HEAD(self) -> None:  # noqa: N802 - the name is fixed by http.server
            self._head_only = True
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802 - the name is fixed by http.server
            path = self.path.partition("?")[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send_text(200, "ok")
            elif path == "/readyz":
                result = readiness()
                if result.ready:
                    self._send_text(200, "ready")
                else:
                    self._send_text(503, f"not ready: {result.reason}")
            else:
                self._send_text(404, "not found; try /metrics, /healthz or /readyz")

        def _send_text(self, status: int, text: str) -> None:
            self._send(status, f"{text}\n".encode(), "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not getattr(self, "_head_only", False):
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Scrapes and probes arrive every few seconds; log them at debug only.
            log.debug("ops http %s %s", self.address_string(), format % args)

    return OpsHandler
