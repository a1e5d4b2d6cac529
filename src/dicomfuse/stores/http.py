"""The HTTP layer every ``requests``-based store shares: pooled sessions, timeouts on every call,
bounded retries with backoff, one mapping from HTTP failures to :class:`StoreError`, and a
streaming ``multipart/related`` reader.

Error messages name the method, the URL path (never the query, the host's credentials or an
``Authorization`` header), the status with its standard phrase and, for a 4xx, the error *code* its
body gives (Google's ``error.status``, Orthanc's ``OrthancStatus``). A server's own words are never
quoted: servers echo what they were sent (a refused instance's PatientName, a query's values) in
their messages, so the text of an error body reaches no exception, log line or file at any level.
"""

from __future__ import annotations

import email.message
import email.utils
import json
import logging
import os
import random
import re
import socket
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, BinaryIO, TypeAlias
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from dicomfuse.stores.base import (
    AlreadyExists,
    Forbidden,
    NotFound,
    StoreError,
    TooLarge,
    Unavailable,
    write_all,
)

logger = logging.getLogger(__name__)

Timeout: TypeAlias = float | tuple[float, float]
"""A ``requests`` timeout: seconds, or (connect, read) seconds."""

RequestBody: TypeAlias = bytes | str | Iterable[bytes] | Callable[[], Any] | None
"""A request body. A callable is called once per attempt to get a fresh body (for generators)."""

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 60.0)
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
NOT_PROCESSED_STATUSES = frozenset({429})
"""Answers that say the server did nothing with the request, so even a POST may be sent again."""
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
_ERROR_BODY_READ_LIMIT = 16 * 1024


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or (443 if parts.scheme.lower() == "https" else 80)


class HostAuth(requests.auth.HTTPBasicAuth):
    """HTTP basic authentication sent to one host and port only: the server the login was
    given with (``url``), not an --orthancRest on another host, nor a redirect's target."""

    def __init__(self, username: str, password: str, *, url: str) -> None:
        super().__init__(username, password)
        self.host = _host_port(url)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if _host_port(request.url or "") != self.host:
            return request
        return super().__call__(request)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HostAuth) and (self.username, self.password, self.host) == (
            other.username, other.password, other.host)

    __hash__ = None  # type: ignore[assignment]


def make_session(pool_size: int = 16, ca_bundle: str | os.PathLike[str] | None = None) -> requests.Session:
    """A session with one pooled adapter for http and https, sized for ``pool_size`` concurrent
    requests to one host. urllib3's own retries are off: :class:`HttpClient` retries."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    if ca_bundle is not None:
        session.verify = str(ca_bundle)
    return session


# ---------------------------------------------------------------------------------------------
# Retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait. ``attempts`` counts the first try (1 = no retry).
    ``throttled_wait``: 429 answers (a quota exceeded, counted per minute on Google Cloud) are
    retried, with their own backoff, until this many seconds were spent waiting for them; they
    use none of ``attempts``, which would give up within seconds. ``unavailable_wait``: the
    waits before retries of 5xx answers in one call stop short of this many seconds (a
    ``Retry-After`` past it ends the call: an ``ls`` does not hang for minutes)."""

    attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    retry_after_max: float = 60.0
    throttled_wait: float = 90.0
    unavailable_wait: float = 30.0

    def backoff(self, retry_number: int) -> float:
        """Exponential backoff with jitter for the ``retry_number``-th retry (1-based): a random
        delay between half and all of ``base * 2**(n-1)``, capped at ``backoff_max``."""
        ceiling = float(min(self.backoff_max, self.backoff_base * 2.0 ** (retry_number - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def delay(self, retry_number: int, retry_after: float | None) -> float:
        """The wait before a retry: the server's ``Retry-After`` (capped) when it sent a
        positive one, else the backoff."""
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self.retry_after_max)
        return self.backoff(retry_number)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


# ---------------------------------------------------------------------------------------------
# Error mapping


_PATH_TOKENS = re.compile(r"(?P<api>/api)/link/[^/?#]+|/key_[^/?#]+(?=/(?i:dicomweb)(?:$|[/?#]))")
"""Access tokens some servers take in the path instead of a header, in these two shapes only (a
dcm4chee AE title ``KEY_IMAGES`` is none): Kheops' "link URL" (``/api/link/{token}/studies``)
and LiteVNA's (``/key_{token}/dicomweb``)."""

TOKEN_SHOWN = "<token>"


def hide_path_tokens(text: str) -> str:
    """``text`` (an address, a URL or its path) with access tokens in its path replaced."""
    return _PATH_TOKENS.sub(lambda m: f"{m['api']}/link/{TOKEN_SHOWN}" if m["api"] else f"/key_{TOKEN_SHOWN}", text)


def without_path_tokens(path: str) -> str:
    """``path`` as if it held no access token: Kheops' ``/api/link/{token}`` is its ``/api``
    root, LiteVNA's ``/key_{token}/dicomweb`` its ``/dicomweb``."""
    return _PATH_TOKENS.sub(lambda m: m["api"] or "", path)


def safe_path(url: str) -> str:
    """The URL's path only: no scheme, host, credentials, query or fragment, and no access
    token a server takes in the path."""
    return hide_path_tokens(urlsplit(url).path or "/")


def _describe(method: str, url: str) -> str:
    return f"{method.upper()} {safe_path(url)}"


def _read_error_body(response: requests.Response) -> bytes:
    """At most a few KiB of an error response's body (it may be streamed)."""
    try:
        return next(response.iter_content(_ERROR_BODY_READ_LIMIT), b"")[:_ERROR_BODY_READ_LIMIT]
    except (requests.RequestException, urllib3.exceptions.HTTPError, RuntimeError):
        return b""


GOOGLE_ERROR_STATUSES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})
"""The canonical codes Google puts in ``error.status``: the only part of its error body shown."""

