"""A counting reverse proxy: every request from a client (the mount) to one upstream HTTP server.

Threaded, 127.0.0.1 only, HTTP/1.1 keep-alive on both sides (one upstream connection per client
connection), bodies streamed in both directions (``read1``: a byte is passed on as soon as it
arrives, so time-to-first-byte is not distorted). It counts requests per method and path shape
(UIDs become ``{uid}``, Orthanc IDs ``{id}``) and the bytes sent back to the client.

Used only for the counting passes of the benchmark: timed passes talk to the server directly.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

CHUNK = 1024 * 1024
UPSTREAM_TIMEOUT_S = 120.0
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "proxy-connection"}
)
_UID_SEGMENT = re.compile(r"^\d+(\.\d+)+$")
_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def path_shape(path: str) -> str:
    """``/dicom-web/studies/1.2.3/series`` → ``/dicom-web/studies/{uid}/series`` (no query)."""
    segments = urlsplit(path).path.split("/")
    shaped = ["{uid}" if _UID_SEGMENT.match(s) else "{id}" if _ORTHANC_ID.match(s) else s for s in segments]
    return "/".join(shaped)


@dataclass(frozen=True)
class Counts:
    """What went through the proxy: requests per ``METHOD /path/shape``, and bytes to the client."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes_down: int = 0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def __sub__(self, earlier: Counts) -> Counts:
        diff = Counter(self.requests)
        diff.subtract(earlier.requests)
        return Counts({k: v for k, v in sorted(diff.items()) if v}, self.bytes_down - earlier.bytes_down)

    def summary(self) -> str:
        """``12 requests (1 GET /dicom-web/studies, ...)``, largest first."""
        parts = [f"{n} {shape}" for shape, n in sorted(self.requests.items(), key=lambda kv: (-kv[1], kv[0]))]
        return f"{self.total} requests" + (f" ({', '.join(parts)})" if parts else "")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers then body in two writes must not wait for a delayed ACK
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - the base class's naming
        self._forward()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def _connection(self) -> http.client.HTTPConnection:
        sock = self._upstream.sock if self._upstream is not None else None
        if sock is not None and select.select([sock], [], [], 0)[0]:
            self._drop_upstream()  # readable while idle: the upstream closed it
        if self._upstream is None:
            conn = http.client.HTTPConnection(
                self.server.upstream_host, self.server.upstream_port, timeout=UPSTREAM_TIMEOUT_S
            )
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._upstream = conn
        return self._upstream

    def _request_body(self) -> Iterator[bytes] | None:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self._read_exactly(int(length))
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return None

    def _read_exactly(self, remaining: int) -> Iterator[bytes]:
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield from self._read_exactly(size)
            self.rfile.readline()

    def _send_upstream(self, body: Iterator[bytes] | None, chunked: bool) -> http.client.HTTPResponse:
        conn = self._connection()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        if body is not None:
            for chunk in body:
                conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                conn.send(b"0\r\n\r\n")
        return conn.getresponse()

    def _forward(self) -> None:
        self.server.count(self.command, self.path)
        body = self._request_body()
        chunked = body is not None and self.headers.get("Content-Length") is None
        try:
            response = self._send_upstream(body, chunked)
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            if body is not None:  # a body cannot be replayed: tell the client
                self._fail()
                return
            # The upstream may have closed an idle keep-alive connection: one fresh attempt.
            self._drop_upstream()
            try:
                response = self._send_upstream(None, False)
            except (OSError, http.client.HTTPException):
                self._fail()
                return
        self._relay(response)

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        relay_chunked = not no_body and length is None
        if relay_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        if not no_body:
            while True:
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                sent += len(chunk)
                self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if relay_chunked else chunk)
                self.wfile.flush()
            if relay_chunked:
                self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.server.add_bytes(sent)
        will_close = response.will_close
        response.close()  # read to the end: the upstream connection takes the next request
        if will_close:
            self._drop_upstream()

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _fail(self) -> None:
        self._drop_upstream()
        self.send_response_only(502, "Bad Gateway")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._bytes_down = 0

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-answer (an unmount during a download) is not news

    def count(self, method: str, path: str) -> None:
        with self._lock:
            self._requests[f"{method} {path_shape(path)}"] += 1

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes_down += n

    def snapshot(self) -> Counts:
        with self._lock:
            return Counts(dict(self._requests), self._bytes_down)


class CountingProxy:
    """``with CountingProxy("http://127.0.0.1:8042") as proxy:`` then point a client at
    ``proxy.url`` (same paths) and read ``proxy.snapshot()``."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError("the proxy forwards to an http:// server")
        self._server = _ProxyServer(parts.hostname, parts.port or 80)
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def snapshot(self) -> Counts:
        return self._server.snapshot()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
