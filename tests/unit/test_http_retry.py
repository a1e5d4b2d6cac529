"""HttpClient against a real local HTTP server: retries, backoff, Retry-After, timeouts, errors."""

from __future__ import annotations

import email.utils
import json
import socket
from collections.abc import Iterator

import pytest

from dicomfuse.stores.base import (
    AlreadyExists,
    Forbidden,
    InvalidDicom,
    NotFound,
    StoreError,
    TooLarge,
    Unavailable,
)
from dicomfuse.stores.http import (
    HttpClient,
    RetryPolicy,
    error_for_response,
    make_session,
    never_sent,
    parse_retry_after,
    server_error_detail,
)
from tests.conftest import PATIENT_NAME
from tests.fakes.http_server import LoopbackServer, Reply, Seen


class ScriptedServer(LoopbackServer):
    """Answers each request with the next scripted :class:`Reply` (the last one repeats)."""

    def __init__(self) -> None:
        super().__init__(self._next)
        self.replies: list[Reply] = [Reply()]

    @property
    def url(self) -> str:
        return self.base_url

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies = list(replies)
        self.clear()

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    yield scripted
    scripted.stop()


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def client(sleeps: RecordingSleep) -> Iterator[HttpClient]:
    http = HttpClient(
        make_session(pool_size=4),
        timeout=(2, 5),
        retry=RetryPolicy(attempts=4, backoff_base=0.01, backoff_max=0.04, retry_after_max=5),
        sleep=sleeps,
    )
    yield http
    http.close()


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_get_retries_transient_statuses(server: ScriptedServer, client: HttpClient, status: int) -> None:
    server.script(Reply(status), Reply(status), Reply(200, b"finally"))
    response = client.request("GET", f"{server.url}/thing")
    assert response.status_code == 200
    assert response.content == b"finally"
    assert len(server.seen) == 3


def test_backoff_grows_and_is_capped(server: ScriptedServer, client: HttpClient, sleeps: RecordingSleep) -> None:
    server.script(Reply(503))
    with pytest.raises(Unavailable):
        client.request("GET", f"{server.url}/down")
    assert len(server.seen) == 4  # bounded attempts
    assert len(sleeps.delays) == 3
    first, second, third = sleeps.delays
    assert 0.005 <= first <= 0.01
    assert 0.01 <= second <= 0.02
    assert 0.02 <= third <= 0.04


def test_retry_after_seconds_is_honoured_and_capped(
    server: ScriptedServer, client: HttpClient, sleeps: RecordingSleep
) -> None:
    server.script(
        Reply(429, headers={"Retry-After": "3"}),
        Reply(503, headers={"Retry-After": "120"}),
        Reply(200),
    )
    assert client.request("GET", f"{server.url}/busy").status_code == 200
    assert sleeps.delays == [3.0, 5.0]


def test_a_5xx_retry_after_is_waited_only_within_the_calls_budget(server: ScriptedServer,
                                                                   sleeps: RecordingSleep) -> None:
    """A server answering every request 503 with Retry-After 60: one ls waited 4 minutes (4
    retries of 60 s) whatever --httpTimeout said. The waits stop short of unavailable_wait:
    the call ends with the error instead of waiting past it."""
    http = HttpClient(make_session(pool_size=4), timeout=(2, 5), retry=RetryPolicy(), sleep=sleeps)
    try:
        server.script(Reply(503, headers={"Retry-After": "12"}))
        with pytest.raises(Unavailable):
            http.request("GET", f"{server.url}/maintenance")
        assert sleeps.delays == [12.0, 12.0] and len(server.seen) == 3  # a third wait would pass 30 s
        server.script(Reply(503, headers={"Retry-After": "60"}))
        sleeps.delays.clear()
        with pytest.raises(Unavailable):
            http.request("GET", f"{server.url}/maintenance")
        assert sleeps.delays == []  # longer than the whole budget: said at once
    finally:
        http.close()


def test_a_quota_exceeded_is_waited_out_beyond_the_attempts(server: ScriptedServer, client: HttpClient,
                                                             sleeps: RecordingSleep) -> None:
    """429 (Google's per-minute quotas): retried with its own growing backoff for up to
    ``throttled_wait`` seconds of waiting, not given up after the few ``attempts`` (4 here)."""
    server.script(*[Reply(429)] * 9, Reply(200, b"served"))
    assert client.request("GET", f"{server.url}/quota").content == b"served"
    assert len(server.seen) == 10
    assert sleeps.delays[0] <= 0.01 and sleeps.delays[-1] >= 0.02  # grows (capped at backoff_max)