ORTHANC_ERRORS = {
    -1: "internal error",
    1: "plugin error",
    2: "not implemented",
    3: "parameter out of range",
    4: "not enough memory",
    5: "bad parameter type",
    6: "bad sequence of calls",
    7: "inexistent item",
    8: "bad request",
    9: "network protocol error",
    10: "system command error",
    11: "database error",
    12: "bad URI syntax",
    13: "inexistent file",
    14: "cannot write file",
    15: "bad file format",
    16: "timeout",
    17: "unknown resource",
    18: "incompatible database version",
    19: "storage full",
    20: "corrupted file",
    21: "inexistent tag",
    22: "read-only",
    23: "incompatible image format",
    24: "incompatible image size",
    25: "shared library error",
    26: "unknown plugin service",
    27: "unknown DICOM tag",
    28: "bad JSON",
    29: "unauthorized",
}
"""Orthanc's error codes (``OrthancStatus``) in our words; its ``Message``/``Details`` are never read."""


def _error_code_of(document: object) -> str | None:
    """The error code of a JSON error body, in our words: Google's ``error.status`` when it is
    one of the canonical codes, or Orthanc's ``OrthancStatus`` number (named when known).
    Every free-text field (``message``, ``Details``, ``Message``, ``OrthancError``…) is ignored."""
    if isinstance(document, list) and document:
        document = document[0]
    if not isinstance(document, dict):
        return None
    nested = document.get("error")
    if isinstance(nested, dict) and nested.get("status") in GOOGLE_ERROR_STATUSES:
        return str(nested["status"])
    code = document.get("OrthancStatus")
    if isinstance(code, int) and not isinstance(code, bool):
        meaning = ORTHANC_ERRORS.get(code)
        return f"Orthanc error {code}" + (f" ({meaning})" if meaning else "")
    return None


def server_error_detail(response: requests.Response) -> str | None:
    """The error code a 4xx answer's JSON body gives, in words that cannot hold patient data
    (see :func:`_error_code_of`), or None.

    A server's error text is untrusted: Orthanc, Google and others quote what they were sent
    (the refused instance's PatientName, a query's values) in their messages. So no message,
    plain-text, HTML or DICOM body is ever quoted, whatever its length. Orthanc sends its JSON
    error bodies without a Content-Type, so a body without one is tried as JSON."""
    if not 400 <= response.status_code < 500:
        return None
    media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not (
        media_type.endswith("+json") and "dicom" not in media_type
    ):
        return None
    body = _read_error_body(response)
    if not body.strip():
        return None
    try:
        return _error_code_of(json.loads(body))
    except ValueError:
        return None


