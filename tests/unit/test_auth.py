"""Access tokens: one refresh at a time, refreshed ahead of expiry without making requests wait,
a 401 answered with one new token, google-auth failures mapped to store errors."""

from __future__ import annotations

import datetime
import logging
import sys
import threading
import time

import google.auth.exceptions
import pytest

from dicomfuse.stores.auth import BearerAuth, TokenSource
from dicomfuse.stores.base import Forbidden, Unavailable
from dicomfuse.stores.http import HttpClient, RetryPolicy
from tests.fakes.http_server import LoopbackServer, Reply, Seen

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


class FakeCredentials:
    """Stands in for google-auth credentials: ``refresh`` issues token N with ``lifetime`` s."""

    def __init__(self, clock: Clock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None
        self.issued = 0
        self.gate = threading.Event()
        self.gate.set()
        self.error: Exception | None = None

    def refresh(self) -> None:
        self.gate.wait(10)
        if self.error is not None:
            raise self.error
        self.issued += 1
        self.token = f"token-{self.issued}"
        self.expiry = self.clock() + datetime.timedelta(seconds=self.lifetime)

    def apply(self, headers: dict[str, str], token: str | None = None) -> None:
        headers["authorization"] = f"Bearer {token or self.token}"


def source(lifetime: float = 3600.0) -> tuple[TokenSource, FakeCredentials, Clock]:
    clock = Clock()
    creds = FakeCredentials(clock, lifetime)
    return TokenSource(creds, refresh=creds.refresh, now=clock), creds, clock


def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_first_token_is_fetched_once_for_many_waiting_threads() -> None:
    tokens, creds, _ = source()
    creds.gate.clear()
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(tokens.token())) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert got == []  # no token yet: they wait
    creds.gate.set()
    for t in threads:
        t.join(5)
    assert got == ["token-1"] * 8
    assert creds.issued == 1


def test_fresh_token_is_reused_without_refresh() -> None:
    tokens, creds, clock = source()
    assert tokens.token() == "token-1"
    clock.advance(3000)  # 600 s left of 3600: still fresh (the margin is 300 s)
    assert tokens.token() == "token-1"
    assert creds.issued == 1


def test_token_near_expiry_is_refreshed_in_the_background_while_requests_go_on() -> None:
    tokens, creds, clock = source()
    tokens.token()
    clock.advance(3400)  # 200 s left: stale, not expired
    creds.gate.clear()  # the background refresh hangs
    started = time.monotonic()
    assert tokens.token() == "token-1"  # answered at once with the old token
    assert tokens.token() == "token-1"
    assert time.monotonic() - started < 1.0
    creds.gate.set()
    wait_until(lambda: creds.issued == 2)
    assert tokens.token() == "token-2"
    assert creds.issued == 2  # one background refresh, not one per call


def test_short_lived_tokens_scale_the_margins() -> None:
    tokens, creds, clock = source(lifetime=10)
    tokens.token()
    clock.advance(4)  # 6 of 10 s left: fresh (stale below half the lifetime)
    tokens.token()
    assert creds.issued == 1
    clock.advance(2)  # 4 s left: stale, refreshed in the background
    creds.gate.clear()
    assert tokens.token() == "token-1"
    creds.gate.set()
    wait_until(lambda: creds.issued == 2)


def test_expired_token_makes_the_caller_wait_for_a_new_one() -> None:
    tokens, creds, clock = source()
    tokens.token()
    clock.advance(3600 - 5)  # less than the expiry margin left: never sent
    assert tokens.token() == "token-2"
    assert creds.issued == 2


def test_invalidate_drops_only_the_token_that_was_refused() -> None:
    tokens, creds, _ = source()
    tokens.token()
    assert tokens.invalidate("token-0")  # an older token: nothing to drop
    assert tokens.token() == "token-1"
    assert tokens.invalidate("token-1")
    assert tokens.token() == "token-2"


