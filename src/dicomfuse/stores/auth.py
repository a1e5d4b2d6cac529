"""Google credentials for the Cloud Healthcare API: loading them with one clear error, and
access tokens that are refreshed *before* they expire, in the background, so no request waits.

google-auth does the OAuth flows (service-account JWT bearer, user credentials from
``gcloud auth application-default login``, workload identity, the metadata server). This module
only decides *when* to refresh: a token is used as is while fresh; once it enters the last part of
its life one background thread refreshes it while requests keep using the old one; only a token
that is (nearly) expired makes requests wait, and then for one shared refresh, not one each.

Tokens never reach a log line or an exception message.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import requests.auth

from dicomfuse.stores.base import Forbidden, StoreError, Unavailable
from dicomfuse.stores.http import DEFAULT_TIMEOUT, Timeout, exception_chain, is_timeout, no_answer

logger = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/cloud-healthcare",)
"""The narrowest scope the Healthcare API accepts (``cloud-platform`` works too)."""

STALE_MARGIN = 300.0
"""Refresh in the background when less than this many seconds (or half the token's lifetime,
whichever is less) remain."""

EXPIRY_MARGIN = 10.0
"""Never send a token with less than this many seconds (or a tenth of its lifetime) left."""

ADC_HELP = (
    "run 'gcloud auth application-default login', set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service-account key file, or pass --keyFile KEY.json"
)


ADC_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
ADC_FIX = "fix or unset it, or pass --keyFile KEY.json"


class CredentialsError(Exception):
    """No usable credentials: one line for the user, nothing secret in it."""


class TokenRefused(Forbidden):
    """Google's token service refused the credentials (deleted key, unknown account, clock skew)."""