def test_a_quota_never_restored_fails_once_its_wait_is_spent(server: ScriptedServer, sleeps: RecordingSleep) -> None:
    http = HttpClient(make_session(pool_size=1), timeout=(2, 5), sleep=sleeps,
                      retry=RetryPolicy(attempts=2, backoff_base=1, backoff_max=4, throttled_wait=10))
    server.script(Reply(429))
    with pytest.raises(StoreError):
        http.request("POST", f"{server.url}/busy", data=b"x")
    throttled = sleeps.delays[:-1]  # then one ordinary retry (attempts=2)
    assert sum(throttled) == pytest.approx(10)
    assert len(server.seen) == len(sleeps.delays) + 1
    http.close()


def test_retry_after_http_date(server: ScriptedServer, client: HttpClient, sleeps: RecordingSleep) -> None:
    server.script(Reply(503, headers={"Retry-After": email.utils.formatdate(0, usegmt=True)}), Reply(200))
    assert client.request("GET", f"{server.url}/busy").status_code == 200
    assert len(sleeps.delays) == 1  # a date in the past: the usual backoff
    assert 0.005 <= sleeps.delays[0] <= 0.01


def test_parse_retry_after() -> None:
    now = 1_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None


def test_post_is_not_retried_unless_safe(server: ScriptedServer, client: HttpClient) -> None:
    server.script(Reply(503))
    with pytest.raises(Unavailable, match=r"POST /stow: HTTP 503"):
        client.request("POST", f"{server.url}/stow", data=b"x")
    assert len(server.seen) == 1

    server.script(Reply(503), Reply(200))
    assert client.request("POST", f"{server.url}/lookup", data=b"x", idempotent=True).status_code == 200
    assert len(server.seen) == 2


def test_body_factory_is_called_per_attempt(server: ScriptedServer, client: HttpClient) -> None:
    server.script(Reply(502), Reply(200))
    calls: list[int] = []

    def body() -> bytes:
        calls.append(1)
        return b"payload"

    client.request("PUT", f"{server.url}/put", data=body)
    assert len(calls) == 2
    assert [s.body for s in server.seen] == [b"payload", b"payload"]


def test_dropped_connection_is_retried_for_get(server: ScriptedServer, client: HttpClient) -> None:
    server.script(Reply(drop=True), Reply(200, b"ok"))
    assert client.request("GET", f"{server.url}/flaky").content == b"ok"
    assert len(server.seen) == 2


def test_dropped_connection_fails_a_post_at_once(server: ScriptedServer, client: HttpClient) -> None:
    server.script(Reply(drop=True), Reply(200))
    with pytest.raises(Unavailable, match="POST /stow: connection failed"):
        client.request("POST", f"{server.url}/stow", data=b"x")
    assert len(server.seen) == 1


def test_read_timeout_is_retried_then_unavailable(server: ScriptedServer, sleeps: RecordingSleep) -> None:
    server.script(Reply(stall=True))
    http = HttpClient(timeout=(2, 0.2), retry=RetryPolicy(attempts=2, backoff_base=0.01), sleep=sleeps)
    try:
        with pytest.raises(Unavailable, match="GET /slow: timed out"):
            http.request("GET", f"{server.url}/slow?token=secret")
    finally:
        http.close()
    assert len(server.seen) == 2
    assert len(sleeps.delays) == 1


def test_a_silent_server_is_asked_once_more_not_for_every_attempt(server: ScriptedServer,
                                                                  sleeps: RecordingSleep) -> None:
    server.script(Reply(stall=True), Reply(stall=True), Reply(stall=True))
    http = HttpClient(timeout=(2, 0.2), retry=RetryPolicy(attempts=5, backoff_base=0.01), sleep=sleeps)
    try:
        with pytest.raises(Unavailable, match="timed out") as caught:
            http.request("GET", f"{server.url}/slow")
    finally:
        http.close()
    assert caught.value.timed_out and caught.value.unreachable
    assert len(server.seen) == 2 and len(sleeps.delays) == 1


def test_connection_refused_retries_even_a_post(sleeps: RecordingSleep) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Windows answers a refused loopback connect only after ~2 s of SYN retries: a 2 s connect
    # timeout would race it (and turn the refusal into a timeout); Linux and macOS refuse at once.
    http = HttpClient(timeout=(10, 2), retry=RetryPolicy(attempts=3, backoff_base=0.01), sleep=sleeps)
    try:
        with pytest.raises(Unavailable, match="POST /studies: connection failed") as caught:
            http.request("POST", f"http://127.0.0.1:{port}/studies", data=b"x")
    finally:
        http.close()
    assert len(sleeps.delays) == 2  # it never left, so the POST was tried three times
    assert caught.value.__cause__ is not None and never_sent(caught.value.__cause__)