def test_refresh_errors_become_store_errors_without_the_token() -> None:
    tokens, creds, _ = source()
    answer = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
    creds.error = google.auth.exceptions.RefreshError("invalid_grant: Invalid JWT Signature.", answer)
    with pytest.raises(Forbidden, match="invalid_grant"):
        tokens.token()
    creds.error = google.auth.exceptions.TransportError("connection refused")
    with pytest.raises(Unavailable, match="token service"):
        tokens.token()
    # google-auth's verdict after its own retries of a 5xx: an outage, not a refusal
    creds.error = google.auth.exceptions.RefreshError({"error": "server_error"}, retryable=True)
    with pytest.raises(Unavailable, match="token service is unavailable") as raised:
        tokens.token()
    assert not isinstance(raised.value, Forbidden)


def test_a_metadata_server_that_does_not_answer_is_unreachable_not_a_refusal() -> None:
    """On a VM, google-auth wraps the metadata server's transport error in a RefreshError: an
    outage (EIO, write-back waits), not refused credentials (EACCES)."""
    import requests

    tokens, creds, _ = source()
    dropped = requests.ConnectionError("Connection aborted.")
    transport = google.auth.exceptions.TransportError(dropped)
    transport.__cause__ = dropped
    creds.error = google.auth.exceptions.RefreshError(transport)
    creds.error.__cause__ = transport
    with pytest.raises(Unavailable, match="could not reach Google's token service") as raised:
        tokens.token()
    assert raised.value.unreachable and not isinstance(raised.value, Forbidden)
    # the metadata server answered, with an error: unavailable, but it was reached
    answered = google.auth.exceptions.TransportError("Failed to retrieve token. Response status: 500")
    creds.error = google.auth.exceptions.RefreshError(answered)
    creds.error.__cause__ = answered
    with pytest.raises(Unavailable, match="token service is unavailable") as raised:
        tokens.token()
    assert not raised.value.unreachable and not isinstance(raised.value, Forbidden)


@pytest.mark.parametrize(("args", "retryable", "message"), [
    # google-auth's error for a Google API error body: "{'code': 500, …}: None" and the answer
    (("{'code': 500, 'message': 'Internal error encountered.', 'status': 'INTERNAL'}: None",
      {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}), True,
     "Google's token service is unavailable: INTERNAL"),
    (("invalid_grant: None", {"error": "invalid_grant"}), False,
     "could not get a Google access token: invalid_grant (the key was refused: deleted or disabled, or this "
     "machine's clock is wrong)"),
    # the token service's own words are never quoted: a proxy or private endpoint may echo the
    # request (its signed assertion is a credential) or anything else
    (("invalid_grant: ZEBRA^SECRET assertion=eyJhbGciOiJSUzI1NiJ9.e30.sig",
      {"error": "invalid_grant", "error_description": "ZEBRA^SECRET assertion=eyJhbGciOiJSUzI1NiJ9.e30.sig"}),
     False, "could not get a Google access token: invalid_grant (the key was refused: deleted or disabled, or this "
     "machine's clock is wrong)"),
    (("Bad Request for ZEBRA^SECRET: assertion=eyJhbGciOiJSUzI1NiJ9.e30.sig",
      "Bad Request for ZEBRA^SECRET: assertion=eyJhbGciOiJSUzI1NiJ9.e30.sig"), False,
     "could not get a Google access token (RefreshError)"),
    (("upstream failed ZEBRA^SECRET",), True, "Google's token service is unavailable (RefreshError)"),
    (("{'error': 'ZEBRA^SECRET'}", {"error": "ZEBRA^SECRET"}), False,
     "could not get a Google access token (RefreshError)"),
    (("{'error': {'message': 'ZEBRA^SECRET', 'status': 'ZEBRA^SECRET'}}",
      {"error": {"message": "ZEBRA^SECRET", "status": "ZEBRA^SECRET"}}), True,
     "Google's token service is unavailable (RefreshError)"),
    (("<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>",), True,
     "Google's token service is unavailable (RefreshError)"),
    # an answer without "error": google-auth dumps all of it
    (('{"access_token": "ya29.secret", "weird": 1}', {"access_token": "ya29.secret", "weird": 1}), False,
     "could not get a Google access token (RefreshError)"),
    (("No access token in response.", {"id_token": "eyJ.secret"}), False,
     "could not get a Google access token: No access token in response."),
])
def test_refresh_errors_read_as_one_clean_line(args: tuple[object, ...], retryable: bool, message: str) -> None:
    tokens, creds, _ = source()
    creds.error = google.auth.exceptions.RefreshError(*args, retryable=retryable)
    with pytest.raises(Unavailable if retryable else Forbidden) as raised:
        tokens.token()
    assert str(raised.value) == message