def load_credentials(key_file: str | os.PathLike[str] | None = None) -> Any:
    """Credentials from ``key_file`` (a service-account JSON key, or the authorized-user file
    gcloud writes), else application default credentials. Raises :class:`CredentialsError`."""
    import google.auth
    import google.auth.exceptions

    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            with open(path, "rb") as handle:
                handle.read(1)
            mode = path.stat().st_mode
        except OSError as exc:
            raise CredentialsError(f"cannot read key file {path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH) and os.name != "nt":
            logger.warning("Key file %s is readable by other users; chmod 600 it", path)
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"key file {path} is not JSON ({type(exc).__name__})") from None
        kind = info.get("type") if isinstance(info, dict) else None
        try:
            if kind == "service_account":
                from google.oauth2 import service_account

                credentials = service_account.Credentials.from_service_account_info(info, scopes=list(SCOPES))
            elif kind == "authorized_user":
                from google.oauth2 import credentials as user_credentials

                credentials = user_credentials.Credentials.from_authorized_user_info(info, scopes=list(SCOPES))
            else:
                raise CredentialsError(
                    f"key file {path} is not a service-account key (type {kind!r}); for other credential "
                    "types set GOOGLE_APPLICATION_CREDENTIALS instead of --keyFile")
        except google.auth.exceptions.GoogleAuthError as exc:
            raise CredentialsError(f"key file {path} is not usable: {_first_line(exc)}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialsError(f"key file {path} is not a valid service-account key "
                                   f"({type(exc).__name__}: {_first_line(exc)})") from None
        return credentials
    named = os.environ.get(ADC_ENV) or None
    info = _read_named_key_file(named) if named else None
    try:
        credentials, _ = google.auth.default(scopes=list(SCOPES))
    except google.auth.exceptions.DefaultCredentialsError as exc:
        if named:
            raise CredentialsError(f"{ADC_ENV} file {named} is not a usable key: {_safe_reason(exc, info)}") from None
        raise CredentialsError(f"no Google credentials found: {ADC_HELP}") from None
    except google.auth.exceptions.GoogleAuthError as exc:
        raise CredentialsError(f"Google credentials could not be loaded: {_first_line(exc)}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if not named:
            raise
        raise CredentialsError(f"{ADC_ENV} file {named} is not a usable key ({type(exc).__name__})") from None
    return credentials


def _read_named_key_file(name: str) -> dict[str, Any]:
    """The JSON object in the file GOOGLE_APPLICATION_CREDENTIALS names. google-auth's own errors
    for a missing or broken file ("File … was not found.") read as if no credentials were set, and a
    JSON list or a folder escapes as AttributeError or IsADirectoryError. Never says what is in it."""
    try:
        text = Path(name).read_text(encoding="utf-8")  # as google-auth reads it: no ~ expansion
    except FileNotFoundError:
        raise CredentialsError(f"{ADC_ENV} names {name}, which does not exist: {ADC_FIX}") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialsError(f"{ADC_ENV} names {name}, which cannot be read ({why}): {ADC_FIX}") from None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise CredentialsError(f"{ADC_ENV} file {name} is not a JSON key file: {ADC_FIX}")
    return info


def _safe_reason(exc: BaseException, info: dict[str, Any] | None) -> str:
    """Why google-auth refused a key file, in one line: the underlying error's text (e.g. "missing
    fields token_uri") or else google-auth's own; left out if it quotes any value from the file
    (google-auth quotes a value it cannot convert, which may be the private key)."""
    secrets = {value for value in _strings(info) if len(value) >= 6}
    for candidate in (exc.__cause__, exc):
        if candidate is None:
            continue
        text = _first_line(candidate)
        if text and not any(secret in text for secret in secrets):
            return text
    return type(exc.__cause__ or exc).__name__


def _strings(value: Any, key: str | None = None) -> Iterator[str]:
    """Every text in a JSON document but the key type (to recognise them in error messages)."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _strings(item, str(name))
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)
    elif key != "type" and value is not None:
        yield str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def _shorter(asked: Timeout | None, bound: Timeout) -> Timeout:
    """The shorter of two ``requests`` timeouts, each part by itself (None: no bound asked)."""
    if asked is None:
        return bound
    asked_pair = asked if isinstance(asked, tuple) else (asked, asked)
    bound_pair = bound if isinstance(bound, tuple) else (bound, bound)
    return (min(asked_pair[0], bound_pair[0]), min(asked_pair[1], bound_pair[1]))


@functools.cache
def _bounded_request_class() -> type:
    """google-auth's ``requests`` transport whose every call waits at most ``timeout``: its own
    default is 120 s, and a file operation may be waiting for the token (made lazily: google-auth
    is imported on first use)."""
    import google.auth.transport.requests

    class BoundedRequest(google.auth.transport.requests.Request):  # type: ignore[misc]
        def __init__(self, session: requests.Session, timeout: Timeout) -> None:
            super().__init__(session)
            self.timeout = timeout
            self.last_status: int | None = None  # of the last answer: google-auth's errors lack it

        def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                     timeout: Timeout | None = None, **kwargs: Any) -> Any:
            response = super().__call__(url, method=method, body=body, headers=headers,
                                        timeout=_shorter(timeout, self.timeout), **kwargs)
            self.last_status = response.status
            return response

    return BoundedRequest


def _utcnow() -> datetime.datetime:
    # google-auth keeps ``expiry`` as a naive UTC datetime.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class TokenSource:
    """Hands out access tokens for one set of credentials. Thread-safe.

    ``refresh`` is called with no argument and must refresh the credentials (it is
    ``credentials.refresh(Request())`` unless a test gives another)."""

    def __init__(self, credentials: Any, *, refresh: Callable[[], None] | None = None,
                 now: Callable[[], datetime.datetime] = _utcnow, timeout: Timeout = DEFAULT_TIMEOUT,
                 ca_bundle: str | os.PathLike[str] | None = None) -> None:
        self.credentials = credentials
        self.ca_bundle = ca_bundle
        """PEM file of the CAs to trust for the token service (``--caBundle``), as for the API."""
        self.timeout = timeout
        """Bounds every request to the token service as ``--httpTimeout`` bounds the others."""
        self._refresh_call = refresh or self._default_refresh
        self._now = now
        self._cond = threading.Condition()
        # Protected by _cond:
        self._refreshing = False
        self._lifetime: float | None = None  # seconds the current token had when it arrived
        self._failure: StoreError | None = None  # the last background refresh's failure
        self.refreshes = 0
        self._token_request: Any = None  # made on first use (one refresh at a time uses it)

    def _default_refresh(self) -> None:
        if self._token_request is None:
            session = requests.Session()
            if self.ca_bundle is not None:
                session.verify = str(self.ca_bundle)
            self._token_request = _bounded_request_class()(session, self.timeout)
        self._token_request.last_status = None
        self.credentials.refresh(self._token_request)

    def _last_status(self) -> int | None:
        """The HTTP status of the token service's last answer to the default refresh."""
        return getattr(self._token_request, "last_status", None)

    # -- state -------------------------------------------------------------------------------

    def _remaining(self) -> float | None:
        """Seconds left on the current token; None if it never expires; -1 without a token."""
        if not getattr(self.credentials, "token", None):
            return -1.0
        expiry = getattr(self.credentials, "expiry", None)
        if expiry is None:
            return None
        return (expiry - self._now()).total_seconds()

    def _margins(self) -> tuple[float, float]:
        lifetime = self._lifetime if self._lifetime and self._lifetime > 0 else 3600.0
        return min(STALE_MARGIN, lifetime / 2), min(EXPIRY_MARGIN, lifetime / 10)

    # -- use ---------------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """The headers that authorize one request (``Authorization`` and, for user
        credentials with a quota project, ``x-goog-user-project``)."""
        headers: dict[str, str] = {}
        token = self.token()
        self.credentials.apply(headers, token=token)
        return headers

    def token(self) -> str:
        """A token with time left on it: the current one, or a fresh one when it is (nearly)
        expired. A token close to expiry also starts one background refresh."""
        with self._cond:
            while True:
                remaining = self._remaining()
                stale, expiring = self._margins()
                if remaining is None or remaining > stale:
                    return str(self.credentials.token)
                if remaining > expiring:
                    if not self._refreshing:
                        self._start_background()
                    return str(self.credentials.token)
                if self._refreshing:
                    self._cond.wait(timeout=60)
                    continue
                self._refreshing = True
                break
        try:
            self._refresh()
        finally:
            with self._cond:
                self._refreshing = False
                self._cond.notify_all()
        return str(self.credentials.token)

    def invalidate(self, token: str | None) -> bool:
        """The server refused ``token`` (401): forget it unless a newer one already replaced
        it. Returns True when a retry with a new token makes sense."""
        with self._cond:
            current = getattr(self.credentials, "token", None)
            if token is None or current != token:
                return True  # someone refreshed meanwhile
            self.credentials.expiry = self._now() - datetime.timedelta(seconds=1)
            return True

    # -- refresh -----------------------------------------------------------------------------

    def _start_background(self) -> None:
        """Caller holds _cond."""
        self._refreshing = True
        thread = threading.Thread(target=self._background, name="token-refresh", daemon=True)
        thread.start()

    def _background(self) -> None:
        try:
            self._refresh()
        except StoreError as exc:
            logger.warning("Background token refresh failed (%s); will retry", exc)
        except Exception as exc:  # never a thread's traceback on the terminal: it may quote the answer
            logger.warning("Background token refresh failed (unexpected %s); will retry", type(exc).__name__)
        finally:
            with self._cond:
                self._refreshing = False
                self._cond.notify_all()

    def _refresh(self) -> None:
        """Refresh the credentials, mapping google-auth's errors to store errors."""
        import google.auth.exceptions

        try:
            self._refresh_call()
        except (google.auth.exceptions.RefreshError, google.auth.exceptions.TransportError,
                requests.RequestException) as exc:
            error = _refresh_error(exc, self._last_status())
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as exc:
            # An answer of 200 that is not a token (a proxy's page, "expires_in": "soon", an
            # expiry past year 9999): google-auth fails reading it, the value in its message.
            error = _malformed_answer(exc)
        else:
            remaining = self._remaining()
            with self._cond:
                self.refreshes += 1
                self._lifetime = remaining if remaining and remaining > 0 else None
            logger.debug("Access token refreshed, valid for %s s",
                         "ever" if remaining is None else f"{remaining:.0f}")
            return
        raise error


