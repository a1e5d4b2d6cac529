"""One loopback HTTP/1.1 server for tests: each request is recorded and answered by a callback.

The scripted server of the retry tests, the odd DICOMweb stand-ins and (later) the Cloud
Healthcare stand-in and the fault proxy all sit on this, so request parsing lives in one place.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False  # hold the answer until the server stops (a read timeout for the client)
    drop: bool = False  # close the connection without answering
    short_by: int = 0  # promise the whole body, send this many bytes fewer, then close


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class LoopbackServer:
    """Binds 127.0.0.1 on a free port; ``respond(seen)`` decides every answer."""

    def __init__(self, respond: Callable[[Seen], Reply], *, record: bool = True) -> None:
        """``record=False`` keeps ``seen`` empty (for servers that must not hold on to request
        headers or bodies, e.g. bearer tokens and uploads)."""
        self.respond = respond
        self.record = record
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _read_chunked(self) -> bytes:
                """A ``Transfer-Encoding: chunked`` request body (trailers are read and dropped)."""
                chunks: list[bytes] = []
                while True:
                    size_line = self.rfile.readline(65537)
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline(65537)  # the CRLF after the chunk

            def _handle(self) -> None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = self._read_chunked()
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers), body)
                if server.record:
                    with server._lock:
                        server.seen.append(seen)
                reply = server.respond(seen)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.stall:
                    server.release.wait(10)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.short_by:
                    self.wfile.write(reply.body[: -reply.short_by])
                    self.close_connection = True
                else:
                    self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def clear(self) -> None:
        with self._lock:
            self.seen = []

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