def test_failed_background_refresh_keeps_the_old_token_and_tries_again(caplog: pytest.LogCaptureFixture) -> None:
    tokens, creds, clock = source()
    tokens.token()
    clock.advance(3400)
    creds.error = google.auth.exceptions.TransportError("down")
    assert tokens.token() == "token-1"
    wait_until(lambda: "Background token refresh failed" in caplog.text)
    creds.error = None
    wait_until(lambda: not tokens._refreshing)
    creds.gate.clear()
    assert tokens.token() == "token-1"  # still stale: a new background refresh starts
    creds.gate.set()
    wait_until(lambda: creds.issued == 2)


def test_a_401_is_sent_once_more_with_a_new_token_then_final() -> None:
    tokens, creds, _ = source()
    refused = {"Bearer token-1"}

    def respond(seen: Seen) -> Reply:
        auth = seen.headers.get("authorization") or seen.headers.get("Authorization")
        if auth in refused or seen.path.startswith("/always"):
            return Reply(401, b'{"error": {"code": 401, "message": "no", "status": "UNAUTHENTICATED"}}',
                         {"Content-Type": "application/json"})
        return Reply(200, b"[]")

    server = LoopbackServer(respond)
    try:
        auth = BearerAuth(tokens)
        client = HttpClient(retry=RetryPolicy(attempts=1), on_unauthorized=auth.unauthorized)
        client.session.auth = auth
        response = client.request("POST", f"{server.base_url}/ok", data=b"body", idempotent=False)
        assert response.status_code == 200
        sent = [s.headers.get("authorization") or s.headers.get("Authorization") for s in server.seen]
        assert sent == ["Bearer token-1", "Bearer token-2"]
        assert [s.body for s in server.seen] == [b"body", b"body"]
        server.clear()
        with pytest.raises(Forbidden, match="HTTP 401"):
            client.request("GET", f"{server.base_url}/always")
        assert len(server.seen) == 2  # one new token, then the answer stands
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="no group/other mode bits on Windows: the check is POSIX-only")
def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from dicomfuse.stores.auth import load_credentials
    from tests.fakes.healthcare import HealthcareStandIn

    with HealthcareStandIn() as standin:
        key = standin.write_key_file(tmp_path / "key.json")
    key.chmod(0o600)
    load_credentials(key)
    assert "readable by other users" not in caplog.text
    key.chmod(0o644)
    load_credentials(key)
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


@pytest.mark.parametrize(("content", "expected"), [
    (None, "names {path}, which does not exist"),
    ("{not json", "file {path} is not a JSON key file"),
    ("[1, 2]", "file {path} is not a JSON key file"),
    ("folder", "names {path}, which cannot be read"),
    ('{"type": "service_account", "client_email": "x@y"}', "file {path} is not a usable key: .*missing fields"),
    # google-auth quotes a value it cannot convert: here the private key's lines
    ('{"type": "service_account", "client_email": "x@y", "token_uri": "https://t", '
     '"private_key": ["-----BEGIN PRIVATE KEY-----", "SECRETKEYMATERIAL"]}',
     "file {path} is not a usable key: Failed to load service account credentials"),
])
def test_a_bad_google_application_credentials_file_is_named(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                             content: str | None, expected: str) -> None:  # type: ignore[no-untyped-def]
    """google-auth's 'File … was not found.' was dropped for 'no Google credentials found: run gcloud
    auth application-default login …', which sends the user the wrong way."""
    import re

    from dicomfuse.stores.auth import CredentialsError, load_credentials

    path = tmp_path / "typo-key.json"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    with pytest.raises(CredentialsError) as raised:
        load_credentials()
    message = str(raised.value)
    assert re.search("GOOGLE_APPLICATION_CREDENTIALS " + expected.format(path=re.escape(str(path))), message), message
    assert "gcloud auth application-default login" not in message
    assert "SECRET" not in message and "PRIVATE KEY" not in message and "\n" not in message