def _refresh_error(exc: BaseException, status: int | None = None) -> StoreError:
    """The store error for a failed refresh. No answer at all (the network or the token service is
    down: refused or dropped connection, unknown host, timeout) is ``unreachable``, like the same
    failure of the Healthcare API itself, so that write-back waits for the network to return. The
    metadata server's errors arrive as a RefreshError wrapping a TransportError: looked through."""
    import google.auth.exceptions

    cause = no_answer(exc)
    if cause is not None:
        timed_out = is_timeout(exc)
        what = "timed out" if timed_out else "connection failed"
        error = Unavailable(f"could not reach Google's token service: {what} ({type(cause).__name__})")
        error.unreachable = True
        error.timed_out = timed_out
        return error
    if getattr(exc, "retryable", False) or any(
        isinstance(e, google.auth.exceptions.TransportError) for e in exception_chain(exc)
    ):
        # A 5xx or 429 of the token service, already retried by google-auth: an outage
        # (EIO at the mount), not a refusal of the credentials (EACCES).
        return Unavailable(_with_detail("Google's token service is unavailable", exc, status))
    return TokenRefused(_with_detail("could not get a Google access token", exc, None))


def _with_detail(head: str, exc: BaseException, status: int | None) -> str:
    """``head (HTTP status): detail``, leaving out what is unknown; the error's type when all is."""
    if status is not None and status >= 400:
        head = f"{head} (HTTP {status})"
    detail = _refresh_detail(exc)
    if detail:
        return f"{head}: {detail}"
    return head if status is not None and status >= 400 else f"{head} ({type(exc).__name__})"


