"""Demo upstream for ``make run`` and docker-compose: it echoes every request as JSON.

Whatever the method, path or body, the reply is 200 with
``{"method": ..., "path": ..., "headers": {name: [values]}}``. The path keeps
its query string. Header names are lower-cased, and each name lists its values
in the order received. A person or a test can then see exactly what Envoy
forwarded: the identity headers that hasp-authz added, and which client headers
it removed.

Run it with ``python -m hasp_authz.dev.upstream --port 8000``. It binds 127.0.0.1
unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

# Bodies are read in pieces of this size and dropped, so a large upload never
# sits in memory.
_READ_CHUNK_BYTES = 64 * 1024
# The server keeps this many of the latest echoed requests for tests to inspect.
_RECENT_REQUESTS = 100


class RequestBodyError(ValueError):
    """The request body framing is invalid, so the connection cannot be reused."""


class EchoHandler(BaseHTTPRequestHandler):
    """Respond to any method on any path with 200 and a JSON echo of the request."""

    # HTTP/1.1 keeps connections open between requests. That is safe because
    # every reply sets Content-Length and every request body is read to its end.
    protocol_version = "HTTP/1.1"
    server_version = "hasp-demo-upstream"
    # Headers and body go out in two writes. With Nagle's algorithm the body
    # waits for the ACK of the headers, which Linux's delayed ACK can hold back
    # for up to 40 ms, so most requests through Envoy took over 40 ms.
    disable_nagle_algorithm = True
    server: EchoServer

    def __getattr__(self, name: str) -> Callable[[], None]:
        # NOTE: BaseHTTPRequestHandler looks up a ``do_<METHOD>`` attribute for
        # each request and replies 501 when it is missing. Resolving every such
        # name to one handler lets methods like PURGE or custom verbs reach the
        # echo too.
        if name.startswith("do_"):
            return self._echo
        raise AttributeError(name)

    def _echo(self) -> None:
        try:
            self._discard_body()
        except RequestBodyError as error:
            self.send_error(400, str(error))
            self.close_connection = True
            return

        echo = {
            "method": self.command,
            "path": self.path,
            "headers": self._headers_as_lists(),
        }
        self.server.record(echo)
        body = json.dumps(echo).encode()

        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _headers_as_lists(self) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        return headers

    def _discard_body(self) -> None:
        """Read the request body, if any, to its end and drop it."""
        transfer_encoding = self.headers.get("Transfer-Encoding", "").lower()
        if transfer_encoding:
            if transfer_encoding != "chunked":
                raise RequestBodyError(
                    f"unsupported Transfer-Encoding {transfer_encoding!r}; "
                    "only chunked is accepted"
                )
            self._discard_chunked_body()
            return

        content_length = self.headers.get("Content-Length")
        if content_length is None:
            return
        if not content_length.isdigit():
            raise RequestBodyError(f"invalid Content-Length {content_length!r}")
        self._discard_bytes(int(content_length))

    def _discard_chunked_body(self) -> None:
        while True:
            size_line = self.rfile.readline(1024)
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise RequestBodyError(f"invalid chunk size {size_line!r}") from None
            if size == 0:
                break
            self._discard_bytes(size)
            self.rfile.readline(1024)  # the CRLF that ends the chunk data

        # Trailer fields, if any, end with an empty line.
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass

    def _discard_bytes(self, count: int) -> None:
        while count > 0:
            piece = self.rfile.read(min(count, _READ_CHUNK_BYTES))
            if not piece:
                raise RequestBodyError(
                    f"request body ended {count} bytes before its declared length"
                )
            count -= len(piece)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # NOTE: the request line is not logged, because a client may put a key in
        # the query string. The method and the path without the query are.
        path = self.path.partition("?")[0]
        logger.info("%s %s %s %s", self.address_string(), self.command, path, code)

    def log_message(self, format: str, *args: Any) -> None:
        # Errors go through logging instead of the default stderr write.
        logger.info("%s " + format, self.address_string(), *args)


class EchoServer(ThreadingHTTPServer):
    """Echo server that keeps the latest requests it responded to, for tests."""

    daemon_threads = True
    # socketserver's default listen backlog is 5. Envoy opens upstream
    # connections in bursts under load, and the connections past the backlog
    # time out as 503s that hasp-authz did not cause.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]):
        super().__init__(address, EchoHandler)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.request_count = 0
        self.recent_requests: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=_RECENT_REQUESTS
        )

    @property
    def port(self) -> int:
        return self.server_address[1]

    def record(self, echo: dict[str, Any]) -> None:
        with self._lock:
            self.request_count += 1
            self.recent_requests.append(echo)

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def serve_in_thread(host: str = "127.0.0.1", port: int = 0) -> EchoServer:
    """Start the echo server in a daemon thread and return it; ``stop()`` ends it.

    Port 0 picks a free port, which ``server.port`` then reports.
    """
    server = EchoServer((host, port))
    thread = threading.Thread(
        target=server.serve_forever, name=f"demo-upstream-{server.port}", daemon=True
    )
    server._thread = thread
    thread.start()
    return server


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hasp_authz.dev.upstream",
        description="Demo upstream: respond to every request with 200 and a JSON echo.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port to bind (default: 8000)"
    )
    options = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # NOTE: as PID 1 in a container, Python ignores SIGTERM unless a handler is
    # set, so `docker stop` would wait for its timeout and then kill.
    signal.signal(signal.SIGTERM, _raise_system_exit)

    server = EchoServer((options.host, options.port))
    logger.info("demo upstream listening on %s:%d", options.host, server.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        logger.info("demo upstream stopped")


if __name__ == "__main__":
    main()