# -- error mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, NotFound),
        (409, AlreadyExists),
        (401, Forbidden),
        (403, Forbidden),
        (413, TooLarge),
        (400, StoreError),
        (418, StoreError),
    ],
)
def test_status_mapping(server: ScriptedServer, client: HttpClient, status: int, error: type) -> None:
    server.script(Reply(status, b""))
    with pytest.raises(error) as caught:
        client.request("GET", f"{server.url}/studies/1.2.3")
    assert type(caught.value) is error
    assert f"GET /studies/1.2.3: HTTP {status}" in str(caught.value)
    assert len(server.seen) == 1  # 4xx are final


def test_400_is_invalid_dicom_only_when_the_caller_says_so(server: ScriptedServer, client: HttpClient) -> None:
    orthanc = {"HttpStatus": 400, "Message": "Bad file format", "OrthancError": "Bad file format", "OrthancStatus": 15}
    server.script(Reply(400, json.dumps(orthanc).encode(), {"Content-Type": "application/json"}))
    expected = r"^POST /studies: HTTP 400 Bad Request: Orthanc error 15 \(bad file format\)$"
    with pytest.raises(InvalidDicom, match=expected):
        client.request("POST", f"{server.url}/studies", data=b"x", bad_request=InvalidDicom)


def test_passthrough_statuses_are_returned(server: ScriptedServer, client: HttpClient) -> None:
    server.script(Reply(405, b""))
    assert client.request("DELETE", f"{server.url}/x", passthrough=(405,)).status_code == 405


def test_messages_hide_query_host_auth_and_bodies(server: ScriptedServer, client: HttpClient) -> None:
    secret_url = f"http://user:pw@127.0.0.1:{server.httpd.server_address[1]}/studies?access_token=tok123"
    server.script(Reply(403, b"<html>Patient Doe^John</html>", {"Content-Type": "text/html"}))
    with pytest.raises(Forbidden) as caught:
        client.request("GET", secret_url, headers={"Authorization": "Bearer tok456"})
    message = str(caught.value)
    assert message.startswith("GET /studies: HTTP 403")
    for leak in ("tok123", "tok456", "user", "pw@", "127.0.0.1", "Doe", "html"):
        assert leak not in message


ECHOED = f"Cannot store: PatientName '{PATIENT_NAME}' does not match PatientID 123"
"""A server's error text quoting the DICOM content it was sent."""


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (json.dumps({"Message": ECHOED}), "application/json"),
        (json.dumps({"Details": ECHOED, "HttpStatus": 400, "Message": ECHOED, "OrthancError": ECHOED}), ""),
        (json.dumps({"error": {"code": 400, "message": ECHOED, "status": "INVALID_ARGUMENT"}}), "application/json"),
        (json.dumps([{"error": {"code": 400, "message": ECHOED, "status": PATIENT_NAME}}]), "application/json"),
        (json.dumps({"message": ECHOED, "detail": ECHOED, "error_description": ECHOED}), "application/problem+json"),
        (json.dumps({"error": ECHOED}), "application/json"),
        (ECHOED, "text/plain"),
        (ECHOED, ""),
        (f"<html>{ECHOED}</html>", "text/html"),
        (json.dumps({"00081198": {"vr": "SQ", "Value": [{"00091097": {"vr": "LT", "Value": [ECHOED]}}]}}),
         "application/dicom+json"),
    ],
    ids=["json-message", "orthanc", "google", "google-odd-status", "problem-json", "json-error", "text",
         "no-content-type", "html", "dicom-json"],
)
def test_server_error_text_is_never_quoted(server: ScriptedServer, client: HttpClient, body: str,
                                           content_type: str) -> None:
    """Servers echo what they were sent in their error messages: a 4xx body's text reaches no
    exception message, at any length or in any shape; only the status and error codes do."""
    headers = {"Content-Type": content_type} if content_type else {}
    server.script(Reply(400, body.encode(), headers))
    with pytest.raises(InvalidDicom) as caught:
        client.request("POST", f"{server.url}/studies", data=b"x", bad_request=InvalidDicom)
    message = str(caught.value)
    assert message.startswith("POST /studies: HTTP 400 Bad Request")
    for leak in (PATIENT_NAME, *PATIENT_NAME.split("^"), "Cannot store", "PatientID"):
        assert leak not in message


def test_the_servers_reason_phrase_is_not_quoted() -> None:
    """A status line is server text too: the standard phrase is shown instead of the server's."""
    import io

    import requests

    response = requests.Response()
    response.status_code, response.reason = 409, f"Conflict with {PATIENT_NAME}"
    response.raw = io.BytesIO(b"")
    message = str(error_for_response("POST", "http://h/studies", response))
    assert message == "POST /studies: HTTP 409 Conflict"
    response = requests.Response()
    response.status_code, response.reason = 499, PATIENT_NAME
    response.raw = io.BytesIO(b"")
    assert str(error_for_response("GET", "http://h/x", response)) == "GET /x: HTTP 499"