def status_text(status: int) -> str:
    """``HTTP 404 Not Found``: the status with its standard phrase, never the server's own
    reason phrase (a status line is server text too)."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def error_for_response(
    method: str,
    url: str,
    response: requests.Response,
    *,
    bad_request: type[StoreError] = StoreError,
) -> StoreError:
    """The :class:`StoreError` for a final (non-retried) failed response.

    ``bad_request`` is the class for 400 (e.g. :class:`InvalidDicom` where the caller knows a
    400 means the server refused the DICOM content)."""
    status = response.status_code
    head = f"{_describe(method, url)}: {status_text(status)}"
    detail = server_error_detail(response)
    message = f"{head}: {detail}" if detail else head
    error_class: type[StoreError]
    if status == 400:
        error_class = bad_request
    elif status == 404 or status == 410:
        error_class = NotFound
    elif status == 409:
        error_class = AlreadyExists
    elif status in (401, 403):
        error_class = Forbidden
    elif status == 413:
        error_class = TooLarge
    elif status in RETRYABLE_STATUSES or status >= 500:
        error_class = Unavailable
    else:
        error_class = StoreError
    error = error_class(message)
    error.status = status
    return error


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """An exception, its arguments, causes and contexts, and urllib3's ``reason``s."""
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested.extend(arg for arg in current.args if isinstance(arg, BaseException))
        stack.extend(item for item in nested if isinstance(item, BaseException))


def no_answer(exc: BaseException) -> BaseException | None:
    """The transport failure an error is or wraps (google-auth's ``TransportError`` wraps one):
    no answer came at all (refused or dropped connection, unknown host, timeout), as opposed to
    an error answer; None when there is none. Such failures are what :func:`_transport_error`
    marks ``unreachable``."""
    return next((e for e in exception_chain(exc) if isinstance(e, _NO_ANSWER)), None)


_NO_ANSWER = (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, socket.gaierror)


def never_sent(exc: BaseException) -> bool:
    """True when the request failed before any byte went out (no connection was made), so even a
    non-idempotent request may be sent again."""
    return any(isinstance(e, urllib3.exceptions.ConnectTimeoutError) for e in exception_chain(exc))


def is_timeout(exc: BaseException) -> bool:
    """Whether a transport error is a server silent past the connect or read timeout (not a
    refused connection: urllib3's NewConnectionError derives from its ConnectTimeoutError)."""
    return any(
        isinstance(e, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError)
        and not isinstance(e, urllib3.exceptions.NewConnectionError)
        for e in exception_chain(exc)
    )


def _transport_error(method: str, url: str, exc: BaseException) -> Unavailable:
    silent = is_timeout(exc)
    if silent:
        what = "timed out"
    elif isinstance(exc, requests.ConnectionError):
        what = "connection failed"
    else:
        what = "transfer failed"
    error = Unavailable(f"{_describe(method, url)}: {what} ({type(exc).__name__})")
    error.timed_out = silent
    error.unreachable = True
    return error


class TransferCut(Unavailable):
    """An answer's body stopped before its end (a dropped connection, a read timeout, a short
    body): what arrived is right, the rest can be asked for again."""


@contextmanager
def body_errors(method: str, url: str) -> Iterator[None]:
    """Turn ``requests``/``urllib3`` errors raised while reading a streamed body into
    :class:`TransferCut` (a dropped connection, a read timeout, a short body)."""
    try:
        yield
    except StoreError:
        raise
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        cause = _transport_error(method, url, exc)
        cut = TransferCut(str(cause))
        cut.timed_out = cause.timed_out
        raise cut from exc


class InstanceChanged(StoreError):
    """A download asked for again after a cut found other bytes where the first attempt had
    read some: the instance was replaced on the server in between. The part read is of another
    version; joining the two would make a file that is neither."""


