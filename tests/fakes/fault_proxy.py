"""A loopback reverse proxy in front of a real server (Orthanc) that injects network faults.

Every request is forwarded to the upstream base URL, bodies streamed both ways, unless a fault
scripted with :meth:`FaultProxy.fail` matches it first::

    proxy = FaultProxy(orthanc.url).start()
    proxy.fail("GET", "/instances/1.2.3", times=2, status=503, retry_after=1)
    proxy.fail("GET", "/instances/", drop_mid_body=True)
    proxy.down(2.0)          # refuse connections for two seconds (a server restart)
    proxy.seen               # [Seen(method, path, fault, at), ...]
    proxy.stop()

The script may be changed from the test thread at any time (thread-safe). Faults:

- ``status``: answer that status (small JSON body, or ``body`` with ``content_type``; optional
  ``Retry-After``) instead of forwarding;
- ``drop_before``: close the connection without forwarding or answering;
- ``drop_mid_body``: forward, send the headers with the full ``Content-Length`` and half the body, close;
- ``drop_response``: forward, read the answer, close without sending any of it;
- ``truncate_multipart``: forward, re-send a multipart answer without its closing ``--boundary--``
  (``Content-Length`` matches what is sent);
- ``stall``: answer nothing until :meth:`release`, :meth:`clear`, :meth:`stop` or ``STALL_BOUND`` seconds,
  then close. A release frees the requests stalled so far; a stall fault met afterwards stalls again.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

STALL_BOUND = 30.0
UPSTREAM_TIMEOUT = 60.0
IDLE_TIMEOUT = 60.0  # an idle keep-alive connection from the client is closed after this
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade"})


@dataclass
class Fault:
    method: str | None
    path_contains: str | None
    times: int | None  # None: every matching request until clear()
    status: int | None = None
    retry_after: int | None = None
    drop_before: bool = False
    drop_mid_body: bool = False
    truncate_multipart: bool = False
    stall: bool = False
    drop_response: bool = False
    body: bytes | None = None  # a status fault's body (None: a small JSON one)
    content_type: str = "application/json"  # of ``body``; "" sends none (as Orthanc does)

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method.upper() == method)
                and (self.path_contains is None or self.path_contains in path)
                and (self.times is None or self.times > 0))

    def describe(self) -> str:
        if self.status is not None:
            return f"status {self.status}"
        for name in ("drop_before", "drop_mid_body", "drop_response", "truncate_multipart", "stall"):
            if getattr(self, name):
                return name
        return "none"


@dataclass
class Seen:
    method: str
    path: str
    fault: str | None  # what was done to it; None: forwarded untouched
    at: float  # time.monotonic() when the request arrived


def _read_body(rfile, headers) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """The request body, de-chunked, in pieces."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        while True:
            size = int(rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return
            remaining = size
            while remaining:
                piece = rfile.read(min(CHUNK, remaining))
                if not piece:
                    raise ConnectionError("request body ended early")
                remaining -= len(piece)
                yield piece
            rfile.readline(65537)
    remaining = int(headers.get("Content-Length") or 0)
    while remaining > 0:
        piece = rfile.read(min(CHUNK, remaining))
        if not piece:
            raise ConnectionError("request body ended early")
        remaining -= len(piece)
        yield piece


def _without_closing_boundary(body: bytes, content_type: str) -> bytes:
    """``body`` cut just before its closing delimiter (CRLF ``--boundary--``)."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    index = body.rfind(b"\r\n--" + boundary.encode("latin-1") + b"--") if boundary else -1
    return body[:index] if index >= 0 else body[: len(body) // 2]


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up before the end of an answer (a reader that wanted 4 KiB of a large
    file, a mount being stopped) is normal traffic, not a traceback on stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.upstream_prefix = parts.path.rstrip("/")
        self.seen: list[Seen] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        # Set to free the requests stalled so far, then replaced by a fresh one (protected by _lock).
        self._release = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._port = 0
        self._stopped = False

    # -- the script ---------------------------------------------------------------------------

    def fail(self, method: str | None = None, path_contains: str | None = None, times: int | None = 1, *,
             status: int | None = None, retry_after: int | None = None, drop_before: bool = False,
             drop_mid_body: bool = False, truncate_multipart: bool = False, stall: bool = False,
             drop_response: bool = False, body: bytes | None = None, content_type: str = "application/json") -> None:
        """Apply one fault to the next ``times`` matching requests (None: all, until :meth:`clear`).
        Faults apply in the order they were added."""
        fault = Fault(method, path_contains, times, status, retry_after, drop_before, drop_mid_body,
                      truncate_multipart, stall, drop_response, body, content_type)
        if fault.describe() == "none":
            raise ValueError("no fault given")
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        """Forget every scripted fault and release stalled requests."""
        with self._lock:
            self._faults = []
        self.release()

    def release(self) -> None:
        """Free the requests stalled so far (they are closed); later stalls wait for the next release."""
        with self._lock:
            released, self._release = self._release, threading.Event()
        released.set()

    def _stall_event(self) -> threading.Event:
        """What a request arriving now waits on should it stall: the next :meth:`release` sets it."""
        with self._lock:
            return self._release

    def requests(self, method: str | None = None, path_contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if (method is None or s.method == method) and path_contains in s.path]

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                    self.seen.append(Seen(method, path, fault.describe(), time.monotonic()))
                    return fault
            self.seen.append(Seen(method, path, None, time.monotonic()))
            return None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FaultProxy:
        self._httpd = _QuietServer(("127.0.0.1", self._port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def _close_listener(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self, seconds: float) -> threading.Thread:
        """Refuse connections (and cut open ones) for ``seconds``, then listen again on the same
        port, as a restarting server does. Returns at once; join the thread to wait for the end."""
        self._close_listener()

        def come_back() -> None:
            time.sleep(seconds)
            if not self._stopped:
                self.start()

        thread = threading.Thread(target=come_back, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stopped = True
        self.release()
        self._close_listener()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the handler --------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            timeout = IDLE_TIMEOUT

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                released = proxy._stall_event()  # taken first: a release from now on frees this request
                fault = proxy._take(self.command, self.path)
                if fault is not None and fault.drop_before:
                    self._drop()
                    return
                if fault is not None and (fault.status is not None or fault.stall):
                    for _ in _read_body(self.rfile, self.headers):
                        pass
                    if fault.stall:
                        if not proxy._stopped:
                            released.wait(STALL_BOUND)
                        self._drop()
                        return
                    self._answer_status(fault)
                    return
                try:
                    upstream = self._forward()
                except (OSError, http.client.HTTPException):
                    self._drop()
                    return
                if fault is not None and fault.drop_response:
                    upstream.read()
                    upstream.close()
                    self._drop()
                    return
                try:
                    self._relay(upstream, fault)
                finally:
                    upstream.close()

            def _answer_status(self, fault: Fault) -> None:
                body = fault.body
                if body is None:
                    body = json.dumps({"error": f"injected HTTP {fault.status}"}).encode()
                self.send_response(fault.status or 500)
                if fault.content_type:
                    self.send_header("Content-Type", fault.content_type)
                self.send_header("Content-Length", str(len(body)))
                if fault.retry_after is not None:
                    self.send_header("Retry-After", str(fault.retry_after))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> http.client.HTTPResponse:
                """Send the request upstream, its body streamed; the upstream response."""
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT)
                conn.putrequest(self.command, proxy.upstream_prefix + self.path, skip_host=True,
                                skip_accept_encoding=True)
                chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        conn.putheader(name, value)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for piece in _read_body(self.rfile, self.headers):
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                if chunked:
                    conn.send(b"0\r\n\r\n")
                response = conn.getresponse()
                response.conn = conn  # type: ignore[attr-defined]  # closed with the response
                return response

            def _relay(self, upstream: http.client.HTTPResponse, fault: Fault | None) -> None:
                has_body = self.command != "HEAD" and upstream.status not in (204, 304) and upstream.status >= 200
                self.send_response(upstream.status, upstream.reason)
                for name, value in upstream.getheaders():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                if not has_body:
                    self.send_header("Content-Length", upstream.getheader("Content-Length") or "0")
                    self.end_headers()
                    return
                if fault is not None:  # drop_mid_body or truncate_multipart: the whole body first
                    body = upstream.read()
                    if fault.truncate_multipart:
                        body = _without_closing_boundary(body, upstream.getheader("Content-Type") or "")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if fault.drop_mid_body:
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self._drop()
                        return
                    self.wfile.write(body)
                    return
                length = upstream.getheader("Content-Length")
                if length is not None:
                    self.send_header("Content-Length", length)
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while piece := upstream.read(CHUNK):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if length is None else piece)
                if length is None:
                    self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _handle

        return Handler