_OAUTH_CODE = re.compile(r"[a-z][a-z_]{0,63}")  # RFC 6749's error codes: invalid_grant, invalid_client, …
_GOOGLE_STATUS = re.compile(r"[A-Z][A-Z_]{0,63}")  # google.rpc.Code names: PERMISSION_DENIED, …
_GOOGLE_AUTH_OWN = frozenset({"No access token in response.", "No ID token in response."})
_OAUTH_HINTS = {
    "invalid_grant": "the key was refused: deleted or disabled, or this machine's clock is wrong",
    "invalid_client": "the key's service account is unknown or disabled",
    "unauthorized_client": "the key's service account may not ask for this token",
    "invalid_scope": "the token's scope was refused",
}


def _refresh_detail(exc: BaseException) -> str:
    """One line saying why a refresh failed, from google-auth's error, with none of the token
    service's own words: its error code when the answer gives a well-formed one (OAuth's
    ``error``, a Google error's ``status``), with what that code means, else the first line of a
    library error (a connection failure); "" when there is none. The answer's text (its
    ``error_description``, ``message`` or body) is never quoted: a proxy or a private token
    endpoint may echo the request, whose signed assertion is a credential, or anything else."""
    answer = next((arg for arg in exc.args if isinstance(arg, dict)), None)
    if answer is not None:
        error = answer.get("error")
        if isinstance(error, dict):  # {"error": {"code": 500, "message": "…", "status": "INTERNAL"}}
            status = error.get("status")
            return status if isinstance(status, str) and _GOOGLE_STATUS.fullmatch(status) else ""
        if isinstance(error, str) and _OAUTH_CODE.fullmatch(error):  # {"error": "invalid_grant", …}
            hint = _OAUTH_HINTS.get(error)
            return f"{error} ({hint})" if hint else error
        first = exc.args[0] if exc.args else None
        return first if first in _GOOGLE_AUTH_OWN else ""  # e.g. a 200 without a token in it
    first = exc.args[0] if exc.args else None
    if isinstance(first, BaseException):  # google-auth wrapping a library error: its words, not the server's
        return _first_line(first)[:200]
    return ""


def _malformed_answer(exc: BaseException) -> TokenRefused:
    """A token service answer google-auth could not read (not JSON, a field of the wrong type):
    the answer is not quoted, and neither is the error, which may hold part of it."""
    return TokenRefused(f"could not get a Google access token: the token service's answer could not be read "
                        f"({type(exc).__name__})")


class BearerAuth(requests.auth.AuthBase):
    """``requests`` auth that puts a :class:`TokenSource`'s headers on every request."""

    def __init__(self, tokens: TokenSource) -> None:
        self.tokens = tokens

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.tokens.headers())
        return request

    def unauthorized(self, response: requests.Response) -> bool:
        """A 401 came back: drop the token it used. True when sending again may succeed."""
        sent = response.request.headers.get("Authorization", "") if response.request else ""
        token = sent.split(" ", 1)[1] if sent.lower().startswith("bearer ") else None
        return self.tokens.invalidate(token)