def test_a_good_google_application_credentials_file_is_loaded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from dicomfuse.stores.auth import load_credentials
    from tests.fakes.healthcare import HealthcareStandIn

    with HealthcareStandIn() as standin:
        key = standin.write_key_file(tmp_path / "key.json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    assert load_credentials().service_account_email == "dicomfuse-test@test-project.iam.gserviceaccount.com"



class _RecordingCredentials:
    """Credentials whose refresh notes the TLS trust of the session it is given."""

    def __init__(self, seen: list[object]) -> None:
        self.seen = seen
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None

    def refresh(self, request) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(request.session.verify)
        self.token = "tok"
        self.expiry = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(hours=1)


def test_the_token_service_is_trusted_through_the_ca_bundle_as_the_api_is(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Behind a TLS-inspecting proxy with a private CA, --caBundle must reach the token request
    too: the API was trusted through it, the token service was not, and nothing mounted."""
    import dicomfuse.stores.auth as auth
    from dicomfuse.stores.open import open_dataset

    seen: list[object] = []
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setattr(auth, "load_credentials", lambda key_file: _RecordingCredentials(seen))
    dataset = open_dataset("https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d",
                           ca_bundle=bundle)
    try:
        dataset.client.session.auth.tokens.token()  # type: ignore[attr-defined]
    finally:
        dataset.close()
    TokenSource(_RecordingCredentials(seen)).token()
    assert seen == [str(bundle), True]


@pytest.mark.parametrize("error", [
    ValueError("invalid literal for int() with base 10: 'ZEBRA^SECRET'"),  # "expires_in": "ZEBRA^SECRET"
    TypeError("string indices must be integers"),  # a 200 whose body is not a JSON object
    KeyError("ZEBRA^SECRET"),
    OverflowError("date value out of range"),  # "expires_in": 1000000000000
])
def test_a_token_answer_that_cannot_be_read_is_a_clean_refusal(error: Exception) -> None:
    """google-auth fails reading a 200 that is not a token with the value in its message: a
    refusal of one line that quotes nothing, not a traceback."""
    tokens, creds, _ = source()
    creds.error = error
    with pytest.raises(Forbidden) as raised:
        tokens.token()
    assert str(raised.value) == ("could not get a Google access token: the token service's answer could not be "
                                 f"read ({type(error).__name__})")


def test_a_background_refresh_that_fails_unexpectedly_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """The refresh ahead of expiry runs on its own thread: whatever it raises is one warning that
    names the error's type, never a thread traceback on the terminal (it may quote the answer)."""
    tokens, creds, now = source()
    tokens.token()
    uncaught: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: uncaught.append(args.exc_value)
    try:
        creds.error = RuntimeError("ZEBRA^SECRET")
        now.advance(3600 - 200)  # inside the stale margin: served, and refreshed in the background
        with caplog.at_level(logging.WARNING, logger="dicomfuse"):
            assert tokens.token() == "token-1"
            wait_until(lambda: "Background token refresh failed" in caplog.text)
    finally:
        threading.excepthook = previous
    assert uncaught == []
    assert "Background token refresh failed (unexpected RuntimeError); will retry" in caplog.text
    assert "ZEBRA" not in caplog.text