def test_server_errors_never_quote_5xx_bodies(server: ScriptedServer, client: HttpClient) -> None:
    server.script(Reply(500, b"internal: patient Doe", {"Content-Type": "text/plain"}))
    with pytest.raises(Unavailable) as caught:
        client.request("GET", f"{server.url}/boom")
    assert "Doe" not in str(caught.value)
    assert len(server.seen) == 4


def test_only_error_codes_are_kept_from_error_bodies(server: ScriptedServer) -> None:
    import requests

    def answer(status: int, body: bytes, content_type: str = "application/json") -> requests.Response:
        server.script(Reply(status, body, {"Content-Type": content_type} if content_type else {}))
        return requests.get(f"{server.url}/x", timeout=5)

    google = json.dumps({"error": {"code": 409, "message": "instance exists", "status": "ALREADY_EXISTS"}})
    assert server_error_detail(answer(409, google.encode())) == "ALREADY_EXISTS"
    assert server_error_detail(answer(409, f"[{google}]".encode())) == "ALREADY_EXISTS"  # Google's list form
    odd = json.dumps({"error": {"code": 400, "message": "m", "status": "NOT_A_GOOGLE_CODE"}})
    assert server_error_detail(answer(400, odd.encode())) is None
    # Orthanc: its error code, in our words, never its Message/Details/OrthancError text.
    orthanc = {"HttpStatus": 404, "Message": "m", "OrthancError": "Unknown resource", "OrthancStatus": 17}
    assert server_error_detail(answer(404, json.dumps(orthanc).encode(), "")) == "Orthanc error 17 (unknown resource)"
    orthanc["OrthancStatus"] = 4711
    assert server_error_detail(answer(404, json.dumps(orthanc).encode(), "")) == "Orthanc error 4711"
    orthanc["OrthancStatus"] = "17"
    assert server_error_detail(answer(404, json.dumps(orthanc).encode(), "")) is None
    assert server_error_detail(answer(400, b"bad request", "text/plain")) is None
    assert server_error_detail(answer(400, b'{"00081198": {}}', "application/dicom+json")) is None
    assert server_error_detail(answer(503, google.encode())) is None  # 5xx bodies are not read


def test_make_session_pools_and_ca_bundle(tmp_path: object) -> None:
    session = make_session(pool_size=7, ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    adapter = session.get_adapter("https://example.org")
    assert adapter._pool_maxsize == 7  # type: ignore[attr-defined]
    assert adapter.max_retries.total == 0  # type: ignore[attr-defined]
    assert session.verify == "/etc/ssl/certs/ca-certificates.crt"
    session.close()


def test_resuming_sink_gives_each_byte_once_across_attempts():
    import io

    from dicomfuse.stores.http import ResumingSink

    out = io.BytesIO()
    sink = ResumingSink(out)
    sink.write(b"abc")
    sink.write(b"de")  # the answer is cut here, after 5 bytes
    sink.restart()  # asked again from the start
    sink.write(b"ab")
    sink.write(b"cdefg")
    sink.write(b"h")
    assert out.getvalue() == b"abcdefgh" and sink.delivered == 8
    assert sink.finish() == 8


@pytest.mark.parametrize("second", [[b"aXcdefgh"], [b"abcdX", b"fgh"], [b"abc"]],
                         ids=["other bytes", "other at the cut", "shorter"])
def test_a_resumed_download_of_an_instance_replaced_meanwhile_is_never_joined(second: list[bytes]):
    """Asked again after a cut, the server sent another version (replaced by another client):
    the part read first was kept and the rest of the new one added, and cp exited 0 with a file
    that was neither. Each byte skipped is checked against what was delivered."""
    import io

    from dicomfuse.stores.http import InstanceChanged, ResumingSink

    out = io.BytesIO()
    sink = ResumingSink(out)
    sink.write(b"abcde")  # cut after 5 bytes
    sink.restart()
    with pytest.raises(InstanceChanged, match="changed on the server while it was being downloaded"):
        for chunk in second:
            sink.write(chunk)
        sink.finish()
    assert out.getvalue() == b"abcde"  # nothing of the other version was added


def test_tls_verification_is_always_on_and_a_ca_bundle_only_adds_trust(tmp_path):  # type: ignore[no-untyped-def]
    from dicomfuse.stores.http import make_session

    assert make_session().verify is True
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert make_session(ca_bundle=ca).verify == str(ca)