class ResumingSink:
    """A sink for a download that may be sent again from its start after a :class:`TransferCut`:
    bytes the real sink already holds are skipped, so it only ever sees each byte once, in order.
    The bytes skipped are checked against those delivered (a running Adler-32 of both): if the
    instance changed in between, :class:`InstanceChanged` is raised, never a file joined from
    two versions; :meth:`finish` raises it too when the new answer ends before them."""

    def __init__(self, sink: BinaryIO, what: str = "the instance") -> None:
        self.sink = sink
        self.what = what
        self.delivered = 0  # bytes the real sink holds
        self.received = 0  # bytes of the current attempt
        self._sum = 1  # Adler-32 of the delivered bytes
        self._resume_at = 0  # bytes delivered when this attempt started: the part to check
        self._sum_at_resume = 1
        self._check = 1  # Adler-32 of this attempt's bytes, up to _resume_at

    @property
    def path(self) -> object:
        """The real sink's file, if it is one (see ``dicomweb._check_whole``)."""
        return getattr(self.sink, "path", None)

    def restart(self) -> None:
        self.received = 0
        self._resume_at, self._sum_at_resume, self._check = self.delivered, self._sum, 1

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        view = memoryview(data)
        skip = min(n, max(0, self._resume_at - self.received))
        if skip:
            self._check = zlib.adler32(view[:skip], self._check)
            if self.received + skip == self._resume_at and self._check != self._sum_at_resume:
                raise self._changed()
        if skip < n:
            rest = view[skip:]
            write_all(self.sink, rest)
            self._sum = zlib.adler32(rest, self._sum)
            self.delivered += n - skip
        self.received += n
        return n

    def finish(self) -> int:
        """After an attempt that ended normally: the bytes delivered, or InstanceChanged when
        it ended before reaching what an earlier attempt had delivered (a shorter version)."""
        if self.received < self._resume_at:
            raise self._changed()
        return self.delivered

    def _changed(self) -> InstanceChanged:
        return InstanceChanged(f"{self.what} changed on the server while it was being downloaded (asked again "
                               f"after a cut at {self._resume_at} bytes, the server sent other bytes); read it again")

    def flush(self) -> None:
        self.sink.flush()


# ---------------------------------------------------------------------------------------------
# The client


class HttpClient:
    """Sends requests through one session with a timeout, bounded retries and error mapping.

    Thread-safe for concurrent requests (``requests`` sessions are, for this use: no cookie or
    header mutation after construction)."""

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_unauthorized: Callable[[requests.Response], bool] | None = None,
        forbidden_hint: str | None = None,
    ) -> None:
        self.session = session if session is not None else make_session()
        # Added to the message of a 403 (a missing permission): what the identity needs.
        self.forbidden_hint = forbidden_hint
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        # Called once per request with a 401 answer (e.g. to drop an access token the server
        # refused); when it returns True the request is sent once more, not counted as a retry.
        self.on_unauthorized = on_unauthorized

    def close(self) -> None:
        self.session.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        data: RequestBody = None,
        stream: bool = False,
        idempotent: bool | None = None,
        passthrough: Collection[int] = (),
        bad_request: type[StoreError] = StoreError,
        attempts: int | None = None,
        timeout: Timeout | None = None,
        forbidden_hint: str | None = None,
    ) -> requests.Response:
        """Send a request and return a successful (2xx) response, or one whose status is in
        ``passthrough``; raise the mapped :class:`StoreError` otherwise.

        Retries 408/429/5xx answers and transport errors when the request is idempotent
        (``idempotent=None`` decides by method); a non-idempotent request is only sent again when
        it never left (connection refused) or the server said it did nothing with it (429).
        ``attempts`` overrides the policy's count. A server silent past the timeout is asked
        once more, not for every attempt: a call never waits much longer than twice the timeout
        for a hung server. A 401 is sent once more when ``on_unauthorized`` says a new token may
        help. ``forbidden_hint`` replaces the client's hint for a 403 to this request."""
        method = method.upper()
        safe_to_repeat = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        max_attempts = max(1, attempts if attempts is not None else self.retry.attempts)
        reauthorized = False
        silent_before = False
        attempt = 0
        throttled = 0  # 429 answers so far
        throttled_waited = 0.0
        unavailable_waited = 0.0  # on 5xx and transport errors, bounded by the policy's unavailable_wait
        while True:
            attempt += 1
            last_try = attempt >= max_attempts
            body = data() if callable(data) else data
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    headers=dict(headers) if headers else None,
                    data=body,
                    stream=stream,
                    timeout=timeout if timeout is not None else self.timeout,
                )
            except requests.RequestException as exc:
                silent = is_timeout(exc)
                if last_try or not (safe_to_repeat or never_sent(exc)) or _hopeless(exc) or (silent and silent_before):
                    raise _transport_error(method, url, exc) from exc
                silent_before = silent_before or silent
                delay = self.retry.delay(attempt, None)
                self._wait(method, url, attempt, max_attempts, type(exc).__name__, delay)
                unavailable_waited += delay
                continue
            status = response.status_code
            if 200 <= status < 300 or status in passthrough:
                return response
            if status == 401 and not reauthorized and self.on_unauthorized is not None:
                reauthorized = True
                if self.on_unauthorized(response):
                    response.close()
                    logger.info("%s %s: HTTP 401, sending again with a new access token", method, safe_path(url))
                    attempt -= 1
                    continue
            repeatable = safe_to_repeat or status in NOT_PROCESSED_STATUSES
            if status == 429 and throttled_waited < self.retry.throttled_wait:
                throttled += 1
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                response.close()
                delay = min(self.retry.delay(throttled, retry_after), self.retry.throttled_wait - throttled_waited)
                throttled_waited += delay
                logger.info("%s %s: HTTP 429 (too many requests), retry in %.2f s (%.0f of %.0f s waited)",
                            method, safe_path(url), delay, throttled_waited, self.retry.throttled_wait)
                self._sleep(delay)
                attempt -= 1
                continue
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            delay = self.retry.delay(attempt, retry_after)
            if status in RETRYABLE_STATUSES and repeatable and not last_try \
                    and unavailable_waited + delay <= self.retry.unavailable_wait:
                # Not past the budget: a 503 with Retry-After 60 would hold one ls for 4 minutes.
                response.close()
                self._wait(method, url, attempt, max_attempts, f"HTTP {status}", delay)
                unavailable_waited += delay
                continue
            try:
                error = error_for_response(method, url, response, bad_request=bad_request)
                hint = forbidden_hint or self.forbidden_hint
                if status == 403 and hint:
                    error = type(error)(f"{error} ({hint})")
                    error.status = status
                raise error
            finally:
                response.close()
    def _wait(
        self,
        method: str,
        url: str,
        attempt: int,
        max_attempts: int,
        cause: str,
        delay: float,
    ) -> None:
        logger.info(
            "%s %s: %s, retry %d/%d in %.2f s",
            method,
            safe_path(url),
            cause,
            attempt,
            max_attempts - 1,
            delay,
        )
        if delay > 0:
            self._sleep(delay)


def _hopeless(exc: BaseException) -> bool:
    """Errors no retry can fix: bad URL, TLS verification failure."""
    return isinstance(
        exc,
        requests.exceptions.SSLError
        | requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema
        | requests.exceptions.InvalidHeader,
    )


# ---------------------------------------------------------------------------------------------
# Content-Type parsing


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``(media type, parameters)`` of a Content-Type header; quoted values are unquoted and
    parameter names lower-cased. An absent header gives ``("", {})``."""
    if not value:
        return "", {}
    message = email.message.Message()
    message["Content-Type"] = value
    params: dict[str, str] = {}
    for name, param_value in message.get_params(failobj=[])[1:]:
        if isinstance(param_value, tuple):  # RFC 2231 encoded
            param_value = email.utils.collapse_rfc2231_value(param_value)
        params[name.lower()] = str(param_value)
    return message.get_content_type(), params


# ---------------------------------------------------------------------------------------------
# Streaming multipart/related reader


class MultipartReader:
    """An incremental ``multipart/related`` parser that writes the *first* part's body to a sink.

    Feed it the response body in chunks of any size; the part's body goes to ``sink`` as it
    arrives, minus a tail no longer than the delimiter (kept until the next chunk shows whether it
    starts a boundary). Later parts and the epilogue are read and dropped. :meth:`finish` raises
    :class:`Unavailable` if the stream ended before the closing boundary.

    Per RFC 2046 the delimiter is CRLF ``--boundary``: the CRLF before it belongs to the
    delimiter, not the body. The first boundary may start the stream without a CRLF, so the
    reader behaves as if the stream began with one.
    """

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)
    MAX_HEADER_BYTES = 64 * 1024
    MAX_PADDING_BYTES = 1024

    def __init__(
        self,
        boundary: str,
        sink: BinaryIO,
        on_first_part: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        """``on_first_part`` gets the first part's headers before any of its body is written; an
        exception it raises comes out of :meth:`feed`."""
        if not boundary or len(boundary) > 200:
            raise StoreError("multipart response with an invalid boundary")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._sink = sink
        self._on_first_part = on_first_part
        self._buffer = bytearray(b"\r\n")
        self._state = self._PREAMBLE
        self._part_index = -1
        self._part_headers: dict[str, str] = {}
        self._in_body_state = self._PREAMBLE  # the state a delimiter search runs in
        self.written = 0
        """Bytes of the first part's body written to the sink so far."""
        self.parts = 0
        """Parts seen so far (their headers were read)."""

    @property
    def done(self) -> bool:
        """True once the closing boundary was read."""
        return self._state == self._DONE

    @property
    def first_part_headers(self) -> Mapping[str, str]:
        """The first part's headers (names lower-cased), once read."""
        return self._part_headers

    def feed(self, chunk: bytes) -> None:
        """Consume one chunk of the stream."""
        if self._state == self._DONE or not chunk:
            return
        self._buffer += chunk
        progressing = True
        while progressing and self._state != self._DONE:
            progressing = self._step()

    def finish(self) -> int:
        """Check the stream was complete; return the bytes written."""
        if self._state != self._DONE:
            raise TransferCut("multipart response ended before its closing boundary (truncated)")
        if self.parts == 0:
            raise StoreError("multipart response without any part")
        self._check_part_length()
        return self.written

    # -- the state machine; each step returns whether it consumed input --------------------------

    def _step(self) -> bool:
        if self._state in (self._PREAMBLE, self._BODY):
            return self._scan_for_delimiter()
        if self._state == self._AFTER_DELIMITER:
            return self._read_after_delimiter()
        return self._read_headers()

    def _scan_for_delimiter(self) -> bool:
        index = self._buffer.find(self._delimiter)
        if index < 0:
            keep = len(self._delimiter) - 1
            self._emit(max(0, len(self._buffer) - keep))
            return False
        self._emit(index)
        self._in_body_state = self._state
        self._state = self._AFTER_DELIMITER
        return True

    def _read_after_delimiter(self) -> bool:
        """After ``CRLF--boundary``: ``--`` closes, optional padding then CRLF opens a part;
        anything else means the bytes were data that merely looked like a delimiter."""
        buffer, start = self._buffer, len(self._delimiter)
        if len(buffer) < start + 2:
            return False
        if buffer[start : start + 2] == b"--":
            self._close_part()
            self._state = self._DONE
            self._buffer = bytearray()
            return True
        position = start
        while position < len(buffer) and buffer[position] in b" \t":
            position += 1
        if position - start > self.MAX_PADDING_BYTES:
            raise StoreError("malformed multipart response (boundary line too long)")
        if len(buffer) < position + 2:
            return False
        if buffer[position : position + 2] != b"\r\n":
            self._not_a_delimiter()
            return True
        self._close_part()
        del self._buffer[: position + 2]
        self._state = self._HEADERS
        return True

    def _not_a_delimiter(self) -> None:
        """The delimiter-like bytes were content: emit them (in a body) and scan on."""
        self._state = self._in_body_state
        self._emit(len(self._delimiter))

    def _read_headers(self) -> bool:
        if self._buffer.startswith(b"\r\n"):
            header_bytes, end = b"", 2
        else:
            index = self._buffer.find(b"\r\n\r\n")
            if index < 0:
                if len(self._buffer) > self.MAX_HEADER_BYTES:
                    raise StoreError("malformed multipart response (part headers too long)")
                return False
            header_bytes, end = bytes(self._buffer[:index]), index + 4
        self.parts += 1
        self._part_index += 1
        if self._part_index == 0:
            self._part_headers = _parse_part_headers(header_bytes)
            if self._on_first_part is not None:
                self._on_first_part(self._part_headers)
        del self._buffer[:end]
        self._state = self._BODY
        return True

    def _emit(self, count: int) -> None:
        """Consume ``count`` bytes from the buffer's start, writing them to the sink if they
        are the first part's body."""
        if count <= 0:
            return
        if self._state == self._BODY and self._part_index == 0:
            with memoryview(self._buffer) as view, view[:count] as part:
                write_all(self._sink, part)
            self.written += count
        del self._buffer[:count]

    def _close_part(self) -> None:
        if self._in_body_state == self._BODY and self._part_index == 0:
            self._check_part_length()

    def _check_part_length(self) -> None:
        declared = self._part_headers.get("content-length")
        if declared is None or not declared.strip().isdigit():
            return
        if int(declared) != self.written:
            raise Unavailable(f"multipart part holds {self.written} bytes but declares Content-Length {declared}")


def _parse_part_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers
